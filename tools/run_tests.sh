#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: everything on the default megatron-core (0.16.1), then the
# distributed and interop tests again on megatron-core 0.19.2 (which ships Megatron-LM's megatron.training) in a
# second environment, then the verl adapter's test in a third (verl 0.9.1 pins transformers < 5.11).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --mcore019 --verl
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== ruff check"
.venv/bin/ruff check .
echo "== tests on megatron-core $(.venv/bin/python -c 'import megatron.core as m; print(m.__version__)')"
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
echo "== distributed tests on megatron-core 0.19.2"
.venv-mcore019/bin/python -m pytest tests/megatron tests/convert tests/interop -q -p no:cacheprovider "$@"
echo "== verl adapter on verl 0.9.1"
.venv-verl/bin/python -m pytest tests/integrations -q -p no:cacheprovider "$@"
