#!/usr/bin/env bash
# The tiny main job: install (idempotent), toy assets (data, tokenizer, chat reward model; cached), then GRPO with
# MGS on a tiny Qwen2-shaped model, world 2 on CPU; prints a per-domain start/end reward table and writes plots.
#   bash tools/run_main.sh [dotted overrides, e.g. strategy=mixed run.total_steps=10]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
.venv/bin/python -c "from mgs_megatron.data.toy import ensure_toy_assets; ensure_toy_assets('examples/data')"
OUT=$(.venv/bin/python -c "import sys; from mgs_megatron.rl.config import load_config; \
print(load_config('examples/tiny_cpu.yaml', sys.argv[1:]).run.output_dir)" "$@")
.venv/bin/mgs-train examples/tiny_cpu.yaml "$@"
.venv/bin/python tools/plot_conflicts.py "$OUT/metrics.jsonl" --out "$OUT/plots"
