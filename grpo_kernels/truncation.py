"""Truncated sampling (top-k, top-p, min-p): the settings as every layer takes them.

The rollout sampler (vLLM's V1 sampler, Hugging Face `generate`) may draw from a truncated
distribution; the training log-probs must then be those of that distribution (docs/math.md,
"Truncated sampling"). `Truncation` is the validated triple; `NO_TRUNCATION` means the full
vocabulary. Kernels receive it as three plain numbers and return, per row, the kept set's bound
`threshold` in raw-logit units: the kept set is K = {v : z_v >= threshold} ∪ {y}. The transform
z -> z' is strictly increasing (scale > 0, cap > 0), so a bound on z is a bound on z', and a bound
on the raw logits (exact values of the input) compares identically in every backend.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional


class Truncation(NamedTuple):
    """top_k: keep the k largest (0: off); top_p: keep the smallest top set holding mass > 1 − top_p
    (1.0: off); min_p: drop p_v < min_p · max p (0.0: off). Applied min_p, then top_k, then top_p."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def active(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def log_min_p(self) -> float:
        """log(min_p): the min-p bound is z' >= max z' + log(min_p); −inf when off."""
        return math.log(self.min_p) if self.min_p > 0.0 else float("-inf")


NO_TRUNCATION = Truncation()


def make_truncation(top_k: Optional[int] = None, top_p: Optional[float] = None,
                    min_p: Optional[float] = None) -> Truncation:
    """The validated Truncation; None, 0 (top_k, min_p) and 1 (top_p) mean off. Raises ValueError
    naming the bad argument."""
    if top_k is None:
        top_k = 0
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be a non-negative int (0 or None: off), got {top_k!r}")
    top_p = 1.0 if top_p is None else top_p
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 or None: off), got {top_p!r}")
    min_p = 0.0 if min_p is None else min_p
    if isinstance(min_p, bool) or not isinstance(min_p, (int, float)) or not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 or None: off), got {min_p!r}")
    return Truncation(int(top_k), float(top_p), float(min_p))


def sampler_truncation(top_k: Optional[int] = None, top_p: Optional[float] = None,
                       min_p: Optional[float] = None) -> Truncation:
    """make_truncation for settings written as the rollout samplers write them: vLLM's top_k = -1
    (its "off", TRL's and verl's default) is off too, and a whole-number float top_k (a config
    file's 50.0) is that int; every other value is make_truncation's to accept or refuse."""
    if isinstance(top_k, float) and top_k.is_integer():
        top_k = int(top_k)
    if type(top_k) is int and top_k == -1:  # not True == 1, nor -1.5
        top_k = None
    return make_truncation(top_k=top_k, top_p=top_p, min_p=min_p)
