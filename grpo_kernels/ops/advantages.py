"""The group-advantage op of every backend as a dispatcher op (ops/library.py): opaque to
torch.compile, shape-only under FakeTensorMode, so the compiled kernels never see a fake tensor."""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import backend_module
from .library import define


def _fake_advantages(total, group_index, num_groups, scale_rewards, eps, group_size, backend):
    stats = lambda: total.new_empty(num_groups)  # noqa: E731
    return torch.empty_like(total), stats(), stats(), total.new_empty(num_groups, dtype=torch.bool)


@define("group_advantages(Tensor total, Tensor group_index, int num_groups, str scale_rewards, float eps, "
        "int group_size, str backend) -> (Tensor, Tensor, Tensor, Tensor)", _fake_advantages)
def _group_advantages(total, group_index, num_groups, scale_rewards, eps, group_size, backend):
    adv, mean, std, constant = backend_module(backend).group_advantages(
        total, group_index, num_groups, scale_rewards, eps, group_size or None)
    return adv.to(total.dtype), mean.to(total.dtype), std.to(total.dtype), constant.bool()


def group_advantages(total: Tensor, group_index: Tensor, num_groups: int, scale_rewards: str, eps: float,
                     group_size, backend: str):
    """total (N,) aggregated rewards (NaN: unscorable), group_index (N,) in [0, num_groups) ->
    (advantages (N,), group mean (G,), group std (G,), constant-group flags (G,) bool)."""
    return _group_advantages(total, group_index, int(num_groups), scale_rewards, float(eps), int(group_size or 0),
                             backend)


def zscore_within_groups(rewards: Tensor, group_index: Tensor, num_groups: int, eps: float, group_size,
                         backend: str) -> Tensor:
    """GDPO's first step on (N, F) rewards: each reward function (column) z-scored within its groups
    by the backend's own group_advantages op ("group" mode), constant groups 0, NaN kept NaN."""
    columns = []
    for f in range(rewards.shape[1]):
        col = rewards[:, f]
        z = group_advantages(col, group_index, num_groups, "group", eps, group_size, backend)[0]
        columns.append(torch.where(torch.isnan(col), col, z))
    return torch.stack(columns, dim=1)
