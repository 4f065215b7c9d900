"""MGS in verl 0.9.1's Megatron engine: `train_batch` runs one forward-backward per domain (`data["data_source"]`)
and the surgery before the optimizer step, through the same entry point as our trainer (`mgs_train_step`).

Enable it from the verl config (every worker imports the module through `external_lib`, which registers the
engine below for verl's ("language_model", "megatron") slot; without an `mgs` entry it is verl's engine, unchanged):

    actor_rollout_ref:
      model:
        external_lib: mgs_megatron.integrations.verl
      actor:
        megatron:
          override_transformer_config:
            mgs: {domains: [math, code, ifeval], rule: pcgrad, granularity: parameter}

`mgs` takes surgery.SurgeryConfig's keys (rule, granularity, seed, eps, ...) plus `domains`: every data_source that
may appear, in the order every rank enters them. What verl's own step means is kept: the loss is normalised by
the whole mini-batch's token count (verl's `batch_num_tokens`, all-reduced over DP), not a domain's, so rule "sum"
is verl's step; each domain's rows go through verl's own `forward_backward_batch` (its micro-batching, its loss,
its schedule), and every DP rank enters every domain that any rank has: a rank without rows of a domain runs one
micro-batch of rows whose loss masks are zero (verl's per-call collectives must match), which adds nothing to the
gradient; with dynamic batch sizes each rank gets at least as many rows of a domain as the busiest rank has (verl
makes the same number of micro-batches on every DP rank), padded with such rows. Losses must mask their tokens
with `loss_mask` / `response_mask` (verl's sft and ppo losses do).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from mgs_megatron.devices import collective_device
from mgs_megatron.megatron.domain_step import mgs_train_step
from mgs_megatron.surgery import SurgeryConfig

MASK_KEYS = ("loss_mask", "response_mask")


def mgs_settings(engine_config) -> Optional[dict]:
    """Take the `mgs` entry out of override_transformer_config (TransformerConfig would refuse the key)."""
    overrides = engine_config.override_transformer_config
    if overrides is None or "mgs" not in overrides:
        return None
    settings = dict(overrides.pop("mgs"))
    if not settings.get("domains"):
        raise ValueError("override_transformer_config.mgs: set `domains` (every data_source, in a fixed order)")
    return settings


def _labels(data) -> list[str]:
    if "data_source" not in data.keys():
        raise ValueError("MGS needs each row's domain: the batch has no `data_source` entry")
    ds = data["data_source"]
    return [str(x) for x in (ds.tolist() if hasattr(ds, "tolist") else ds)]


def _rows(data, real: list[int], pad: int):
    """The batch's rows `real`, plus `pad` copies of its first row whose loss masks are zeroed (padding to whole
    micro-batches, or a rank's share of a domain it has no rows of): they add nothing to any gradient."""
    from verl.utils import tensordict_utils as tu

    sub = tu.index_select_tensor_dict(data, real + [0] * pad)
    if pad:
        for key in MASK_KEYS:
            if key in sub.keys():
                m = sub[key]
                parts = [t if i < len(real) else t * 0 for i, t in enumerate(m.unbind())]
                sub[key] = torch.nested.as_nested_tensor(parts, layout=torch.jagged) if m.is_nested else \
                    torch.stack(parts)
    return sub


def _global_tokens(data, group) -> float:
    m = data["loss_mask"]
    n = (m.values().sum() if m.is_nested else m.sum()).to(collective_device(group), torch.float64)
    dist.all_reduce(n, group=group)
    return float(n.item())


def _with_batch_tokens(loss_function: Callable, tokens: float, model_output, data, dp_group=None):
    """verl's loss with the WHOLE mini-batch's token count, as verl's own step computes it."""
    from verl.utils import tensordict_utils as tu

    tu.assign_non_tensor(data, batch_num_tokens=tokens)
    return loss_function(model_output=model_output, data=data, dp_group=dp_group)


def _merge(outputs: list[tuple[list[int], dict]], n_rows: int) -> dict:
    """Per-domain verl outputs -> one, rows of model_output back in the batch's order."""
    merged: dict[str, Any] = {"model_output": {}, "loss": [], "metrics": {}}
    rows: dict[str, list] = {}
    for index, out in outputs:
        if not out:
            continue
        merged["loss"] += out.get("loss", [])
        for k, v in out.get("metrics", {}).items():
            merged["metrics"].setdefault(k, []).extend(v if isinstance(v, list) else [v])
        for k, v in out.get("model_output", {}).items():
            slots = rows.setdefault(k, [None] * n_rows)
            for i, t in zip(index, v.unbind()):
                slots[i] = t
    for k, slots in rows.items():
        if all(t is not None for t in slots):
            merged["model_output"][k] = torch.nested.as_nested_tensor(slots, layout=torch.jagged)
    return merged


def mgs_train_batch(engine, data, loss_function: Callable, forward_backward_batch: Callable) -> dict:
    """verl's train_batch under MGS (every rank calls): regroup rows by domain, one verl forward-backward per
    domain, the surgery, the optimizer step. Returns verl's output dict (grad_norm in its metrics)."""
    from verl.utils import tensordict_utils as tu

    mgs, group = engine.mgs, engine.get_data_parallel_group()
    labels = _labels(data)
    tokens = _global_tokens(data, group)
    counts = torch.tensor([float(labels.count(d)) for d in mgs.domains], dtype=torch.float64,
                          device=collective_device(group))
    dist.all_reduce(counts, group=group, op=dist.ReduceOp.MAX)  # the domains some rank has: every rank enters them
    dynamic = tu.get_non_tensor_data(data, key="use_dynamic_bsz", default=True)
    mbs = 1 if dynamic else int(tu.get_non_tensor_data(data, key="micro_batch_size_per_gpu", default=1))
    most = dict(zip(mgs.domains, (int(c) for c in counts.tolist())))
    outputs: list = []

    def collate(indices: list[int]):
        return indices  # a domain's rows, as indices into the batch

    def run(groups: list) -> list:
        (index,) = groups
        real = [i for i in index if i >= 0]
        domain = labels[real[0]] if real else missing[-1 - index[0]]
        if dynamic:  # verl makes as many micro-batches on every DP rank as on the busiest: enough rows for them
            pad = max(most[domain] - len(real), 0)
        else:  # whole micro-batches; a rank without rows of the domain runs one
            pad = (-len(real)) % mbs if real else mbs
        out = forward_backward_batch(_rows(data, real, pad), partial(_with_batch_tokens, loss_function, tokens))
        outputs.append((real, out))
        return [out]

    missing = [d for d in mgs.domains if most[d] > 0 and d not in labels]
    samples = list(range(len(data))) + [-1 - j for j in range(len(missing))]  # placeholders: masked rows only
    flat = labels + missing
    res = mgs_train_step(engine.module, engine.optimizer, samples, flat, run, mgs=mgs, split=None,
                         collate=collate, micro_batch_size=len(samples))
    if not res.update_ok:
        raise RuntimeError("Megatron optimizer step failed (non-finite gradient after the surgery)")
    merged = _merge(outputs, len(data))
    engine.last_surgery_stats = res.surgery_stats
    if engine.is_mp_src_rank_with_outputs():
        merged["metrics"]["grad_norm"] = res.grad_norm
    return merged


def _register():
    from verl.utils.device import get_device_name, get_vendor
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.megatron.transformer_impl import MegatronEngineWithLMHead

    @EngineRegistry.register(model_type="language_model", backend="megatron", device=get_device_name(),
                             vendor=get_vendor())
    class MGSMegatronEngine(MegatronEngineWithLMHead):
        """verl's MegatronEngineWithLMHead; with `override_transformer_config.mgs` set, train_batch runs MGS."""

        def __init__(self, model_config, engine_config, *args, **kwargs):
            self.mgs_settings = mgs_settings(engine_config)
            self.mgs = None
            super().__init__(model_config, engine_config, *args, **kwargs)

        def initialize(self):
            super().initialize()
            if self.mgs_settings is not None:
                self.mgs = build_mgs(self, self.mgs_settings)

        def train_batch(self, data, loss_function):
            if self.mgs is None:
                return super().train_batch(data, loss_function)
            from verl.utils.tensordict_utils import maybe_fix_3d_position_ids

            maybe_fix_3d_position_ids(data)
            self.optimizer_zero_grad()
            return mgs_train_batch(self, data, loss_function, partial(self.forward_backward_batch,
                                                                      forward_only=False))

    return MGSMegatronEngine


def build_mgs(engine, settings: dict):
    """ModularGradientSurgery over the engine's DDP chunks and Megatron optimizer (after its initialize())."""
    from mgs_megatron.megatron.mgs import ModularGradientSurgery
    from mgs_megatron.models import model_config_from_hf

    settings = dict(settings)
    domains = tuple(str(d) for d in settings.pop("domains"))
    hf = engine.model_config.hf_config
    model_cfg = model_config_from_hf(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf))
    return ModularGradientSurgery(list(engine.module), engine.optimizer, SurgeryConfig(**settings), domains,
                                  model_config=model_cfg)


MGSMegatronEngine = _register()

__all__ = ["MGSMegatronEngine", "build_mgs", "mgs_settings", "mgs_train_batch"]
