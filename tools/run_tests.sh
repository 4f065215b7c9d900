#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: everything on the default megatron-core (0.16.1), then the
# distributed tests again on megatron-core 0.19.2 in a second environment.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh --mcore019
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "== ruff check"
.venv/bin/ruff check .
echo "== tests on megatron-core $(.venv/bin/python -c 'import megatron.core as m; print(m.__version__)')"
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
echo "== distributed tests on megatron-core 0.19.2"
.venv-mcore019/bin/python -m pytest tests/megatron tests/convert -q -p no:cacheprovider "$@"
