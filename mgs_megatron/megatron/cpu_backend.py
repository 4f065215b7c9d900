"""Run Megatron-Core's real code on CPU (gloo) when CUDA is absent.

Megatron-Core is hard-wired to CUDA in many places (device='cuda' literals, torch.cuda.current_device(), the CUDA
RNG tracker, streams/events, 'torch.cuda.*Tensor' type strings; `python -m mgs_megatron.megatron.cpu_backend`
lists what is patched). This one module patches those at runtime -- no edits to installed packages -- so that
tests and the tiny main job exercise Megatron's own DDP, distributed optimizer and pipeline schedules on CPU.

It is never activated implicitly: call `activate()` (the launcher does so for `device: cpu`). It refuses to run on
a machine with a usable GPU unless forced, and `patched()` reports what it changed.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types

import torch

_PATCHES: list[str] = []
_ORIGINALS: dict[tuple[object, str], object] = {}
_ACTIVE = False

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "eye", "linspace",
    "empty_strided", "frombuffer",
)
_NEW_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def is_active() -> bool:
    return _ACTIVE


def patched() -> list[str]:
    """What the backend changed, one line per patch (empty when inactive)."""
    return list(_PATCHES)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)  # bare index means a CUDA ordinal


def _cpu(device):
    return torch.device("cpu") if _is_cuda_device(device) else device


def _set(owner, name: str, value, note: str) -> None:
    _ORIGINALS.setdefault((owner, name), getattr(owner, name, None))
    setattr(owner, name, value)
    _PATCHES.append(note)


def _device_kwarg_wrapper(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _tensor_to(orig):
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and (isinstance(args[0], (str, torch.device)) or type(args[0]) is int):
            args = (_cpu(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return orig(self, *args, **kwargs)

    return to


def _tensor_type(orig):
    # Megatron checks param.type() == 'torch.cuda.FloatTensor'; report CPU tensors under CUDA names.
    @functools.wraps(orig)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return orig(self, *args, **kwargs)
        name = orig(self)
        return name.replace("torch.", "torch.cuda.", 1) if name.startswith("torch.") and ".cuda." not in name else name

    return type_


class _Stream:
    def __init__(self, *args, **kwargs):
        self.device = torch.device("cpu")

    def wait_stream(self, *args, **kwargs): ...
    def wait_event(self, *args, **kwargs): ...
    def record_event(self, event=None):
        return event or _Event()
    def synchronize(self): ...
    def query(self):
        return True


class _Event:
    def __init__(self, *args, **kwargs): ...
    def record(self, *args, **kwargs): ...
    def wait(self, *args, **kwargs): ...
    def synchronize(self): ...
    def query(self):
        return True
    def elapsed_time(self, other):
        return 0.0


def _noop_factory():
    # A distinct function per patch: torch._dynamo's trace rules reject one object under several torch names.
    def noop(*args, **kwargs):
        return None

    return noop


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _refresh_device_constructors() -> None:
    # `with torch.device("meta"):` routes only functions found in this lru-cached set; if it were first built
    # after patching it would hold our wrappers, the mode would miss the real factories they call, and
    # e.g. transformers' meta-device loading would leave non-persistent buffers (rotary inv_freq) uninitialised.
    from torch.utils import _device

    _device._device_constructors.cache_clear()
    _device._device_constructors()


def _patch_torch() -> None:
    _refresh_device_constructors()  # built from the real factories, before any is wrapped
    cuda = torch.cuda
    _set(cuda, "current_device", lambda: "cpu", "torch.cuda.current_device -> 'cpu'")
    _set(cuda, "synchronize", _noop_factory(), "torch.cuda.synchronize -> no-op")
    _set(cuda, "empty_cache", _noop_factory(), "torch.cuda.empty_cache -> no-op")
    _set(cuda, "set_device", _noop_factory(), "torch.cuda.set_device -> no-op")
    _set(cuda, "Stream", _Stream, "torch.cuda.Stream -> dummy stream")
    _set(cuda, "Event", _Event, "torch.cuda.Event -> dummy event")
    stream = _Stream()
    _set(cuda, "current_stream", lambda *a, **k: stream, "torch.cuda.current_stream -> dummy stream")
    _set(cuda, "default_stream", lambda *a, **k: stream, "torch.cuda.default_stream -> dummy stream")
    _set(cuda, "stream", lambda *a, **k: contextlib.nullcontext(), "torch.cuda.stream -> nullcontext")
    _set(cuda, "set_stream", _noop_factory(), "torch.cuda.set_stream -> no-op")
    _set(cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state(), "torch.cuda.get_rng_state -> CPU generator")
    _set(cuda, "set_rng_state", lambda s, *a, **k: torch.set_rng_state(s), "torch.cuda.set_rng_state -> CPU generator")
    _set(cuda, "manual_seed", lambda seed: torch.default_generator.manual_seed(int(seed)),
         "torch.cuda.manual_seed -> CPU generator")
    _set(cuda, "manual_seed_all", _noop_factory(),
         "torch.cuda.manual_seed_all -> no-op (torch.manual_seed seeds the CPU)")
    _set(cuda.random, "get_rng_state", lambda *a, **k: torch.get_rng_state(), "torch.cuda.random.get_rng_state -> CPU")
    _set(cuda, "memory_allocated", lambda *a, **k: 0, "torch.cuda.memory_allocated -> 0")
    _set(cuda, "max_memory_allocated", lambda *a, **k: 0, "torch.cuda.max_memory_allocated -> 0")
    _set(cuda, "memory_stats", lambda *a, **k: {}, "torch.cuda.memory_stats -> {}")
    nvtx = types.SimpleNamespace(range_push=_noop_factory(), range_pop=_noop_factory(), mark=_noop_factory(),
                                 range=lambda *a, **k: contextlib.nullcontext())
    _set(cuda, "nvtx", nvtx, "torch.cuda.nvtx -> no-ops")
    for name in _FACTORIES:
        _set(torch, name, _device_kwarg_wrapper(getattr(torch, name)), f"torch.{name}(device='cuda') -> cpu")
    for name in _NEW_METHODS:
        _set(torch.Tensor, name, _device_kwarg_wrapper(getattr(torch.Tensor, name)), f"Tensor.{name} -> cpu")
    _set(torch.Tensor, "to", _tensor_to(torch.Tensor.to), "Tensor.to('cuda') -> cpu")
    _set(torch.Tensor, "cuda", lambda self, *a, **k: self, "Tensor.cuda -> identity")
    _set(torch.Tensor, "pin_memory", lambda self, *a, **k: self, "Tensor.pin_memory -> identity")
    _set(torch.Tensor, "type", _tensor_type(torch.Tensor.type), "Tensor.type() -> 'torch.cuda.*' names")


def _patch_megatron() -> None:
    """Patch module-level helpers of megatron.core that bypass torch.cuda's public API."""
    from megatron.core.tensor_parallel import random as mrandom

    _set(mrandom, "_get_cuda_rng_state", _get_rng_state, "megatron _get_cuda_rng_state -> CPU generator")
    _set(mrandom, "_set_cuda_rng_state", _set_rng_state, "megatron _set_cuda_rng_state -> CPU generator")


def activate(force: bool = False) -> list[str]:
    """Patch torch/Megatron so Megatron-Core runs on CPU. Idempotent; returns the list of patches."""
    global _ACTIVE
    if _ACTIVE:
        return patched()
    if torch.cuda.is_available() and not force:
        raise RuntimeError(
            "cpu_backend.activate(): a CUDA device is available; refusing to redirect CUDA to CPU on a GPU machine "
            "(set device: cuda, or pass force=True)."
        )
    _patch_torch()
    _patch_megatron()
    _ACTIVE = True
    return patched()


def deactivate() -> None:
    """Undo every patch (for tests that need a clean torch)."""
    global _ACTIVE
    for (owner, name), value in reversed(list(_ORIGINALS.items())):
        setattr(owner, name, value)
    _ORIGINALS.clear()
    _PATCHES.clear()
    _refresh_device_constructors()
    _ACTIVE = False


__all__ = ["activate", "deactivate", "is_active", "patched"]
if __name__ == "__main__":  # python -m mgs_megatron.megatron.cpu_backend: list the patches
    print("\n".join(activate()), file=sys.stdout)
