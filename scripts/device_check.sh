#!/usr/bin/env bash
# saekit's GPU path, checked and measured in one command (issue 11): kernels against dense autograd on the
# device in fp32 and bf16, training speed and quality against eai-sparsify at GPU sizes, the cache writer
# against the bare forward, and the kernel choice; then a summary table. About 5 minutes on one GPU.
#
#   scripts/build_device_wheels.sh                  # here, once: build/device-wheels (eai-sparsify and co.)
#   scripts/device_check.sh                         # on the GPU machine (python3 with torch, transformers, ...)
#   DEVICE_CHECK_SMOKE=1 scripts/device_check.sh    # the same script at small sizes on a CPU, a few minutes
#
# PYTHON picks the interpreter (default: this checkout's .venv if it has one, else python3; it may carry
# flags, e.g. PYTHON="python3 -u"); DEVICE_WHEELS the wheels folder (default build/device-wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a PY <<< "$PYTHON"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "${PY[@]}" scripts/device_check.py "$@"
