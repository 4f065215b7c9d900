"""Parameter layouts: which rows of a (possibly fused) parameter belong to which Hugging Face tensor.

A `ParamLayout` is framework-agnostic. `name` is the parameter's own name (e.g. the Megatron name
"decoder.layers.3.self_attention.linear_qkv.weight"), `blocks` split dim 0 into row ranges, each owned by one
Hugging Face tensor ("model.layers.3.self_attn.q_proj.weight"). For 1-D parameters rows are elements. Names must
be unique across the whole model (use *global* layer numbers under pipeline parallelism), because module names
are derived from them and every rank must agree on them.

With tensor parallelism a rank's local shard of a fused tensor uses the same HF names: the module is the whole HF
tensor across all TP shards and query groups; partial Grams from every shard add up to its Gram.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Optional, Tuple

GRANULARITIES = ("parameter", "mcore-parameter", "layer", "global")

Block = Tuple[int, int, str]  # (row_start, row_end, hf_tensor_name)


@dataclass(frozen=True)
class ParamLayout:
    name: str
    shape: Tuple[int, ...]
    layer: Optional[int] = None
    blocks: Tuple[Block, ...] = ()  # empty -> one block covering all rows, named `name`

    def __post_init__(self):
        shape = tuple(int(s) for s in self.shape)
        object.__setattr__(self, "shape", shape)
        if len(shape) == 0:
            raise ValueError(f"parameter {self.name!r}: 0-d parameters are not supported; reshape to (1,)")
        if any(s < 0 for s in shape):
            raise ValueError(f"parameter {self.name!r}: negative dimension in shape {shape}")
        blocks = tuple((int(a), int(b), str(n)) for a, b, n in self.blocks) or ((0, shape[0], self.name),)
        object.__setattr__(self, "blocks", blocks)
        row = 0
        for a, b, n in blocks:  # blocks must tile dim 0 in order: a gap would leave rows without a module
            if a != row or b < a:
                raise ValueError(f"parameter {self.name!r}: blocks must tile rows 0..{shape[0]} in order; "
                                 f"block {n!r} is [{a}, {b}) but row {row} is next")
            row = b
        if row != shape[0]:
            raise ValueError(f"parameter {self.name!r}: blocks cover rows 0..{row}, shape has {shape[0]} rows")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def row_numel(self) -> int:
        return self.numel // self.shape[0] if self.shape[0] else 0


def fused_qkv_blocks(q_name: str, k_name: str, v_name: str, num_query_groups_local: int,
                     heads_per_group: int, head_dim: int) -> Tuple[Block, ...]:
    """Blocks of Megatron's fused `linear_qkv` (weight or bias) on one TP shard.

    Rows are laid out per query group: heads_per_group*head_dim q rows, head_dim k rows, head_dim v rows.
    """
    out, row = [], 0
    for _ in range(num_query_groups_local):
        for name, n in ((q_name, heads_per_group * head_dim), (k_name, head_dim), (v_name, head_dim)):
            out.append((row, row + n, name))
            row += n
    return tuple(out)


def fused_gate_up_blocks(gate_name: str, up_name: str, ffn_local: int) -> Tuple[Block, ...]:
    """Blocks of Megatron's fused `linear_fc1` (SwiGLU) on one TP shard: [gate_shard; up_shard]."""
    return ((0, ffn_local, gate_name), (ffn_local, 2 * ffn_local, up_name))


_LAYER_RE = re.compile(r"(?:^|\.)layers?\.(\d+)(?:\.|$)")


def module_layer(name: str) -> Optional[int]:
    """Layer index parsed from a name ("model.layers.3.mlp..." or "layer.3"), None if there is none."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """Short type for summaries: "...q_proj.weight" -> "q_proj", "...q_proj.bias" -> "q_proj.bias",
    "layer.3" -> "layer", "global" -> "global", "model.embed_tokens.weight" -> "embed_tokens"."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] == "layer" and parts[1].isdigit():
        return "layer"
    if len(parts) >= 2 and parts[-1] == "weight":
        return parts[-2]
    if len(parts) >= 2 and parts[-1] == "bias":
        return parts[-2] + ".bias"
    return parts[-1]


def module_key(name: str) -> int:
    """Stable 63-bit key of a module name (blake2b), identical on every rank, process and layout.

    Used for the random PCGrad order and for rule state, so different parallel layouts (which list modules
    differently) draw the same order for the same module.
    """
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


def module_name(layout: ParamLayout, hf_name: str, granularity: str) -> str:
    """Module that a block of `layout` belongs to at `granularity`.

    parameter -> the HF tensor name of the block; mcore-parameter -> layout.name;
    layer -> "layer.{i}", or the HF tensor name for parameters outside the layer stack (embed_tokens, final norm,
    lm_head each are their own module); global -> "global".
    """
    if granularity == "parameter":
        return hf_name
    if granularity == "mcore-parameter":
        return layout.name
    if granularity == "layer":
        return f"layer.{layout.layer}" if layout.layer is not None else hf_name
    if granularity == "global":
        return "global"
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
