"""Megatron-LM's side of the interop tests: its own argument parser, vocabulary padding, model config and
`megatron.training.checkpointing.save_checkpoint / load_checkpoint` (megatron-core 0.19.2 ships them; 0.16.1
does not). Runs inside our gloo ranks (parallel_state is initialised by the harness).

What stops megatron.training on this machine as shipped, and what is done about it here (test side only):
  * Python 3.11: megatron/training/models/{gpt,hybrid}.py import `typing.override` (3.12) -> typing_extensions'.
  * save_checkpoint: its writer logs process memory with psutil, which megatron-core does not depend on (absent
    from .venv-mcore019) -> the log's memory probe returns 0.
  * save_checkpoint inside our daemonic test ranks: even a synchronous save starts a multiprocessing Manager
    for its results queue ("daemonic processes are not allowed to have children") -> a plain in-process queue
    (the writers are threads of the same process).
  * validate_args asks the GPU's architecture when TP > 1 (only to decide on CUDA_DEVICE_MAX_CONNECTIONS advice)
    -> answered as 10 on the CPU.
  * load_checkpoint needs the num-microbatches calculator that pretrain() would set up.
"""

from __future__ import annotations

import importlib.util

import torch

HAS_MEGATRON_TRAINING = importlib.util.find_spec("megatron.training") is not None
SKIP_REASON = "megatron.training (Megatron-LM's checkpointing) ships with megatron-core 0.19.2 only, not 0.16.1"


def _python311_shims() -> None:
    import typing

    if not hasattr(typing, "override"):
        import typing_extensions

        typing.override = typing_extensions.override


def argv_for(cfg, tp: int, pp: int, ckpt: str, vocab_size: int) -> list[str]:
    """Megatron-LM command-line arguments of a model with this ModelConfig (what a user passes to pretrain_gpt)."""
    a = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size, "--ffn-hidden-size", cfg.intermediate_size,
         "--num-attention-heads", cfg.num_attention_heads, "--group-query-attention", "--num-query-groups",
         cfg.num_key_value_heads, "--kv-channels", cfg.head_dim, "--max-position-embeddings",
         cfg.max_position_embeddings, "--seq-length", 16, "--position-embedding-type", "rope",
         "--no-position-embedding", "--rotary-base", int(cfg.rope_theta), "--normalization", "RMSNorm",
         "--norm-epsilon", cfg.rms_norm_eps, "--swiglu", "--disable-bias-linear", "--transformer-impl", "local",
         "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp, "--micro-batch-size", 1,
         "--vocab-size", vocab_size, "--ckpt-format", "torch_dist", "--save", ckpt, "--save-interval", 1,
         "--load", ckpt, "--no-load-optim", "--no-save-optim", "--no-load-rng", "--no-save-rng",
         "--attention-dropout", 0.0, "--hidden-dropout", 0.0, "--attention-softmax-in-fp32",
         "--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion", "--no-masked-softmax-fusion",
         "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm", "--use-cpu-initialization"]
    if cfg.qkv_bias:
        a.append("--add-qkv-bias")
    if cfg.qk_norm:
        a.append("--qk-layernorm")
    if not cfg.tie_word_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    return [str(x) for x in a]


def setup(cfg, ckpt: str) -> object:
    """Megatron-LM's global args for this model at the current layout, parsed and validated by Megatron-LM."""
    import sys

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _python311_shims()
    from megatron.core.num_microbatches_calculator import (
        init_num_microbatches_calculator,
        unset_num_microbatches_calculator,
    )
    from megatron.training import arguments, global_vars
    from megatron.training.arguments import parse_args, validate_args

    arguments.get_device_arch_version = lambda: 10  # no GPU to ask

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    saved = sys.argv
    sys.argv = ["pretrain_gpt.py"] + argv_for(cfg, tp, pp, ckpt, cfg.vocab_size)
    try:
        args = parse_args()
    finally:
        sys.argv = saved
    validate_args(args)
    global_vars._GLOBAL_ARGS = None
    global_vars.set_args(args)
    dp = ps.get_data_parallel_world_size()
    unset_num_microbatches_calculator()  # the previous call's (ranks are reused)
    init_num_microbatches_calculator(dist.get_rank(), None, dp, 1, dp)
    return args


def build_model(args) -> torch.nn.Module:
    """Megatron-LM's GPT model for `args` (pretrain_gpt's model provider with the local spec), vocabulary padded by
    Megatron-LM's rule (a multiple of make_vocab_size_divisible_by x TP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    config = core_transformer_config_from_args(args)
    vocab = calculate_padded_vocab_size(args.vocab_size, args.make_vocab_size_divisible_by,
                                        args.tensor_model_parallel_size, logging_enabled=False)
    return GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(
        qk_layernorm=args.qk_layernorm, normalization=args.normalization), vocab_size=vocab,
        max_sequence_length=args.max_position_embeddings, pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(), share_embeddings_and_output_weights=not
        args.untie_embeddings_and_output_weights, position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, parallel_output=True)


def _writer_shims() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if not fa.HAVE_PSUTIL:
        fa._process_memory = lambda: 0
    if fa._results_queue is None:
        fa._results_queue = queue.Queue()


def save(model, iteration: int) -> None:
    from megatron.training.checkpointing import save_checkpoint

    _writer_shims()
    save_checkpoint(iteration, [model], None, None, num_floating_point_operations_so_far=0)


def load(model) -> int:
    from megatron.training.checkpointing import load_checkpoint

    iteration, _ = load_checkpoint([model], None, None, strict=True)
    return iteration
