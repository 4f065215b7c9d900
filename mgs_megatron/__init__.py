"""mgs_megatron: Modular Gradient Surgery for multi-domain RL post-training on Megatron-Core.

`from mgs_megatron import MGSConfig, ModularGradientSurgery` is the Megatron plug-in; the framework-free core is
`mgs_megatron.surgery`.
"""

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package must not import Megatron
    if name in ("MGSConfig", "ModularGradientSurgery", "MGSError"):
        from mgs_megatron.megatron import mgs

        return getattr(mgs, name)
    raise AttributeError(f"module 'mgs_megatron' has no attribute {name!r}")


__all__ = ["MGSConfig", "ModularGradientSurgery", "MGSError", "__version__"]
