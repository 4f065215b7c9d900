"""Megatron -> vLLM weight sync: stream the live model through the converter into the running engine.

Every rank of the job calls `sync_weights` together (the exporter runs TP all-gathers and PP broadcasts, and the
external_launcher engines are SPMD). With all_ranks=True every rank receives full HF tensors and loads them
into its own engine; a rank without an engine (engine=None) still drives the exporter to the end.

Buckets: tensors are re-bucketed so that each `reload_weights` call carries only COMPLETE vLLM modules: vLLM's
layer-wise reload processes a layer once all of its parameters arrived in that call and restores layers the call
did not touch, but a layer given only part of its parameters in one call is left with garbage in the rest (seen:
Qwen2 q/k/v weights in one call and their biases in the next gave NaN logits). So q/k/v weights AND biases
(qkv_proj) and gate/up (gate_up_proj) travel together; a bucket is flushed once it holds >= bucket_bytes and
every module in it is complete. The sender holds about one bucket (plus at most one layer's pending module).

Tied embeddings: after the buckets, the tied lm_head is re-processed in the worker (on CPU vLLM packs a private
copy of it that a reload would otherwise leave stale; see engine._refresh_tied_lm_head).

Failure: the engine is marked invalid before the first bucket and valid only after every expected tensor was
loaded and the prefix cache reset; any exception (on any rank) leaves it invalid (generate() then raises
EngineInvalidError) and is re-raised as a RolloutError naming the bucket.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from typing import Iterator, Optional, Sequence

import torch

from mgs_megatron.devices import collective_device
from mgs_megatron.megatron.stream import iter_hf_weights
from mgs_megatron.models import hf_shapes
from mgs_megatron.rollout.config import RolloutError, SyncStats, dtype_of

log = logging.getLogger(__name__)

_FUSED = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.(weight|bias)$")


def module_key(hf_name: str) -> str:
    """The vLLM module an HF tensor loads into (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    m = _FUSED.search(hf_name)
    if m:
        fused = "qkv_proj" if m.group(1) in ("q_proj", "k_proj", "v_proj") else "gate_up_proj"
        return hf_name[:m.start()] + "." + fused
    return hf_name.rsplit(".", 1)[0]


def vllm_buckets(groups, model_cfg, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Regroup the exporter's groups into buckets of complete vLLM modules (see module doc)."""
    need: dict[str, int] = defaultdict(int)
    for name in hf_shapes(model_cfg):
        need[module_key(name)] += 1
    have: dict[str, int] = defaultdict(int)
    bucket, size = [], 0
    for group in groups:
        for name, t in group:
            bucket.append((name, t))
            size += t.numel() * t.element_size()
            have[module_key(name)] += 1
            if size >= bucket_bytes and all(have[k] == need[k] for k in {module_key(n) for n, _ in bucket}):
                yield bucket
                bucket, size = [], 0
    if bucket:
        yield bucket


def sync_weights(engine, chunks: Sequence[torch.nn.Module], model_cfg, *, bucket_bytes: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None, version: Optional[int] = None) -> SyncStats:
    """Stream the live Megatron model (this rank's chunks) into `engine` (a RolloutEngine or None)."""
    bucket_bytes = bucket_bytes or (engine.cfg.sync_bucket_bytes if engine is not None else 256 << 20)
    if dtype is None and engine is not None:
        dtype = dtype_of(engine.cfg.dtype)
    version = version if version is not None else (engine.version + 1 if engine is not None else 0)
    t0 = time.perf_counter()
    nbytes = nbuckets = 0
    loaded: set[str] = set()
    if engine is not None:
        engine.mark_invalid(f"weight sync to version {version} in progress")
    groups = iter_hf_weights(chunks, model_cfg, max_bytes=bucket_bytes, all_ranks=True, dtype=dtype)
    failure: Optional[BaseException] = None
    failed_at = 0
    for bucket in vllm_buckets(groups, model_cfg, bucket_bytes):  # always to the end: ranks share collectives
        nbuckets += 1
        if failure is not None or engine is None:
            continue
        try:
            engine.load_weights(bucket)
        except Exception as e:  # noqa: BLE001
            failure, failed_at = e, nbuckets
            log.error("weight sync bucket %d failed: %s", nbuckets, e)
            continue
        nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        loaded.update(n for n, _ in bucket)
    if engine is not None and failure is None:
        missing = set(hf_shapes(model_cfg)) - loaded
        try:
            if missing:
                raise RolloutError(f"{len(missing)} tensor(s) never arrived, e.g. {sorted(missing)[:3]}")
            if model_cfg.tie_word_embeddings:
                engine.refresh_tied_lm_head()
            engine.reset_prefix_cache()
        except Exception as e:  # noqa: BLE001
            failure, failed_at = e, nbuckets
    failure = _agree_on_failure(failure)
    if failure is not None:
        if engine is not None:
            engine.mark_invalid(f"weight sync to version {version} failed at bucket {failed_at} of {nbuckets}: "
                                f"{failure}")
        raise RolloutError(f"weight sync failed at bucket {failed_at} of {nbuckets}; engine marked invalid: "
                           f"{type(failure).__name__}: {failure}") from failure
    stats = SyncStats(version=version, bytes=nbytes, seconds=time.perf_counter() - t0, buckets=nbuckets,
                      tensors=len(loaded))
    if engine is not None:
        engine.mark_synced(version)
    log.info("weight sync v%d: %.1f MB in %.3fs (%d buckets, %d tensors, %.2f GB/s)", version, nbytes / 1e6,
             stats.seconds, nbuckets, len(loaded), stats.gb_per_s)
    return stats


def _agree_on_failure(failure: Optional[BaseException]) -> Optional[BaseException]:
    """If any rank failed, every rank fails (the SPMD engines must stay on the same weights version)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return failure
    flag = torch.tensor([1 if failure is not None else 0], device=collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item() and failure is None:
        return RolloutError("weight sync failed on another rank")
    return failure
