"""Independent plain-torch references and a small fused Llama-style layout for the surgery tests."""
import torch

from mgs_megatron.surgery import ParamLayout, domain_orders, fused_gate_up_blocks, fused_qkv_blocks, module_key


def pcgrad_reference(gs, order):
    """The reference implementation's per-tensor loop: materialise each projected gradient, project against the
    ORIGINAL g_j in the given order, with per-pair dots as Python floats, and sum."""
    out = torch.zeros_like(gs[0])
    for i in range(len(gs)):
        gi = gs[i].clone()
        for j in order[i].tolist():
            dot = torch.dot(gi, gs[j]).item()
            nj = torch.dot(gs[j], gs[j]).item()
            if dot < 0 and nj > 0:
                gi -= dot / nj * gs[j]
        out += gi
    return out


def order_for(name, K, seed, step):
    return domain_orders(seed, step, torch.tensor([module_key(name)]), K)[0]


def llama_layouts(layers=2, hidden=8, heads=4, groups=2, head_dim=2, ffn=6, vocab=10, tp=1, bias=False):
    """Megatron-style local (TP-rank) layouts of a tiny Llama/Qwen2 stack with fused qkv and fc1 views."""
    hpg = heads // groups
    out = [ParamLayout("embedding.word_embeddings.weight", (vocab // tp, hidden), None,
                       ((0, vocab // tp, "model.embed_tokens.weight"),))]
    for i in range(layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv_rows = (groups // tp) * (hpg + 2) * head_dim
        names = [hf + f"self_attn.{p}_proj.weight" for p in "qkv"]
        out.append(ParamLayout(mc + "self_attention.linear_qkv.layer_norm_weight", (hidden,), i,
                               ((0, hidden, hf + "input_layernorm.weight"),)))
        out.append(ParamLayout(mc + "self_attention.linear_qkv.weight", (qkv_rows, hidden), i,
                               fused_qkv_blocks(*names, groups // tp, hpg, head_dim)))
        if bias:
            bn = [hf + f"self_attn.{p}_proj.bias" for p in "qkv"]
            out.append(ParamLayout(mc + "self_attention.linear_qkv.bias", (qkv_rows,), i,
                                   fused_qkv_blocks(*bn, groups // tp, hpg, head_dim)))
        out.append(ParamLayout(mc + "self_attention.linear_proj.weight", (hidden, heads * head_dim // tp), i,
                               ((0, hidden, hf + "self_attn.o_proj.weight"),)))
        out.append(ParamLayout(mc + "mlp.linear_fc1.layer_norm_weight", (hidden,), i,
                               ((0, hidden, hf + "post_attention_layernorm.weight"),)))
        out.append(ParamLayout(mc + "mlp.linear_fc1.weight", (2 * ffn // tp, hidden), i,
                               fused_gate_up_blocks(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight",
                                                    ffn // tp)))
        out.append(ParamLayout(mc + "mlp.linear_fc2.weight", (hidden, ffn // tp), i,
                               ((0, hidden, hf + "mlp.down_proj.weight"),)))
    out.append(ParamLayout("decoder.final_layernorm.weight", (hidden,), None, ((0, hidden, "model.norm.weight"),)))
    out.append(ParamLayout("output_layer.weight", (vocab // tp, hidden), None, ((0, vocab // tp, "lm_head.weight"),)))
    return out


def element_modules(layouts, granularity):
    """Independent element -> module map of a packed buffer: {module: LongTensor of flat indices}."""
    idx, off = {}, 0
    for lay in layouts:
        rs = lay.numel // lay.shape[0]
        for r0, r1, hf in lay.blocks:
            name = {"parameter": hf, "mcore-parameter": lay.name, "global": "global",
                    "layer": f"layer.{lay.layer}" if lay.layer is not None else hf}[granularity]
            idx.setdefault(name, []).append(torch.arange(off + r0 * rs, off + r1 * rs))
        off += lay.numel
    return {k: torch.cat(v) for k, v in idx.items()}
