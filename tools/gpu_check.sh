#!/usr/bin/env bash
# The one-GPU check: what the CPU suite cannot see (NCCL rejecting host tensors, CUDA placement of every input,
# bf16 on the GPU, the Triton surgery kernels, GPU memory of a real-vocabulary step), plus the surgery benchmark with
# the card's own copy bandwidth as the floor. One report file.
#   bash tools/gpu_check.sh [REPORT_DIR]
# Needs: one CUDA GPU, Python 3.12 with a CUDA torch, transformers, triton (the device image has them); no network:
# megatron-core and the rest come from wheels in $WHEELS (default .whl/, fetched by tools/fetch_gpu_wheels.sh).
# Budget: about 8 minutes on one H200.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT=${1:-${OUT:-gpu_report}}
WHEELS=${WHEELS:-.whl}
mkdir -p "$REPORT"
LOG="$REPORT/gpu_check.txt"
: > "$LOG"
say() { echo "$@" | tee -a "$LOG"; }
say "# tools/gpu_check.sh at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
if ls "$WHEELS"/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mgs_site "$WHEELS"/*.whl 2>&1 | tail -2
  export PYTHONPATH="/tmp/mgs_site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, megatron.core as m; print('torch', torch.__version__, '| CUDA', torch.version.cuda, \
'| megatron-core', m.__version__, '|', torch.cuda.get_device_name(0))" 2>&1 | tee -a "$LOG"
status=0
say "## tests/gpu"
timeout 420 python3 -m pytest tests/gpu -q -p no:cacheprovider -rA -s 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
say "## benchmarks/bench_surgery.py --device cuda --bf16"
timeout 150 python3 benchmarks/bench_surgery.py --device cuda --bf16 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
say "## exit status $status"
exit $status
