"""mgs-compare on the tiny config: 2 strategies x 1 seed, 2 steps each; a run that fails is reported and the
others kept; a second invocation reuses the finished run and completes the failed one."""

import json
import shutil

from mgs_megatron.rl import compare
from tests.rl.conftest import ROOT, base_overrides


def test_compare_reports_failures_and_reuses_finished_runs(tmp_path, toy, capsys):
    out = tmp_path / "cmp"
    overrides = [o for o in base_overrides(toy, tmp_path / "unused") if not o.startswith("run.output_dir")]
    overrides += ["run.total_steps=2", "run.val_prompts_per_domain=2", "run.val_every=0"]
    (out / "mgs-seed1" / "metrics.jsonl").mkdir(parents=True)  # a directory where the run writes its metrics
    args = [str(ROOT / "examples" / "tiny_cpu.yaml"), *overrides, "--strategies", "mixed", "mgs", "--seeds", "1",
            "--out", str(out), "--timeout", "600"]
    assert compare.main(args) == 1
    report = (out / "comparison.md").read_text()
    assert "| mixed | 1 |" in report and "| mgs | 0 |" in report and "mgs-seed1: exit" in report
    assert json.loads((out / "mixed-seed1" / "compare.json").read_text())["status"] == "ok"
    assert (out / "comparison.png").is_file()

    shutil.rmtree(out / "mgs-seed1")
    capsys.readouterr()
    assert compare.main(args) == 0
    printed = capsys.readouterr().out
    assert "mixed-seed1: finished earlier, reused" in printed and "mgs-seed1: ok" in printed
    report = (out / "comparison.md").read_text()
    assert "| mixed | 1 |" in report and "| mgs | 1 |" in report and "Failed" not in report
    final = compare.final_validation(compare.read_metrics(compare.Run("mgs", 1, out / "mgs-seed1")))
    assert {"val/math/reward", "val/math/acc", "val/if/acc", "val/chat/reward"} <= set(final)


def test_sequential_stages_follow_the_step_budget(tmp_path, toy):
    runs = compare.plan(str(ROOT / "examples" / "tiny_cpu.yaml"), ["sequential", "global-pcgrad"], [3, 4],
                        base_overrides(toy, tmp_path)[1:] + ["run.total_steps=90"], tmp_path)
    assert [r.name for r in runs] == ["sequential-seed3", "sequential-seed4", "global-pcgrad-seed3",
                                      "global-pcgrad-seed4"]
    assert "data.steps_per_stage=30" in runs[0].overrides and "run.seed=3" in runs[0].overrides
    assert "mgs.granularity=global" in runs[2].overrides
