"""mgs_megatron: Modular Gradient Surgery for multi-domain RL post-training on Megatron-Core."""

__version__ = "0.1.0"
