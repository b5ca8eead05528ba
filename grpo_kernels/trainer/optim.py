"""The trainer's AdamW and its learning-rate schedule (warmup, then constant, linear or cosine decay)."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Tuple

import torch

from .config import TrainerConfig


def lr_factor(cfg: TrainerConfig) -> Callable[[int], float]:
    """The learning rate's multiplier at each optimizer step: linear warmup over warmup_steps, then
    `lr_schedule` to max_steps."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def optimizer_and_schedule(params: Iterable[torch.nn.Parameter],
                           cfg: TrainerConfig) -> Tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=tuple(cfg.adam_betas),
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
