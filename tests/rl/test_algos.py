"""GRPO functions against hand-computed values."""
import math

import pytest
import torch

from mgs_megatron.rl import algos


def test_grpo_advantage_std_normalised():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 5.0])
    g = ["a", "a", "a", "a", "b", "b"]
    adv = algos.compute_advantage("grpo", r, g, norm_std=True, eps=0.0)
    # group a: mean 0.5, unbiased std sqrt(1/3); group b: mean 3.5, std sqrt(4.5)
    sa, sb = math.sqrt(1 / 3), math.sqrt(4.5)
    want = [0.5 / sa, -0.5 / sa, -0.5 / sa, 0.5 / sa, -1.5 / sb, 1.5 / sb]
    assert torch.allclose(adv, torch.tensor(want), atol=1e-6)


def test_grpo_advantage_no_std_and_eps_and_singleton():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 7.0])
    g = [0, 0, 1, 1, 2]
    adv = algos.compute_advantage("grpo", r, g, norm_std=False)
    assert adv.tolist() == [-1.0, 1.0, 0.0, 0.0, 0.0]  # singleton group -> 0
    adv = algos.compute_advantage("grpo", r, g, norm_std=True, eps=1e-6)
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0  # zero-variance group: 0 / (0 + eps)
    assert adv[0].item() == pytest.approx(-1 / (math.sqrt(2) + 1e-6), rel=1e-6)


def test_rloo_advantage():
    adv = algos.compute_advantage("rloo", torch.tensor([1.0, 0.0, 0.0]), [0, 0, 0])
    assert torch.allclose(adv, torch.tensor([1.0, -0.5, -0.5]))


def test_zero_variance_filter():
    keep = algos.nonzero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5]), ["x", "x", "y", "y", "z"])
    assert keep.tolist() == [False, False, True, True, False]


def test_clipped_policy_loss_separate_low_high():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 2.0]]))  # ratios
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    per_token, m = algos.policy_loss("clip", logp, old, adv, mask, clip_low=0.2, clip_high=0.28)
    loss = algos.masked_sum(per_token, mask)
    # tok0: A=1, ratio 1.5 -> min(1.5, 1.28) = 1.28 -> loss -1.28 (clipped)
    # tok1: A=-1, ratio 0.5 -> -max... per token max(0.5, 0.8) = 0.8 (clipped at 1 - 0.2)
    # tok2: A=1, ratio 1.1 -> -1.1 (unclipped); tok3 masked
    assert loss.item() == pytest.approx(-1.28 + 0.8 - 1.1, abs=1e-6)
    assert m["clipfrac_sum"].item() == 2.0
    assert m["ppo_kl_sum"].item() == pytest.approx(-(math.log(1.5) + math.log(0.5) + math.log(1.1)), abs=1e-6)


def test_policy_loss_gradient_is_advantage_at_ratio_one():
    logp = torch.zeros(1, 3, requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    per_token, _ = algos.policy_loss("clip", logp, torch.zeros(1, 3), adv, torch.ones(1, 3))
    per_token.sum().backward()
    assert torch.allclose(logp.grad, -adv)


def test_low_var_kl_k3():
    logp = torch.tensor([0.0, math.log(0.5), -1.0])
    ref = torch.tensor([0.0, 0.0, -2.0])
    kl = algos.kl_penalty("low_var_kl", logp, ref)
    # d = ref - logp: 0, log 2, -1 -> e^d - d - 1
    want = [0.0, 2 - math.log(2) - 1, math.exp(-1) + 1 - 1]
    assert torch.allclose(kl, torch.tensor(want), atol=1e-6)
    assert algos.kl_penalty("k3", logp, ref).equal(kl)
    assert torch.allclose(algos.kl_penalty("k1", logp, ref), logp - ref)


def test_entropy_and_logprobs():
    """The one implementation (megatron/vocab_parallel.py) on a hand-computed case, at TP 1 (no group)."""
    from mgs_megatron.megatron.vocab_parallel import token_logprobs

    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    lp, ent = token_logprobs(logits, torch.tensor([[1, 0]]), vocab_size=2, group=False, vocab_start=0)
    assert ent[0, 0].item() == pytest.approx(math.log(2))
    p = torch.tensor([0.75, 0.25])
    assert ent[0, 1].item() == pytest.approx(float(-(p * p.log()).sum()), abs=1e-6)
    assert torch.allclose(lp, torch.tensor([[math.log(0.5), math.log(0.75)]]))


def test_loss_agg_modes_by_hand():
    """Two micro-batches of one step; the step's loss is sum(num) / sum(count) in every mode. By hand:
    sequences a = [1, 2, 3], b = [4], c = [5, 7] (a padding row has no tokens and must not count)."""
    x1 = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    m1 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    x2 = torch.tensor([[5.0, 7.0, 9.0], [9.0, 9.0, 9.0]])
    m2 = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # second row: padding
    want = {"token-mean": (1 + 2 + 3 + 4 + 5 + 7) / 6,
            "seq-mean-token-mean": (2 + 4 + 6) / 3,
            "seq-mean-token-sum": (6 + 4 + 12) / 3,
            "seq-mean-token-sum-norm": (6 + 4 + 12) / 3 / 5}  # horizon 5
    for mode, value in want.items():
        (n1, c1), (n2, c2) = algos.loss_terms(x1, m1, mode, 5), algos.loss_terms(x2, m2, mode, 5)
        assert ((n1 + n2) / (c1 + c2)).item() == pytest.approx(value), mode
        assert algos.agg_loss(torch.cat([x1, x2]), torch.cat([m1, m2]), mode, 5).item() == pytest.approx(value)
    with pytest.raises(ValueError, match="unknown loss_agg_mode"):
        algos.loss_terms(x1, m1, "token-sum")


def test_registry_errors():
    with pytest.raises(KeyError, match="unknown advantage estimator 'nope'"):
        algos.compute_advantage("nope", torch.zeros(2), [0, 0])
    with pytest.raises(KeyError, match="KL estimator"):
        algos.kl_penalty("bad", torch.zeros(1), torch.zeros(1))
