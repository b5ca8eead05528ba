"""nn.Module forms of the losses, for trainers that swap a module in."""
from __future__ import annotations

from typing import Optional

import torch

from .config import GRPOLossConfig
from .losses import grpo_loss
from .fused_linear import fused_linear_grpo_loss
from .outputs import GRPOLossOutput


class GRPOLoss(torch.nn.Module):
    """`grpo_loss` with a fixed config and backend: `GRPOLoss(config)(logits, ids, advantages, ...)`.

    Shapes, the (B, 1) advantages and the empty batch (loss 0, zero gradients) as in `grpo_loss`.
    """

    def __init__(self, config: Optional[GRPOLossConfig] = None, *, backend: str = "auto", **overrides):
        super().__init__()
        base = config if config is not None else GRPOLossConfig()
        if not isinstance(base, GRPOLossConfig):
            raise TypeError(f"config must be a GRPOLossConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides)
        self.backend = backend

    def forward(self, logits, ids, advantages, **kwargs) -> GRPOLossOutput:
        kwargs.setdefault("backend", self.backend)
        return grpo_loss(logits, ids, advantages, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, backend={self.backend!r}"


class FusedLinearGRPOLoss(torch.nn.Module):
    """`fused_linear_grpo_loss` as a module: `loss_fn(hidden, lm_head.weight, ids, advantages, ...)`.

    Swap it in where a trainer computed `grpo_loss(lm_head(hidden), ...)`: same numbers, the
    logits are never materialised whole. Shapes, the (B, 1) advantages and the empty batch (loss 0,
    zero gradients) as in `fused_linear_grpo_loss`.
    """

    def __init__(self, config: Optional[GRPOLossConfig] = None, *, backend: str = "auto", chunk_size="auto",
                 **overrides):
        super().__init__()
        base = config if config is not None else GRPOLossConfig()
        if not isinstance(base, GRPOLossConfig):
            raise TypeError(f"config must be a GRPOLossConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides)
        self.backend, self.chunk_size = backend, chunk_size

    def forward(self, hidden, weight, ids, advantages, **kwargs) -> GRPOLossOutput:
        kwargs.setdefault("backend", self.backend)
        kwargs.setdefault("chunk_size", self.chunk_size)
        return fused_linear_grpo_loss(hidden, weight, ids, advantages, config=self.config, **kwargs)

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, backend={self.backend!r}, chunk_size={self.chunk_size!r}"
