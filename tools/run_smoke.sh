#!/usr/bin/env bash
# Install (idempotent), then the smoke run: a tiny Qwen-shaped GPTModel, Adam on CPU, world 2 (DP2, then TP2).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/python -m torch.distributed.run --nproc-per-node 2 examples/smoke_train.py "$@"
