"""Framework-free MGS core (plain torch; knows nothing of Megatron).

Flow per step, per rank:
    segs = build_segments(pieces, granularity, module_names=global_names)   # once, at setup
    G = gram(segs, grads)               # grads: [K, N] or K flat shards; partial Grams -> all-reduce(SUM)
                                        # (long runs: one-pass torch.compile kernels, compiled.py; kernel="eager")
    W, nbad = weights_from_gram(rule, G, segs, step, domains, on_nonfinite)  # identical on every rank
    combine(segs, grads, W, out)        # out = sum_k W[m, k] g_k per run, one pass
    stats = surgery_stats(G, W, segs, domains)
Single process: apply_mgs(model, {domain: {name: grad}}, SurgeryConfig(...), step).
"""
from .api import MGS, apply_mgs, default_layout, weights_from_gram
from .config import SurgeryConfig
from .layout import (
                     GRANULARITIES,
                     ParamLayout,
                     fused_gate_up_blocks,
                     fused_qkv_blocks,
                     module_key,
                     module_layer,
                     module_name,
                     module_type,
)
from .passes import combine, gram
from .rules import RULES, GradVacRule, PCGradRule, Rule, SumRule, domain_orders, get_rule, register_rule
from .segments import Piece, Segments, build_segments, local_module_names, pieces_for_shard
from .stats import surgery_stats, surgery_tensors

__all__ = [
    "MGS", "apply_mgs", "default_layout", "weights_from_gram", "SurgeryConfig", "combine", "gram",
    "GRANULARITIES", "ParamLayout", "fused_gate_up_blocks", "fused_qkv_blocks", "module_key", "module_layer",
    "module_name", "module_type", "RULES", "GradVacRule", "PCGradRule", "Rule", "SumRule", "domain_orders",
    "get_rule", "register_rule", "Piece", "Segments", "build_segments", "local_module_names", "pieces_for_shard",
    "surgery_stats", "surgery_tensors",
]
