"""grpo_kernels: fused kernels for GRPO log-probs, group advantages and the clipped surrogate + KL loss.

Public API:
    GRPOLossConfig, GRPOLoss, grpo_loss, grpo_loss_from_logprobs, selective_logprobs, group_advantages,
    FusedLinearGRPOLoss, fused_linear_grpo_loss, fused_linear_selective_logprobs,
    GRPOLossOutput, AdvantageOutput, BackendUnavailableError, available_backends.
"""
from .config import GRPOLossConfig
from .advantages import group_advantages
from .losses import grpo_loss, grpo_loss_from_logprobs, selective_logprobs
from .fused_linear import fused_linear_grpo_loss, fused_linear_selective_logprobs
from .modules import FusedLinearGRPOLoss, GRPOLoss
from .ops.dispatch import BACKENDS, BackendUnavailableError, why_unavailable
from .outputs import AdvantageOutput, GRPOLossOutput

__version__ = "0.1.0"


def available_backends(device="cpu"):
    """The backends that can run on tensors on `device` right now, in the order torch, triton, cuda, cpp.

    For CPU tensors: ['torch', 'cpp'] where the C++ extension is built, ['torch'] where it is
    not, and 'triton' too under TRITON_INTERPRET=1. For available_backends("cuda") on a GPU
    machine: ['torch', 'triton', 'cuda'] with triton installed and the CUDA extension built.
    Why one is missing: grpo_kernels.ops.dispatch.why_unavailable(name, torch.device(device)).
    """
    import torch

    device = torch.device(device)
    return [name for name in BACKENDS[1:] if why_unavailable(name, device) is None]


__all__ = [
    "GRPOLossConfig", "GRPOLoss", "grpo_loss", "grpo_loss_from_logprobs", "selective_logprobs", "group_advantages",
    "FusedLinearGRPOLoss", "fused_linear_grpo_loss", "fused_linear_selective_logprobs",
    "GRPOLossOutput", "AdvantageOutput", "BackendUnavailableError", "available_backends", "__version__",
]
