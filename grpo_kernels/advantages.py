"""Group-relative advantages from rewards (docs/math.md, "Group advantages"): the public
`group_advantages`, its argument checks, and `reward_total`, the one place that turns (N, F)
rewards into the per-completion total.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .ops import resolve_backend
from .ops.advantages import group_advantages as advantages_op
from .ops.advantages import zscore_within_groups
from .outputs import AdvantageOutput
from .validation import FLOAT_DTYPES, INT_DTYPES, DeferredChecks, require_device, require_shape, require_tensor

SCALE_REWARDS = ("group", "batch", "none", "rloo", "reinforce++")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def reward_total(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N,) weighted sum of (N, F) rewards over the reward functions, NaN-aware: a missing reward
    (NaN) counts as 0, and a row whose rewards are all missing is unscorable (NaN)."""
    total = torch.nansum(rewards * weights, dim=1)
    return torch.where(torch.isnan(rewards).all(dim=1), float("nan"), total)


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    reward_aggregation: str = "sum_then_normalize",
    backend: str = "auto",
    validate: bool = True,
) -> AdvantageOutput:
    """Group-relative advantages from rewards (docs/math.md, "Group advantages").

    rewards: (N,) or (N, F) for F reward functions, NaN where a reward is missing.
    Groups: `group_size` consecutive rows (N divisible by it) or `group_ids` (N,) ints.
    scale_rewards: "group" | "batch" | "none" | "rloo" | "reinforce++".
    reward_weights: (F,) weights (default ones). reward_aggregation: "sum_then_normalize"
    or "normalize_then_sum" (GDPO: z-score per function within groups, sum, normalise
    over the batch; scale_rewards is not used then).
    validate=True checks the values (no inf, finite weights, groups of >= 2) with one host sync;
    validate=False checks none. With group_size the call never synchronises; group_ids needs one
    read to count the groups (torch.unique).
    An empty batch (N = 0 rewards) is not an error, as everywhere in the API: empty advantages,
    no groups (empty group_mean and group_std), frac_zero_std 0.
    """
    checks = DeferredChecks(validate)
    rewards, weights, group_index, num_groups = _check_rewards(
        rewards, group_size, group_ids, scale_rewards, eps, reward_weights, reward_aggregation, checks
    )
    name = resolve_backend(backend, rewards.device, rewards.dtype)
    r = rewards.float() if rewards.dtype != torch.float64 else rewards
    if r.shape[0] == 0:  # no rewards: nothing for the kernels (inputs.py, the empty-batch rule)
        checks.raise_first()
        empty = r.new_zeros(0)
        return AdvantageOutput(advantages=empty, group_mean=empty, group_std=empty.clone(),
                               frac_zero_std=r.new_zeros(()), group_index=group_index)
    w = weights.to(r.dtype)
    if reward_aggregation == "normalize_then_sum":
        r = zscore_within_groups(r, group_index, num_groups, eps, group_size, name)
        scale = "gdpo"
    else:
        scale = scale_rewards
    total = reward_total(r, w)
    adv, mean, std, constant = advantages_op(total, group_index, num_groups, scale, eps, group_size, name)
    checks.raise_first()
    return AdvantageOutput(
        advantages=adv.to(r.dtype), group_mean=mean.to(r.dtype), group_std=std.to(r.dtype),
        frac_zero_std=constant.to(r.dtype).mean(), group_index=group_index,
    )


def _check_rewards(rewards, group_size, group_ids, scale_rewards, eps, reward_weights, reward_aggregation,
                   checks: DeferredChecks):
    require_tensor("rewards", rewards, dtypes=FLOAT_DTYPES, kind="a float tensor (NaN for missing rewards)")
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be (N,) or (N, F), got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.dim() == 2 else rewards.unsqueeze(-1)
    n, num_funcs = rewards.shape
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not valid; expected one of {list(SCALE_REWARDS)}")
    if reward_aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(
            f"reward_aggregation={reward_aggregation!r} is not valid; expected one of {list(REWARD_AGGREGATIONS)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if checks.enabled:
        checks.require(~torch.isinf(rewards).any(),
                       lambda: ValueError("rewards contain inf; use NaN for a missing reward"))
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=rewards.dtype, device=rewards.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=rewards.dtype, device=rewards.device)
        if weights.shape != (num_funcs,):
            raise ValueError(f"reward_weights must have shape ({num_funcs},) (one per reward function), got "
                             f"{tuple(weights.shape)}")
        if checks.enabled:
            checks.require(torch.isfinite(weights).all(), lambda: ValueError("reward_weights must be finite"))

    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) or group_ids (any grouping)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
        if group_size == 1:
            raise ValueError("group_size=1: a group-relative advantage needs at least 2 completions per group")
        group_index = torch.arange(n, device=rewards.device) // group_size
        num_groups = n // group_size
    else:
        require_tensor("group_ids", group_ids, dtypes=INT_DTYPES, kind="an integer tensor")
        require_shape("group_ids", group_ids, (n,), "one group id per reward row")
        require_device("group_ids", group_ids, rewards.device, "rewards")
        _, group_index = torch.unique(group_ids, return_inverse=True)
        counts = torch.bincount(group_index)
        num_groups = counts.numel()
        if checks.enabled:
            checks.require((counts >= 2).all(), lambda: ValueError(
                f"group_ids has groups of size 1 (ids {torch.unique(group_ids)[counts < 2][:5].tolist()}); "
                "a group-relative advantage needs >= 2"))
    return rewards, weights, group_index, num_groups
