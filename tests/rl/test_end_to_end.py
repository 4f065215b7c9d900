"""End to end on CPU, world 2 (torchrun through mgs-train), tiny model, three toy domains."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.rl.conftest import ROOT, base_overrides, mgs_train


def _metrics(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _comparable(m):
    return {k: v for k, v in m.items() if not k.startswith(("time/", "surgery/seconds", "mem/", "gpu/"))}


@pytest.mark.parametrize("strategy", ["mixed", "sequential"])
def test_three_steps(tmp_path, toy, strategy):
    out = tmp_path / strategy
    r = mgs_train(base_overrides(toy, out) + [f"strategy={strategy}", "run.total_steps=3"])
    assert r.returncode == 0, r.stderr[-3000:]
    ms = _metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    for m in ms:
        assert m["actor/update_ok"] and m["actor/tokens"] > 0
        assert m["mem/peak_rss_gib"] > 0 and "rollout/logprob_diff_max" not in m  # the sampler reports none
        for d in ("math", "if"):  # accuracy where full marks mean correct; not for the reward model's scores
            assert f"reward/{d}" not in m or 0.0 <= m[f"acc/{d}"] <= 1.0
        assert "acc/chat" not in m
    if strategy == "sequential":  # one domain per step (steps_per_stage=1: math, if, chat)
        assert [sorted(k for k in m if k.startswith("reward/") and k.count("/") == 1 and k != "reward/all")
                for m in ms] == [["reward/math"], ["reward/if"], ["reward/chat"]]
        assert [m[f"reward/{d}/failed"] for m, d in zip(ms, ("math", "if", "chat"))] == [0, 0, 0]
    else:
        assert all(f"reward/{d}" in ms[0] for d in ("math", "if", "chat"))
    assert (out / "checkpoints" / "latest").read_text() == "step_3"


def test_vllm_rollouts_agree_with_megatron(tmp_path, toy):
    """The main job's path: vLLM (CPU) rollouts with in-place weight sync; at every step the sampled tokens'
    logprobs reported by vLLM equal Megatron's recomputation (fp32), i.e. the sync of the previous step took. At the
    paper's temperature 0.7 both sides are log-probs of the sampled distribution, softmax(logits / 0.7) (vLLM's
    processed logprobs; Megatron's vocab-parallel recomputation at algo.logprob_temperature=rollout)."""
    out = tmp_path / "vllm"
    r = mgs_train(base_overrides(toy, out) + ["rollout.backend=vllm", "strategy=mgs", "run.total_steps=2",
                                              "rollout.temperature=0.7", "rollout.logprob_diff_warn=1e-12"],
                  timeout=420)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout/logprob_diff_max" in r.stderr and "logprob_diff_warn" in r.stderr  # the alarm fires at 1e-12
    assert "non-default args" not in r.stderr and "cpu_worker.py" not in r.stderr  # vLLM's own lines: debug level
    ms = _metrics(out)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert m["rollout/logprob_diff_max"] < 1e-3 and m["rollout/sync_bytes"] > 0


def _sigterm_in_rollout(args, step, rank=1, timeout=240):
    """mgs-train (world 2) whose rank `rank` receives SIGTERM while it generates step `step`."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT), MGS_TEST_SIGTERM_STEP=str(step),
               MGS_TEST_SIGTERM_RANK=str(rank))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "tests.rl.sigterm_entry", str(ROOT / "examples" / "tiny_cpu.yaml"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _same_run(a, b, steps):
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == list(range(1, steps + 1))
    for x, y in zip(ma, mb):
        assert _comparable(x) == _comparable(y)
    for rank in (0, 1):
        sa = torch.load(a / "checkpoints" / f"step_{steps}" / f"rank_{rank}.pt", weights_only=False)
        sb = torch.load(b / "checkpoints" / f"step_{steps}" / f"rank_{rank}.pt", weights_only=False)
        for k, v in sa["model"][0].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, sb["model"][0][k]), k
        assert sa["mgs"]["step"] == sb["mgs"]["step"] == steps


def test_mgs_kill_and_resume_matches_uninterrupted(tmp_path, toy):
    """MGS run of 4 steps vs. the same run crashed after step 2 (checkpoint at 2) and resumed, and vs. the same run
    preempted (SIGTERM on rank 1) inside step 3's rollout phase, without a checkpoint of step 2 to fall back on: it
    must checkpoint step 2 with the prompt sampler rewound to before step 3's draw, exit 143, and resume as if never
    stopped."""
    common = base_overrides(toy, None)[1:] + ["strategy=mgs", "run.total_steps=4", "run.keep_checkpoints=3"]
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    r = mgs_train([f"run.output_dir={a}", "run.save_every=2"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "surgery/cos/math-if/all" in _metrics(a)[-1] and "module_cos" in _metrics(a)[-1]
    r = mgs_train([f"run.output_dir={b}", "run.save_every=2", "run.fail_at_step=2"] + common)
    assert r.returncode != 0
    assert (b / "checkpoints" / "latest").read_text() == "step_2"
    assert [m["step"] for m in _metrics(b)] == [1, 2]
    r = mgs_train([f"run.output_dir={b}", "run.save_every=2"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(a, b, 4)

    r = _sigterm_in_rollout([f"run.output_dir={c}", "run.save_every=0"] + common, step=3)
    assert "exitcode  : 143" in r.stderr, r.stderr[-3000:]
    assert "preempted (SIGTERM) after step 2: checkpoint written to" in r.stderr, r.stderr[-3000:]
    assert (c / "checkpoints" / "latest").read_text() == "step_2"
    assert [m["step"] for m in _metrics(c)] == [1, 2]
    r = mgs_train([f"run.output_dir={c}", "run.save_every=0"] + common)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(a, c, 4)


def test_sigterm_leaves_loadable_checkpoint(tmp_path, toy):
    out = tmp_path / "term"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-m", "mgs_megatron.rl.cli", str(ROOT / "examples" / "tiny_cpu.yaml"),
                             *base_overrides(toy, out), "strategy=mgs", "run.total_steps=500", "run.save_every=0"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and not ((out / "metrics.jsonl").exists()
                                          and (out / "metrics.jsonl").read_text().count("\n") >= 1):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    latest = (out / "checkpoints" / "latest").read_text()
    ck = out / "checkpoints" / latest
    state = json.loads((ck / "trainer.json").read_text())
    assert state["step"] >= 1 and latest == f"step_{state['step']}", err[-2000:]
    for rank in (0, 1):
        s = torch.load(ck / f"rank_{rank}.pt", weights_only=False)
        assert s["model"] and s["optimizer"]["optimizers"]
    assert not list((out / "checkpoints").glob(".tmp_*"))


def test_start_from_hf_model(tmp_path, toy):
    """model.path = an HF directory: converted once (cached in init_mcore/), loaded on every rank; with lr 0 the
    exported HF model at the end must be the input model, tensor for tensor."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from mgs_megatron.testing.tiny import randomize_hf_params

    hf_config = yaml.safe_load((ROOT / "examples" / "tiny_cpu.yaml").read_text())["model"]["hf_config"]
    hf_dir = tmp_path / "hf_in"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    randomize_hf_params(model)
    model.save_pretrained(hf_dir)
    out = tmp_path / "run"
    args = base_overrides(toy, out) + [f"model.path={hf_dir}", "model.hf_config={}", "run.export_hf=true",
                                       "optim.lr=0.0", "strategy=mixed", "run.total_steps=1"]
    r = mgs_train(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "init_mcore" / "mgs_checkpoint.json").exists()
    want = load_file(hf_dir / "model.safetensors")
    got = {k: v for f in sorted((out / "hf").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    r = mgs_train(args[:-1] + ["run.total_steps=2"])  # resumes; the cached conversion is not redone
    assert r.returncode == 0, r.stderr[-3000:]
