"""The sbatch scripts, run the way SLURM runs them: a copy of the script in a "spool" directory started from the
submit directory with SLURM_* variables set, fake `srun` / `scontrol` on PATH (tests/slurm/fake_bin: they record
their arguments; srun runs each node's task locally and forwards signals), and the real tiny CPU job (world 2:
one node of 2 ranks, or 2 nodes of 1 rank with a c10d rendezvous).

SIGTERM to the batch script mid-run (what `#SBATCH --signal=B:TERM@300` does) must leave a complete checkpoint of
the step reached within the configured grace period, exit 143 and requeue exactly once; the requeued run must
resume from that step (the metrics of the steps before it are not rewritten) and, ending normally, not requeue.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from mgs_megatron.megatron.launch import free_port
from tests.rl.conftest import ROOT, base_overrides

FAKE_BIN = ROOT / "tests" / "slurm" / "fake_bin"
GRACE_S = 60


def _records(log):
    return [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []


def _requeues(log):
    return [r["scontrol"] for r in _records(log) if "scontrol" in r]


def _steps(out):
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _batch(script, tmp_path, job_id, *, nodes, submit, extra_env=()):
    """Start the batch script as slurmstepd would: its copy in the spool directory, cwd = the submit directory."""
    spool = tmp_path / "spool" / f"job{job_id:05d}"
    spool.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "examples" / "slurm" / script, spool / "slurm_script")
    env = dict(os.environ, PATH=f"{FAKE_BIN}:{os.environ['PATH']}", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore",
               PY=sys.executable, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="mgs-test", SLURM_SUBMIT_DIR=str(submit),
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="node[1-2]",
               SLURM_GPUS_ON_NODE=str(2 // nodes), SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(free_port()),
               MGS_GRACE_S=str(GRACE_S), MGS_LOG_DIR=str(tmp_path / "logs"), MGS_CACHE_ROOT=str(tmp_path / "cache"),
               FAKE_SLURM_LOG=str(tmp_path / "slurm.jsonl"), **dict(extra_env))
    return env, spool / "slurm_script"


def _run(cmd, env, cwd, out_file):
    return subprocess.Popen(["bash", str(cmd[0]), *cmd[1:]], cwd=cwd, env=env, stdout=out_file,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc):
    if proc.poll() is None:  # a failed assertion: stop the job the way SLURM would, then hard
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("script, nodes", [("train_single_node.sbatch", 1), ("train_multi_node.sbatch", 2)])
def test_preempted_job_checkpoints_requeues_once_and_resumes(tmp_path, toy, script, nodes):
    out, job = tmp_path / "run", 4200 + nodes
    # single node: submitted from the repository root (REPO comes from SLURM_SUBMIT_DIR); multi-node: submitted from
    # elsewhere with REPO set (the override)
    submit = ROOT if nodes == 1 else tmp_path / "submit"
    submit.mkdir(exist_ok=True)
    extra = {} if nodes == 1 else {"REPO": str(ROOT)}
    args = [str(ROOT / "examples" / "tiny_cpu.yaml"), *base_overrides(toy, out), "strategy=mgs", "run.save_every=0"]
    log = tmp_path / "slurm.jsonl"

    env, batch = _batch(script, tmp_path, job, nodes=nodes, submit=submit, extra_env=extra)
    with open(tmp_path / "job-1.out", "w") as f:
        proc = _run([batch, *args, "run.total_steps=500"], env, submit, f)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(_steps(out)) < 1 and proc.poll() is None:
            time.sleep(0.5)
        assert proc.poll() is None and _steps(out), (tmp_path / "job-1.out").read_text()[-3000:]
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=GRACE_S + 30)
        took = time.time() - t0
    finally:
        _stop(proc)
    job_log = (tmp_path / "job-1.out").read_text()
    assert rc == 143, job_log[-3000:]
    assert took < GRACE_S, f"stopped after {took:.0f}s, grace {GRACE_S}s"
    latest = (out / "checkpoints" / "latest").read_text()
    state = json.loads((out / "checkpoints" / latest / "trainer.json").read_text())
    reached = state["step"]
    assert latest == f"step_{reached}" and reached >= 1
    assert sorted(p.name for p in (out / "checkpoints" / latest).glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    assert not list((out / "checkpoints").glob(".tmp_*"))
    assert _requeues(log) == [["requeue", str(job)]]
    sruns = [r for r in _records(log) if "srun" in r]
    assert len(sruns) == 1
    argv, srun_env = sruns[0]["srun"], sruns[0]["env"]
    assert f"--nodes={nodes}" in argv and "--ntasks-per-node=1" in argv and "--cpus-per-task=1" in argv
    assert srun_env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == str(GRACE_S) and srun_env["NCCL_CUMEM_ENABLE"] == "0"
    assert srun_env["SRUN_CPUS_PER_TASK"] == "1" and srun_env["CUDA_DEVICE_MAX_CONNECTIONS"] is None
    assert f"launcher.nproc_per_node={2 // nodes}" in argv and f"localhost:{env['MASTER_PORT']}" in argv
    logs = tmp_path / "logs" / f"mgs-test-{job}"
    assert (logs / "restart-0" / "node-0.log").is_file() and (logs / "restart-0" / f"node-{nodes - 1}.log").is_file()
    before = _steps(out)[:reached]

    # the requeued job: the same script from the top, SLURM_RESTART_COUNT=1; it runs one more step and ends
    env, batch = _batch(script, tmp_path, job, nodes=nodes, submit=submit,
                        extra_env={**extra, "SLURM_RESTART_COUNT": "1"})
    with open(tmp_path / "job-2.out", "w") as f:
        proc = _run([batch, *args, f"run.total_steps={reached + 1}"], env, submit, f)
    try:
        rc = proc.wait(timeout=240)
    finally:
        _stop(proc)
    node_log = (logs / "restart-1" / "node-0.log").read_text()
    assert rc == 0, (tmp_path / "job-2.out").read_text()[-2000:] + node_log[-3000:]
    assert f"resuming after step {reached} to {reached + 1}" in node_log
    steps = _steps(out)
    assert [json.loads(s)["step"] for s in steps] == list(range(1, reached + 2))
    assert steps[:reached] == before  # resumed: the steps before the checkpoint were not run again
    assert (out / "checkpoints" / "latest").read_text() == f"step_{reached + 1}"
    assert len(_requeues(log)) == 1  # a run that ends normally does not requeue
