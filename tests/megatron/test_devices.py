"""Device decisions that can be checked on the CPU: fused kernels by device, micro-batch placement, GPU-node ranks,
NVML lookup by UUID, per-micro-batch padding that leaves real positions unchanged."""

import os

import torch

from mgs_megatron import devices
from mgs_megatron.megatron.model import fusion_flags
from mgs_megatron.megatron.schedule import pad_batches
from mgs_megatron.rl.metrics import nvml_uuid
from mgs_megatron.testing.harness import run_distributed


def test_fusions_only_on_gpu_and_only_with_their_kernels():
    assert not any(fusion_flags("cpu", te=True, apex_grad_accum=True).values())
    plain = fusion_flags("cuda", te=False, apex_grad_accum=False)
    assert plain["bias_activation_fusion"] and plain["bias_dropout_fusion"]
    assert not (plain["masked_softmax_fusion"] or plain["apply_rope_fusion"] or plain["gradient_accumulation_fusion"])
    assert fusion_flags("cuda", te=False, apex_grad_accum=True)["gradient_accumulation_fusion"]
    te = fusion_flags("cuda", te=True, apex_grad_accum=False)
    assert te["masked_softmax_fusion"] and te["apply_rope_fusion"] and te["gradient_accumulation_fusion"]


def test_to_compute_keeps_host_batches_on_the_cpu_backend():
    batch = {"tokens": torch.zeros(2, 3, dtype=torch.long), "n": 3}
    assert devices.compute_device() == devices.HOST and devices.to_compute(batch) is batch


def _visible_devices():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_cpu_ranks_hide_the_gpus():
    """On a GPU node the CPU backend refuses to start while CUDA is usable: CPU ranks run with no GPU visible."""
    assert run_distributed(_visible_devices, 2, timeout=60) == ["", ""]


def test_nvml_lookup_by_uuid():
    assert nvml_uuid("0f3b6c1e-1111-2222-3333-444455556666") == "GPU-0f3b6c1e-1111-2222-3333-444455556666"
    assert nvml_uuid("GPU-abc") == "GPU-abc" and nvml_uuid("MIG-abc") == "MIG-abc"


def test_pad_batches_pads_tokens_with_pad_and_masks_with_zero():
    b = {"tokens": torch.tensor([[1, 2]]), "targets": torch.tensor([[2, 3]]), "loss_mask": torch.tensor([[0.0, 1.0]]),
         "advantages": torch.tensor([[0.5, 0.5]])}
    (p,) = pad_batches([b], 4, pad=9)
    assert p["tokens"].tolist() == [[1, 2, 9, 9]] and p["targets"].tolist() == [[2, 3, 9, 9]]
    assert p["loss_mask"].tolist() == [[0.0, 1.0, 0.0, 0.0]] and p["advantages"].tolist() == [[0.5, 0.5, 0, 0]]
