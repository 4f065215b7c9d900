"""The multi-process harness for tests: `run_distributed(fn, Layout(tp=, pp=, dp=), ...)` (see megatron/launch.py,
which product code such as the converter's logit check uses too)."""

from mgs_megatron.megatron.launch import DistributedTestError, Layout, free_port, run_distributed

__all__ = ["DistributedTestError", "Layout", "free_port", "run_distributed"]
