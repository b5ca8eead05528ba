"""Group advantages: every backend against the reference on fresh random rewards."""
import pytest
import torch

import grpo_kernels as gk
from conftest import BACKENDS
from grpo_kernels import reference as R
from helpers import DEVICE, assert_close


def random_rewards(n, funcs, seed, nan_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, funcs, generator=g, dtype=torch.float64).round(decimals=1)
    r[torch.rand(n, funcs, generator=g) < nan_frac] = float("nan")
    r[:4] = 1.0  # the first group is constant
    return r


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none", "rloo", "reinforce++"])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("grouping", ["size", "ids"])
def test_matches_reference(backend, scale, aggregation, grouping):
    n, funcs = 24, 3
    rewards = random_rewards(n, funcs, seed=len(scale) * 7 + len(aggregation))
    weights = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    if grouping == "size":
        kw, index, groups = dict(group_size=4), torch.arange(n) // 4, n // 4
    else:
        ids = torch.tensor([7, 3, 3, 7, 9, 9, 9, 3] * 3)
        kw = dict(group_ids=ids.to(DEVICE))
        index = torch.unique(ids, return_inverse=True)[1]
        groups = 3
    ref = R.group_advantages(rewards, index, groups, scale_rewards=scale, reward_weights=weights,
                             reward_aggregation=aggregation)
    out = gk.group_advantages(rewards.float().to(DEVICE), scale_rewards=scale, reward_weights=weights.tolist(),
                              reward_aggregation=aggregation, backend=backend, **kw)
    assert out.advantages.dtype == torch.float32
    assert torch.isfinite(out.advantages).all()
    assert_close(out.advantages, ref.advantages, rtol=1e-5, atol=1e-5, name="advantages")
    assert_close(out.group_mean, ref.group_mean, rtol=1e-5, atol=1e-6, name="group_mean")
    assert_close(out.group_std, ref.group_std, rtol=1e-5, atol=1e-6, name="group_std")
    assert_close(out.frac_zero_std, ref.frac_zero_std, name="frac_zero_std")
    assert torch.equal(out.group_index.cpu(), index)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_unscorable_and_all_equal_give_zero(backend):
    rewards = torch.tensor([float("nan")] * 4 + [2.0] * 4, device=DEVICE)
    out = gk.group_advantages(rewards, group_size=4, backend=backend)
    assert torch.equal(out.advantages, torch.zeros(8, device=DEVICE))
    assert out.frac_zero_std.item() == 1.0


def test_matches_trl_advantages():
    """TRL's own normalisation for its three scale_rewards modes (no NaN, no constant groups)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    rewards = torch.randn(16, dtype=torch.float64)
    grouped = rewards.view(-1, 4)
    mean = grouped.mean(1).repeat_interleave(4)
    group_std = trl_utils.nanstd(grouped, dim=1).repeat_interleave(4)
    batch_std = trl_utils.nanstd(rewards)
    expected = {"group": (rewards - mean) / (group_std + 1e-4), "batch": (rewards - mean) / (batch_std + 1e-4),
                "none": rewards - mean}
    for mode, value in expected.items():
        out = gk.group_advantages(rewards, group_size=4, scale_rewards=mode)
        assert_close(out.advantages, value, rtol=1e-5, atol=1e-6, name=mode)
