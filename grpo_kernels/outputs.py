"""Result types of the public API."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class GRPOLossOutput:
    """What `grpo_loss` / `fused_linear_grpo_loss` return.

    All floats are fp32, or fp64 when the inputs (logits, hidden/weight, logps) are fp64.

    loss: 0-d fp32, differentiable w.r.t. the logits (or hidden/weight/bias).
    logps, entropy: per-token fp32 in the caller's layout ((B, T) or packed (N,)), detached,
        0 at masked positions.
    per_token_loss: per-token loss before aggregation, same layout, detached, 0 where masked.
    metrics: 0-d fp32 detached tensors named as in docs/math.md (no host sync was needed to make them).
    """

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor
    per_token_loss: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class AdvantageOutput:
    """What `group_advantages` returns.

    All floats are fp32, or fp64 for fp64 rewards.

    advantages: (N,) fp32, 0 for unscorable rows and for groups whose rewards are all equal.
    group_mean, group_std: (G,) fp32 NaN-aware mean and Bessel std of each group's aggregated
        reward (groups ordered by group_ids' sorted values, or consecutive blocks of group_size).
    frac_zero_std: 0-d fp32, the fraction of groups with zero std (no learning signal).
    group_index: (N,) int64, the group of each row in [0, G).
    """

    advantages: torch.Tensor
    group_mean: torch.Tensor
    group_std: torch.Tensor
    frac_zero_std: torch.Tensor
    group_index: torch.Tensor
