#!/usr/bin/env bash
# Train on every GPU of this machine with DDP. Usage: scripts/train_gpu.sh [CONFIG] [extra saekit args]
# Multi-node: run on each node with NNODES, NODE_RANK and MASTER_ADDR set (torchrun's rendezvous).
set -euo pipefail
CONFIG=${1:-configs/gpt2_mlp_gpu.yaml}
shift || true
NGPU=${NGPU:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
# The cache is written once by a single process; training then runs on all GPUs.
saekit cache --config "$CONFIG" "$@"
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  --nproc_per_node "$NGPU" -m features.cli train --config "$CONFIG" "$@"
saekit eval --config "$CONFIG" "$@"
