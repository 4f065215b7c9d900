"""vLLM on CPU: seeded sampling when the prompts exceed one engine step's token budget. With chunked prefill (vLLM
CPU's default) a seeded request cut mid-prefill makes vLLM rewind its generator, which a CPU generator cannot do
("CPU Generator does not use offset": a run crashed at step 40 of a sequential run). The CPU engine turns chunked
prefill off, so every prompt is prefilled whole."""

from mgs_megatron.testing.harness import run_distributed
from tests.rollout import models
from tests.rollout.workers import over_budget_worker


def test_seeded_sampling_with_prompts_over_the_step_budget(tmp_path):
    engine_dir = models.save("qwen2", 0, tmp_path / "qwen2")
    (gens,) = run_distributed(over_budget_worker, 1, str(engine_dir), timeout=400)
    first, again = gens
    assert len(first) == 24 and all(first)  # 12 prompts x 2 samples, each with tokens
    assert first == again  # seeded: the same draws
