"""advantages: group advantages of N rewards in groups of 8.
"""
from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

from .common import Task, _baselines, _ours


def build_advantages(shape, device):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (shape.n,), generator=gen).float()
    rewards[torch.rand(shape.n, generator=gen) < 0.05] = float("nan")
    return dict(rewards=rewards.to(device))


def _oracle_advantages(x):
    n = x["rewards"].numel()
    return R.group_advantages(x["rewards"], torch.arange(n, device=x["rewards"].device) // 8, n // 8).advantages


def eager_advantages(x):
    """TRL's vectorised group statistics (nanmean, unbiased std, + 1e-4), NaN rewards as 0 advantage."""
    r = x["rewards"].view(-1, 8)
    mean = torch.nanmean(r, 1, keepdim=True)
    std = ((r - mean) ** 2).nansum(1, keepdim=True).div((~torch.isnan(r)).sum(1, keepdim=True) - 1).sqrt()
    return torch.nan_to_num(((r - mean) / (std + 1e-4)).flatten(), nan=0.0)


def advantages_contenders(device):
    out = _ours(device, lambda b: (lambda x: gk.group_advantages(x["rewards"], group_size=8, backend=b).advantages))
    return out + _baselines(eager_advantages, "TRL's vectorised lines")


TASK = Task("advantages", build_advantages, advantages_contenders, _oracle_advantages,
            tolerance=lambda s: 1e-4)
