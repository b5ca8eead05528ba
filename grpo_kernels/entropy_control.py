"""TRL 1.16's adaptive entropy coefficient rule, shared by our trainer and the TRL drop-in."""
from __future__ import annotations


def next_entropy_coef(coef: float, entropy: float, *, target: float, delta: float, low: float, high: float) -> float:
    """One controller step: delta more bonus when the entropy is at or below the target, delta less
    otherwise, kept within [low, high]."""
    if entropy <= target:
        return min(coef + delta, high)
    return max(coef - delta, low)


def applied_entropy_coef(coef: float, last_entropy: float, *, adaptive: bool, target: float) -> float:
    """The bonus coefficient a step applies: TRL's adaptive controller turns the bonus off while the
    entropy measured at the end of the previous optimizer step is above the target."""
    if adaptive and not last_entropy <= target:  # as TRL's `coef if last <= target else 0`: NaN turns it off
        return 0.0
    return coef
