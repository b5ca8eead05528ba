"""Fused Triton kernels (being written)."""
raise ImportError("grpo_kernels triton kernels are not built yet")
