# The body of examples/slurm/*.sbatch, sourced by them (SLURM runs a copy of the batch script from its spool
# directory and moves no other file, so the scripts find this one through REPO, the submit directory by default).
#
# What it does, once per job start (a requeued job starts again from the top, SLURM_RESTART_COUNT counts):
#   one `srun` task per node, each `mgs-train CONFIG --nnodes N --rdzv-endpoint HEAD:PORT` (mgs-train validates the
#   config, then starts torchrun for the node's ranks; c10d rendezvous on the first node, port from the job id);
#   on SIGTERM (sbatch --signal=B:TERM@<lead>) it forwards the signal once; the ranks checkpoint at the next phase
#   boundary (after the rollout, after the train step) within MGS_GRACE_S seconds (torchrun's
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT, below the lead) and exit; the job is requeued exactly once, and only if it was
#   stopped before the end (mgs-train exits 143; 0 when the run had finished anyway).
#
# Environment (all optional):
#   REPO                  the checkout (default: SLURM_SUBMIT_DIR, i.e. submit from the repository root)
#   PY                    python of the environment (default: REPO/.venv-gpu, else REPO/.venv)
#   GPUS_PER_NODE         ranks per node (default: SLURM_GPUS_ON_NODE, what SLURM allocated; else the config's)
#   MASTER_PORT           rendezvous port (default: 20000 + job id % 20000)
#   MGS_GRACE_S           seconds the ranks get after SIGTERM (default 240; must stay below MGS_SIGNAL_LEAD_S)
#   MGS_SIGNAL_LEAD_S     the --signal lead of the #SBATCH line (default 300)
#   MGS_REQUEUE           1 (default): requeue after a stop; 0 where SLURM requeues by itself (PreemptMode=REQUEUE)
#   MGS_LOG_DIR           logs go to MGS_LOG_DIR/<job name>-<job id>/restart-<n>/node-<i>.log (default: logs/)
#   MGS_CACHE_ROOT        compile caches (Triton, TorchInductor: the surgery kernels, vLLM) per node under
#                         MGS_CACHE_ROOT/<host> (default: node-local /tmp)
#   CONTAINER_IMAGE       pyxis/enroot image: srun --container-image (+ CONTAINER_MOUNTS, default REPO:REPO)
#   APPTAINER_IMAGE       apptainer/singularity image: each task runs in `apptainer exec --nv`
#   MGS_SRUN_ARGS         more srun options (e.g. "--mpi=none")
#   CUDA_DEVICE_MAX_CONNECTIONS  not set here: Megatron needs 1 only with TP communication overlap / sequence
#                         parallelism, which this trainer does not enable (and 1 would slow vLLM's kernels)
# Account, partition, QoS: on the command line (sbatch -A ACCOUNT -p PARTITION --qos QOS ...).

mgs_die() { echo "[mgs] error: $*" >&2; exit 2; }

mgs_job() {
  local dry=0
  if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
  local config=${1:?usage: sbatch SCRIPT [--dry-run] CONFIG [overrides...]}; shift
  [[ -f "$REPO/mgs_megatron/rl/cli.py" ]] || mgs_die "REPO=$REPO is not an mgs_megatron checkout (submit from the repository root or set REPO)"
  local py=${PY:-}
  if [[ -z "$py" ]]; then
    py=$REPO/.venv/bin/python
    if [[ -x "$REPO/.venv-gpu/bin/python" ]]; then py=$REPO/.venv-gpu/bin/python; fi
  fi
  local nnodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  local job=${SLURM_JOB_ID:-local} restart=${SLURM_RESTART_COUNT:-0}
  local grace=${MGS_GRACE_S:-240} lead=${MGS_SIGNAL_LEAD_S:-300}
  (( grace < lead )) || mgs_die "MGS_GRACE_S=$grace must be below the --signal lead MGS_SIGNAL_LEAD_S=$lead"
  local head=localhost port=${MASTER_PORT:-$(( 20000 + ${SLURM_JOB_ID:-0} % 20000 ))}
  if (( nnodes > 1 )); then
    local hosts  # (not `| head -n1`: under pipefail the SIGPIPE that scontrol may get would fail the job)
    hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?multi-node needs SLURM_JOB_NODELIST}")
    head=${hosts%%$'\n'*}
  fi
  local train=(-m mgs_megatron.rl.cli "$config" --nnodes "$nnodes" --rdzv-endpoint "$head:$port" --rdzv-id "$job")
  if [[ -n "$gpus" ]]; then train+=("launcher.nproc_per_node=$gpus"); fi
  train+=("$@")

  local logs=${MGS_LOG_DIR:-${SLURM_SUBMIT_DIR:-$PWD}/logs}/${SLURM_JOB_NAME:-mgs}-$job/restart-$restart
  export MGS_CACHE_ROOT=${MGS_CACHE_ROOT:-/tmp/${USER:-mgs}-mgs-$job}
  export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$grace  # torchrun SIGKILLs the ranks this long after SIGTERM
  export NCCL_CUMEM_ENABLE=0  # vLLM sets it at import, after Megatron's communicators exist: set it for both
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
  export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}  # srun 22.05-23.02 does not inherit --cpus-per-task

  local srun=(srun --nodes="$nnodes" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}"
              --kill-on-bad-exit=1 --output="$logs/node-%n.log")
  # --kill-on-bad-exit is safe for checkpoints: no rank exits before the collective save's last barrier
  if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
    srun+=(--container-image="$CONTAINER_IMAGE" --container-mounts="${CONTAINER_MOUNTS:-$REPO:$REPO}"
           --container-workdir="$PWD")
  fi
  # shellcheck disable=SC2206  # MGS_SRUN_ARGS is a list of options on purpose
  srun+=(${MGS_SRUN_ARGS:-})
  local wrap=()
  if [[ -n "${APPTAINER_IMAGE:-}" ]]; then wrap=(apptainer exec --nv --bind "$REPO" "$APPTAINER_IMAGE"); fi
  # Per node: compile caches on node-local disk (a shared home would race), and no RANK/WORLD_SIZE/LOCAL_RANK
  # from a container hook (enroot's PyTorch hook sets them: mgs-train would think torchrun had started it).
  # shellcheck disable=SC2016  # expanded on the node
  local node='c=$MGS_CACHE_ROOT/$(hostname); export TRITON_CACHE_DIR=$c/triton TORCHINDUCTOR_CACHE_DIR=$c/inductor
unset RANK WORLD_SIZE LOCAL_RANK; exec "$@"'
  local launch=("${srun[@]}" "${wrap[@]}" bash -c "$node" mgs-node "$py" "${train[@]}")

  echo "[mgs] job=$job restart=$restart nodes=$nnodes ranks/node=${gpus:-config} rendezvous=$head:$port" \
       "grace=${grace}s logs=$logs"
  echo "[mgs] launch: ${launch[*]}"
  if (( dry )); then  # validate the whole config (keys, types, paths, rewards) as every rank will see it
    "$py" "${train[@]}" --dry-run
    echo "[mgs] config OK"
    return 0
  fi
  mkdir -p "$logs"

  MGS_STOP=0 MGS_PID=
  trap 'mgs_on_term' TERM
  "${launch[@]}" &
  MGS_PID=$!
  if (( MGS_STOP )); then kill -TERM "$MGS_PID" 2>/dev/null || true; fi  # a signal before the PID was known
  # `wait` returns early (> 128) whenever a trapped signal arrives: wait until the launch has really ended,
  # then read its status (under set -e a failing `wait` must not end the script here)
  while kill -0 "$MGS_PID" 2>/dev/null; do wait "$MGS_PID" || true; done
  local rc=0
  wait "$MGS_PID" || rc=$?
  echo "[mgs] $(date +%T) launch exited with $rc"
  if (( MGS_STOP )) && (( rc != 0 )) && [[ "${MGS_REQUEUE:-1}" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
    echo "[mgs] stopped before the end: requeueing job $SLURM_JOB_ID (it resumes from its checkpoint)"
    scontrol requeue "$SLURM_JOB_ID" || echo "[mgs] scontrol requeue $SLURM_JOB_ID failed" >&2
  fi
  return "$rc"
}

mgs_on_term() {
  if (( MGS_STOP )); then return; fi  # forward once: a second SIGTERM would make torchrun kill the ranks at once
  MGS_STOP=1
  echo "[mgs] $(date +%T) SIGTERM: the ranks checkpoint at the next phase boundary (grace ${MGS_GRACE_S:-240}s)"
  if [[ -n "$MGS_PID" ]]; then kill -TERM "$MGS_PID" 2>/dev/null || true; fi
}
