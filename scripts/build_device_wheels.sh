#!/usr/bin/env bash
# Build the folder of wheels that scripts/device_check.sh needs on a bare GPU machine (one that has
# python3 with torch, transformers, safetensors, numpy and triton, and no network).
#
#   scripts/build_device_wheels.sh [OUT]      # default OUT: build/device-wheels (git-ignored)
#
# Then send OUT with the working tree (`run` with carry: ["build/device-wheels"]) and run
# scripts/device_check.sh there; it unpacks the wheels into a temporary folder at the end of sys.path,
# so nothing the machine already has is shadowed.
#
# What goes in: eai-sparsify and what its SparseCoder imports (simple-parsing, docstring-parser,
# natsort, einops, accelerate, psutil), each at the version this checkout's .venv has. Not its
# trainer's dependencies: bench_train loads the coder without sparsify's package __init__.
# What stays out, measured: SAE-Lens and TransformerLens need datasets, pyarrow (55 MB), pandas
# (12 MB), wandb (20 MB), plotly (10 MB), nltk, ...: about 97 MB of wheels before their smaller
# dependencies, over the 64 MiB that may travel. So the device check runs sparsify as the peer, and
# measures the cache writer through plain torch forward hooks on a transformers model instead of
# TransformerLens (see scripts/device_check.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-build/device-wheels}"
PYTHON="${PYTHON:-.venv/bin/python}"
LIMIT_MIB="${LIMIT_MIB:-48}"  # leaves room for the tree itself under the 64 MiB limit

PACKAGES=(eai-sparsify simple-parsing docstring-parser natsort einops accelerate psutil)
specs=()
for pkg in "${PACKAGES[@]}"; do
  version="$("$PYTHON" -c "import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass" "$pkg")"
  specs+=("${pkg}${version:+==$version}")
done

rm -rf "$OUT"
mkdir -p "$OUT"
# Pure-python wheels, and psutil's abi3 wheel, which installs on any CPython >= 3.6 on x86_64 Linux.
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$OUT" "${specs[@]}"

total_kib="$(du -sk "$OUT" | cut -f1)"
echo "wheels for the device check in $OUT ($total_kib KiB; at most $LIMIT_MIB MiB):"
ls -1 "$OUT" | sed 's/^/  /'
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "error: $OUT is over $LIMIT_MIB MiB; drop a package or raise LIMIT_MIB (64 MiB travel with the tree)" >&2
  exit 1
fi
for wheel in "$OUT"/*.whl; do
  case "$wheel" in
    *-none-any.whl|*-abi3-*.whl) ;;
    *) echo "warning: $wheel is built for this Python only; the GPU machine's may differ" >&2 ;;
  esac
done
