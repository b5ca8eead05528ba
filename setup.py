"""Build script for grpo_kernels.

torch and triton are runtime requirements only. Install torch yourself first with the
build that matches your machine (a CPU build on CPU-only machines), so that pip never
resolves `torch` from the index and pulls CUDA wheels onto a machine without a GPU.
"""
from setuptools import find_packages, setup

TEST = ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "trl>=0.24", "transformers>=4.46"]
BENCH = ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4"]

setup(
    name="grpo_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for GRPO: log-probs, group advantages and the clipped surrogate + KL loss",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo_kernels", "grpo_kernels.*"]),
    install_requires=[
        "torch>=2.6",
        "triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "numpy",
        "tqdm>=4.60",
        "transformers>=4.46",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": TEST,
        "bench": BENCH,
        "gpu": ["flash-attn>=2.6"],
        "trl": ["trl>=0.24"],
        "dev": TEST + BENCH,
    },
    entry_points={"console_scripts": ["grpo-kernels-train=grpo_kernels.train:main"]},
)
