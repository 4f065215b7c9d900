"""The 7B/8B recipes are the paper's experiment as its official code runs it: every row of the recipe table of the
official implementation (StringNLPLAB/MGS @78bb513, configs/mgs_mixed_grpo_qwen_think.yaml = Y, dp_actor.py = A,
fsdp_workers.py = W, main_ppo_mixed.py = M), checked value by value on both YAML files."""

import pytest

from mgs_megatron.rl.config import load_config
from tests.rl.conftest import ROOT

# (what, getter, official value, where the official code says so)
OFFICIAL = [
    ("initial model is the base model", lambda c: "Instruct" not in c.model.path, True, "README: *-Prompted base"),
    ("thinking prompt template", lambda c: c.data.chat_template, "think", "RLMT convert_base_to_prompted_model"),
    ("learning rate", lambda c: c.optim.lr, 1e-6, "Y: optim.lr"),
    ("constant schedule, no warm-up", lambda c: c.warmup.steps, 0, "Y: lr_warmup_steps_ratio 0"),
    ("weight decay", lambda c: c.optim.weight_decay, 0.01, "Y: optim.weight_decay"),
    ("weight decay on every parameter", lambda c: c.optim.decay_all_params, True, "W:437-442 one AdamW group"),
    ("Adam betas", lambda c: (c.optim.adam_beta1, c.optim.adam_beta2), (0.9, 0.999), "W: AdamW defaults"),
    ("gradient clip", lambda c: c.optim.clip_grad, 1.0, "Y: grad_clip"),
    ("prompts per step", lambda c: c.data.prompts_per_step, 64, "Y: train_batch_size"),
    ("samples per prompt", lambda c: c.rollout.n, 8, "Y: rollout.n"),
    ("temperature", lambda c: c.rollout.temperature, 0.7, "Y: rollout.temperature"),
    ("top_p", lambda c: c.rollout.top_p, 1.0, "Y: rollout.top_p"),
    ("max prompt tokens", lambda c: c.rollout.max_prompt_len, 896, "Y: data.max_prompt_length"),
    ("left truncation of prompts", lambda c: c.rollout.prompt_truncation, "left", "Y: data.truncation left"),
    ("max response tokens", lambda c: c.rollout.max_response_len, 4096, "Y: data.max_response_length"),
    ("vLLM rollouts", lambda c: c.rollout.backend, "vllm", "Y: rollout.name vllm"),
    ("rollout TP", lambda c: c.rollout.rollout_tp, 2, "Y: rollout.tensor_model_parallel_size"),
    ("random per-sample domain draw", lambda c: c.data.mix, "random", "M:460-464 WeightedRandomSampler"),
    ("one third per domain", lambda c: {d: p / sum(c.data.proportions.values())
                                        for d, p in c.data.proportions.items()},
     {"math": 1 / 3, "if": 1 / 3, "chat": 1 / 3}, "M: weights"),
    ("steps (about 2 epochs)", lambda c: c.run.total_steps, 500, "Y: total_epochs 2"),
    ("GRPO advantages, std-normalised", lambda c: (c.algo.adv_estimator, c.algo.norm_adv_by_std), ("grpo", True),
     "Y: adv_estimator grpo"),
    ("clip ratio low / high", lambda c: (c.algo.clip_low, c.algo.clip_high), (0.2, 0.2), "Y: clip_ratio"),
    ("KL: low_var_kl, 0.001, in the loss", lambda c: (c.algo.kl_type, c.algo.kl_coef), ("low_var_kl", 0.001),
     "A:593-610"),
    ("entropy coefficient", lambda c: c.algo.entropy_coef, 0.001, "A:593-610"),
    ("loss aggregation", lambda c: c.algo.loss_agg_mode, "seq-mean-token-mean", "A:570-573, Y:76"),
    ("log-probs at the rollout temperature", lambda c: c.algo.logprob_temperature, "rollout", "A:417"),
    ("MGS: per-HF-tensor PCGrad", lambda c: (c.strategy, c.mgs.rule, c.mgs.granularity), ("mgs", "pcgrad",
                                                                                         "parameter"), "A:51-147"),
    ("projection threshold |g_j|^2 > 1e-12", lambda c: c.mgs.eps, 1e-12, "A:115-138"),
    ("non-finite gradient norm skips the step", lambda c: c.mgs.on_nonfinite, "skip_step", "A:188-233"),
    ("math: the <response> part, last box, math-verify", lambda c: (
        c.rewards.domains["math"].reward, c.rewards.domains["math"].kwargs.get("extraction")),
     ("math_verify", "hf_math_verify"), "W:2304-2318, H:9-56"),
    ("IF: fraction of instructions followed in the <response> part", lambda c: (
        c.rewards.domains["if"].reward, c.rewards.domains["if"].kwargs.get("response_span")),
     ("ifeval", "response_tag"), "W:2319-2337"),
    ("chat: reward model on the response with the thinking stripped", lambda c: (
        c.rewards.domains["chat"].reward, c.rewards.domains["chat"].kwargs.get("response_span")),
     ("reward_model", "response_tag"), "W:2181-2200"),
]


@pytest.mark.parametrize("recipe", ["qwen2.5-7b.yaml", "llama3.1-8b.yaml"])
@pytest.mark.parametrize("what, get, official, where", OFFICIAL, ids=[row[0] for row in OFFICIAL])
def test_recipe_matches_the_official_run(recipe, what, get, official, where):
    cfg = load_config(ROOT / "examples" / recipe)
    got = get(cfg)
    if isinstance(official, dict):
        assert got.keys() == official.keys() and all(abs(got[k] - official[k]) < 1e-12 for k in got), what
    else:
        assert got == official, f"{recipe}: {what}: {got!r} != official {official!r} ({where})"


@pytest.mark.parametrize("recipe, eos", [("qwen2.5-7b.yaml", 151645), ("llama3.1-8b.yaml", 128009)])
def test_recipe_stops_at_the_prompted_models_end_of_turn(recipe, eos):
    assert load_config(ROOT / "examples" / recipe).rollout.stop_token_ids == (eos,)
