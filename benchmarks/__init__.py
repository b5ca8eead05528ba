"""Benchmarks of grpo_kernels against the reference PyTorch implementation and the peers (see run.py)."""
