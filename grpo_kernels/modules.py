"""nn.Module forms of the losses, for trainers that swap a module in."""
from __future__ import annotations

from typing import Optional

import torch

from .config import GRPOLossConfig
from .functional import grpo_loss
from .outputs import GRPOLossOutput


class GRPOLoss(torch.nn.Module):
    """`grpo_loss` with a fixed config and backend: `GRPOLoss(config)(logits, ids, advantages, ...)`."""

    def __init__(self, config: Optional[GRPOLossConfig] = None, *, backend: str = "auto", **overrides):
        super().__init__()
        base = config if config is not None else GRPOLossConfig()
        if not isinstance(base, GRPOLossConfig):
            raise TypeError(f"config must be a GRPOLossConfig, got {type(base).__name__}")
        self.config = base.replace(**overrides)
        self.backend = backend

    def forward(self, logits, ids, advantages, **kwargs) -> GRPOLossOutput:
        return grpo_loss(logits, ids, advantages, config=self.config, backend=kwargs.pop("backend", self.backend),
                         **kwargs)

    def extra_repr(self) -> str:
        return f"loss_type={self.config.loss_type!r}, backend={self.backend!r}"
