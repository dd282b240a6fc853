#!/usr/bin/env bash
# Cache and train on every GPU of this machine with DDP. Usage: scripts/train_gpu.sh [CONFIG] [--set K=V ...]
# Multi-node: run on each node with NNODES, NODE_RANK and MASTER_ADDR set (torchrun's rendezvous); the run
# directory must be on storage every node sees.
# With `train.source: model` in the config there is no cache stage: each process forwards its own sequences.
set -euo pipefail
CONFIG=${1:-configs/gpt2_mlp_gpu.yaml}
shift || true
NGPU=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
LAUNCH=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
  --nproc_per_node "$NGPU" --no-python)
# train.source of the config, with the same --set overrides: "cache" or "model"
SOURCE=$(python -c '
import sys
from features.cli import build_parser
from features.run_config import load_config
args = build_parser().parse_args(["train", "--config", *sys.argv[1:]])
print(load_config(args.config, args.set).train.source)' "$CONFIG" "$@")
if [ "$SOURCE" = cache ]; then
  # Every process writes its own shards; rank 0 merges the manifests. A rerun resumes what is missing.
  "${LAUNCH[@]}" saekit cache --config "$CONFIG" "$@"
fi
"${LAUNCH[@]}" saekit train --config "$CONFIG" "$@"
saekit eval --config "$CONFIG" "$@"
