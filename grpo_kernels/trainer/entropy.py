"""The trainer's entropy-bonus coefficient under TRL's adaptive controller (the rule itself is
grpo_kernels.entropy_control, shared with the TRL drop-in)."""
from __future__ import annotations

import math
from typing import Dict

from ..entropy_control import applied_entropy_coef, next_entropy_coef
from .config import TrainerConfig


class AdaptiveEntropy:
    """`coef` starts at `cfg.loss.entropy_coef`. With `cfg.use_adaptive_entropy` it moves after each
    optimizer step (`update`), and a step's bonus is gated on `last_entropy`, the token-weighted mean
    entropy of the previous step (`applied`); without it, `coef` is applied as it is."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self.coef = cfg.loss.entropy_coef
        self.last_entropy = math.inf  # TRL's controller starts with the bonus gated off

    def applied(self) -> float:
        """The bonus coefficient of the coming step."""
        return applied_entropy_coef(self.coef, self.last_entropy, adaptive=self.cfg.use_adaptive_entropy,
                                    target=self.cfg.entropy_target)

    def update(self, entropy: float) -> None:
        """One controller step after an optimizer step whose mean entropy was `entropy`."""
        cfg = self.cfg
        self.coef = next_entropy_coef(self.coef, entropy, target=cfg.entropy_target, delta=cfg.entropy_coef_delta,
                                      low=cfg.entropy_coef_min, high=cfg.entropy_coef_max)
        self.last_entropy = entropy

    def state_dict(self) -> Dict[str, float]:
        return {"coef": self.coef, "last_entropy": self.last_entropy}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.coef, self.last_entropy = state["coef"], state["last_entropy"]
