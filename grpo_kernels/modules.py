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
    The sampler's truncation is part of the config: `GRPOLoss(top_p=0.8)` (docs/math.md "Truncated sampling").
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
        return f"loss_type={self.config.loss_type!r}, backend={self.backend!r}{_truncation_repr(self.config)}"


class FusedLinearGRPOLoss(torch.nn.Module):
    """`fused_linear_grpo_loss` as a module: `loss_fn(hidden, lm_head.weight, ids, advantages, ...)`.

    Swap it in where a trainer computed `grpo_loss(lm_head(hidden), ...)`: same numbers, the
    logits are never materialised whole. Shapes, the (B, 1) advantages and the empty batch (loss 0,
    zero gradients) as in `fused_linear_grpo_loss`. The sampler's truncation (`top_k`, `top_p`,
    `min_p`) is part of the config, as in `GRPOLoss`.
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
        return (f"loss_type={self.config.loss_type!r}, backend={self.backend!r}, chunk_size={self.chunk_size!r}"
                f"{_truncation_repr(self.config)}")


def _truncation_repr(config: GRPOLossConfig) -> str:
    """", top_p=0.8" and the like for the truncation settings that are on; "" when none is."""
    truncation = config.truncation
    on = [(name, getattr(truncation, name)) for name, off in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))
          if getattr(truncation, name) != off]
    return "".join(f", {name}={value!r}" for name, value in on)
