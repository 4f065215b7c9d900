"""Weights in and out of live Megatron models (every rank calls together): load and save the canonical format at
any TP/PP, export HF directories, and the HF-vs-Megatron logit check of a converted checkpoint.

  live    load_weights, save_weights, export_hf
  check   check_logits (HF forward in this process vs Megatron on spawned ranks)
"""

from mgs_megatron.weights.live import export_hf, load_weights, save_weights

__all__ = ["export_hf", "load_weights", "save_weights"]
