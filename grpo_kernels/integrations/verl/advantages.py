"""verl's advantage estimators, computed by our group kernels and registered in verl's registry
as `grpo_kernels_<name>` (`algorithm.adv_estimator=grpo_kernels_grpo`, ...).

Every estimator verl 0.9.1 registers except `gae` (a per-token critic recursion, no groups):
grpo, grpo_vectorized, gdpo, grpo_passk, reinforce_plus_plus_baseline, rloo, opo,
reinforce_plus_plus, remax, gpg, rloo_vectorized, optimal_token_baseline,
tir_optimal_token_baseline. Each takes verl's arguments (token_level_rewards (B, T),
response_mask (B, T), index: verl's `uid` array (numpy, any label type) and the estimator's own
extras) and returns verl's (advantages, returns), both (B, T), in verl's dtype.

How: `index` is turned into groups on the host (it is a host array already: numpy, no device
read; a torch index on a GPU costs the one read). The group statistics (mean, Bessel std) come
from the backend `group_advantages` op (ops/advantages.py) in one call, with the rows laid out as
consecutive equal groups when every group has the same size (the op then never reads the device);
per-group sums and top-2 of per-row or per-token values are taken on a (groups, members, ...)
grid gathered on the device. No `.item()` and no Python loop over rows or groups, where verl's
loop estimators run torch ops per row and per group (and read the device per group in
grpo_passk and the OTB estimators, per row in tir_optimal_token_baseline).

Also here: the trainer wiring (`estimator_kwargs`, `wrap_compute_advantage`,
`wrap_multi_trajectories`, `patch_compute_advantage`), since verl's trainer chooses an
estimator's arguments by its name.

Where verl has a rule for a corner, it is kept: a singleton group has mean 0 and std 1 (grpo,
gpg, rloo keeps the raw score, rloo_vectorized gives 0, OTB uses no baseline); grpo_passk raises
on a group of one. Where verl raises from a data-dependent check (masked_whiten on <= 1 valid
token) we do not read the device to raise: the whitened values are 0 there.
"""
from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ...ops import resolve_backend
from ...ops.advantages import group_advantages as group_stats_op
from .losses import LOSS_NAME_PREFIX, _option

try:
    from verl.trainer.ppo import core_algos
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError("grpo_kernels.integrations.verl needs verl: pip install 'grpo_kernels[verl]'") from exc

ESTIMATORS = (
    "grpo", "grpo_vectorized", "gdpo", "grpo_passk", "reinforce_plus_plus_baseline", "rloo", "opo",
    "reinforce_plus_plus", "remax", "gpg", "rloo_vectorized", "optimal_token_baseline", "tir_optimal_token_baseline",
)
# verl's masked_whiten adds this to the variance before rsqrt.
WHITEN_EPS = 1e-8


# ------------------------------------------------------------------------------------------ groups
class GroupLayout(NamedTuple):
    """verl's `index` as groups. Host side: num_groups, width (largest group), counts_host.
    Device side, each (N,) long: group (its group id), position (its rank within the group, in
    batch order); counts (G,) long; order (N,) rows sorted by group (stable)."""
    group: Tensor
    position: Tensor
    counts: Tensor
    order: Tensor
    num_groups: int
    width: int
    counts_host: np.ndarray


def group_layout(index, num_rows: int, device: torch.device) -> GroupLayout:
    """Groups from verl's `index` (numpy array of uids of any type, a list, or a torch tensor: a
    tensor on a GPU is read once), with equal labels in one group, as verl's dict grouping."""
    if index is None:
        raise ValueError("index (verl's uid array) is required by this estimator; verl passes "
                         "data.non_tensor_batch['uid']")
    labels = index.detach().cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
    labels = labels.reshape(-1)
    if labels.shape[0] != num_rows:
        raise ValueError(f"index has {labels.shape[0]} labels for {num_rows} rows of token_level_rewards")
    try:
        _, group, counts = np.unique(labels, return_inverse=True, return_counts=True)
    except TypeError:  # labels of mixed types that numpy cannot order: group by their text
        _, group, counts = np.unique(labels.astype(str), return_inverse=True, return_counts=True)
    group = group.reshape(-1).astype(np.int64)
    order = np.argsort(group, kind="stable")
    starts = np.cumsum(counts) - counts
    position = np.empty(num_rows, dtype=np.int64)
    position[order] = np.arange(num_rows) - starts[group[order]]

    def on_device(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)

    return GroupLayout(on_device(group), on_device(position), on_device(counts.astype(np.int64)), on_device(order),
                       int(counts.size), int(counts.max()) if num_rows else 0, counts)


def to_grid(values: Tensor, layout: GroupLayout, fill: float) -> Tensor:
    """(N, ...) rows -> (G, width, ...) with each group's rows in batch order, `fill` elsewhere."""
    grid = values.new_full((layout.num_groups, layout.width) + tuple(values.shape[1:]), fill)
    grid[layout.group, layout.position] = values
    return grid


def group_mean_std(scores: Tensor, layout: GroupLayout, backend: str) -> Tuple[Tensor, Tensor]:
    """(G,) mean and Bessel-corrected std of each group's scores, from the backend op in one
    call; scores (N,) or (N, F) (F independent columns, one op call for all of them -> (G, F))."""
    columns = scores.unsqueeze(-1) if scores.dim() == 1 else scores
    num_cols = columns.shape[1]
    name = resolve_backend(backend, scores.device, scores.dtype)
    g = layout.num_groups
    if layout.counts_host.size and (layout.counts_host == layout.width).all():
        # Equal groups: lay the rows out as consecutive groups, so the op needs no group grid.
        flat = columns[layout.order].T.reshape(-1)
        ids = torch.arange(flat.numel(), device=flat.device) // layout.width
        size = layout.width
    else:
        flat = columns.T.reshape(-1)
        ids = (layout.group.unsqueeze(0) + g * torch.arange(num_cols, device=flat.device).unsqueeze(1)).reshape(-1)
        size = None
    _, mean, std, _ = group_stats_op(flat, ids, g * num_cols, "none", 1.0, size, name)
    mean, std = mean.view(num_cols, g).T, std.view(num_cols, g).T
    return (mean[:, 0], std[:, 0]) if scores.dim() == 1 else (mean, std)


def verl_group_mean_std(scores: Tensor, layout: GroupLayout, backend: str) -> Tuple[Tensor, Tensor]:
    """Per-row group mean and std with verl's rule for a group of one (mean 0, std 1)."""
    mean, std = group_mean_std(scores, layout, backend)
    single = (layout.counts == 1).view((-1,) + (1,) * (mean.dim() - 1))
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[layout.group], std[layout.group]


def grpo_normalise(scores: Tensor, layout: GroupLayout, epsilon: float, by_std: bool, backend: str) -> Tensor:
    """verl's grpo per row: (r − μ_g)/(σ_g + ε), or r − μ_g without by_std. A group of one has
    μ 0, σ 1, and verl adds ε to that σ as an fp32 tensor: its 1 + ε is rounded to fp32 here too."""
    mean, std = verl_group_mean_std(scores, layout, backend)
    if not by_std:
        return scores - mean
    single = (layout.counts == 1)[layout.group].view((-1,) + (1,) * (scores.dim() - 1))
    single_scale = float(np.float32(1.0) + np.float32(epsilon))
    return (scores - mean) / torch.where(single, single_scale, std + epsilon)


def group_sum(values: Tensor, layout: GroupLayout) -> Tensor:
    """(N, ...) -> (G, ...) sums over each group's rows, deterministic (no atomics)."""
    return to_grid(values, layout, 0.0).sum(1)


# ------------------------------------------------------------------------------------------ helpers
def masked_whiten(values: Tensor, mask: Tensor) -> Tensor:
    """verl_F.masked_whiten without its host reads: (x − mean)·rsqrt(var + 1e-8) over the masked
    entries, var Bessel-corrected. verl raises for <= 1 valid entry; here those give 0."""
    m = mask
    count = m.sum()
    mean = torch.where(m.bool(), values, 0.0).mul(m).sum() / (count + WHITEN_EPS)
    centred = values - mean
    var = torch.where(m.bool(), centred ** 2, 0.0).mul(m).sum() / (count + WHITEN_EPS)
    var = var * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("inf")))
    return centred * torch.rsqrt(var + WHITEN_EPS)


def reward_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """(B, T) returns G_t = Σ_{s >= t} r_s·m_s, as verl's flip-cumsum-flip."""
    return (rewards * mask).flip(dims=[-1]).cumsum(dim=-1).flip(dims=[-1])


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """verl's REINFORCE++ returns: x_t = m_t (r_t + γ x_next) + (1 − m_t) x_next from the end,
    returns_t = m_t (r_t + γ x_next), i.e. masked positions pass the running return through.
    γ = 1: a reverse cumsum; otherwise the linear recurrence by doubling (log2 T batched steps;
    every factor is a product of γ's and ones, so nothing overflows)."""
    if gamma == 1.0:
        return reward_to_go(rewards, mask) * mask
    m = mask.to(rewards.dtype)
    decay = m * gamma + (1 - m)  # x_t = decay_t · x_{t+1} + add_t
    add = rewards * m
    num_steps = rewards.shape[-1]
    shift = 1
    while shift < num_steps:
        add = add + decay * torch.nn.functional.pad(add[..., shift:], (0, shift))
        decay = decay * torch.nn.functional.pad(decay[..., shift:], (0, shift), value=1.0)
        shift *= 2
    return add * mask


def _rows_to_tokens(per_row: Tensor, mask: Tensor) -> Tensor:
    return per_row.unsqueeze(-1) * mask


def _scores(token_level_rewards: Tensor) -> Tensor:
    return token_level_rewards.sum(dim=-1)


def _scores_and_groups(token_level_rewards: Tensor, index) -> Tuple[Tensor, GroupLayout]:
    """Each response's outcome score (its token rewards summed, as verl sums them) and the groups."""
    scores = _scores(token_level_rewards)
    return scores, group_layout(index, scores.shape[0], scores.device)


# ------------------------------------------------------------------------------------------ estimators
def _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, backend):
    with torch.no_grad():
        scores, layout = _scores_and_groups(token_level_rewards, index)
        adv = _rows_to_tokens(grpo_normalise(scores, layout, epsilon, norm_adv_by_std_in_grpo, backend), response_mask)
    return adv, adv


def compute_grpo(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                 norm_adv_by_std_in_grpo: bool = True, config=None, *, backend: str = "auto", **kwargs):
    """verl's `grpo`: (r − μ_g)/(σ_g + ε) (or r − μ_g with norm_adv_by_std_in_grpo=False) per row,
    broadcast over the response mask; a group of one has μ 0, σ 1."""
    return _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, backend)


def compute_grpo_vectorized(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                            norm_adv_by_std_in_grpo: bool = True, config=None, *, backend: str = "auto",
                            **kwargs):
    """verl's `grpo_vectorized`: verl computes its group statistics in fp32 (verl.utils.group_mean_std);
    ours are in the rewards' dtype, so in fp64 they agree to fp32 rounding."""
    return _grpo(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, backend)


def compute_gdpo(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                 norm_adv_by_std_in_grpo: bool = True, config=None, non_tensor_batch=None, batch=None,
                 *, backend: str = "auto", **kwargs):
    """verl's `gdpo`: each reward dimension z-scored within its groups (grpo), the weighted sum,
    whitened over the valid tokens. The dimensions are config.gdpo_reward_keys of non_tensor_batch
    (with config, non_tensor_batch and batch given, as verl's trainer passes them), weighted by
    config.gdpo_reward_weights; otherwise the one dimension token_level_rewards.sum(-1)."""
    with torch.no_grad():
        device = token_level_rewards.device
        weights = None
        if config is not None and non_tensor_batch is not None and batch is not None:
            keys = _option(config, "gdpo_reward_keys", None)
            if not keys:
                raise ValueError("GDPO requires algorithm.gdpo_reward_keys listing the reward component keys "
                                 "returned by compute_score (e.g. ['format_reward', 'accuracy_reward'])")
            missing = [k for k in keys if k not in non_tensor_batch]
            if missing:
                raise ValueError(f"GDPO reward keys {missing} are not in non_tensor_batch "
                                 f"(keys: {list(non_tensor_batch.keys())})")
            # verl places each score on one token and sums the row back: the fp32 score itself.
            scores = torch.tensor(np.stack([np.asarray(non_tensor_batch[k], dtype=np.float32) for k in keys], 1),
                                  device=device)
            reward_weights = _option(config, "gdpo_reward_weights", None)
            if reward_weights is not None:
                weights = torch.tensor(list(reward_weights), dtype=torch.float32, device=device)
        else:
            scores = _scores(token_level_rewards).unsqueeze(1)
        if weights is None:
            weights = torch.ones(scores.shape[1], dtype=torch.float32, device=device)
        layout = group_layout(index, scores.shape[0], device)
        per_dim = grpo_normalise(scores, layout, epsilon, norm_adv_by_std_in_grpo, backend)
        # verl adds weight_k · (A_k · mask) token by token, dimension after dimension.
        total = None
        for k in range(per_dim.shape[1]):
            term = weights[k] * _rows_to_tokens(per_dim[:, k], response_mask)
            total = term if total is None else total + term
        adv = masked_whiten(total, response_mask) * response_mask
    return adv, adv


def compute_grpo_passk(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                       norm_adv_by_std_in_grpo: bool = True, config=None, *, backend: str = "auto", **kwargs):
    """verl's `grpo_passk`: only each group's best row gets an advantage, r_max − r_second
    (over σ_g + ε with config.norm_adv_by_std_in_grpo, default True); groups need >= 2 rows."""
    if config is None:
        raise ValueError("grpo_passk needs config (verl's algorithm config, for norm_adv_by_std_in_grpo)")
    norm = _option(config, "norm_adv_by_std_in_grpo", True)
    with torch.no_grad():
        scores, layout = _scores_and_groups(token_level_rewards, index)
        if (layout.counts_host < 2).any():
            raise ValueError(f"Pass@k requires at least 2 samples per group; {int((layout.counts_host < 2).sum())} "
                             "group(s) have 1")
        top, top_pos = torch.topk(to_grid(scores, layout, float("-inf")), 2, dim=1)
        advantage = top[:, 0] - top[:, 1]
        if norm:
            advantage = advantage / (group_mean_std(scores, layout, backend)[1] + epsilon)
        rows = to_grid(torch.arange(scores.shape[0], device=scores.device), layout, -1)
        best_row = rows.gather(1, top_pos[:, :1]).squeeze(1)
        advantages = torch.zeros_like(scores)
        advantages[best_row] = advantage.to(scores.dtype)
        advantages = _rows_to_tokens(advantages, response_mask)
    return advantages, advantages


def compute_reinforce_plus_plus_baseline(token_level_rewards, response_mask, index, epsilon: float = 1e-6,
                                         config=None, *, backend: str = "auto", **kwargs):
    """verl's `reinforce_plus_plus_baseline`: r − μ_g per row over the tokens, whitened over the
    valid tokens."""
    with torch.no_grad():
        scores, layout = _scores_and_groups(token_level_rewards, index)
        mean, _ = verl_group_mean_std(scores, layout, backend)
        adv = _rows_to_tokens(scores - mean, response_mask)
        adv = masked_whiten(adv, response_mask) * response_mask
    return adv, adv


def _rloo(token_level_rewards, response_mask, index, singleton_keeps_score: bool, backend: str):
    """RLOO per row: r minus the mean of the group's other rows, n/(n−1)·(r − μ_g); a group of
    one keeps its score (verl's rloo) or gets 0 (verl's rloo_vectorized)."""
    with torch.no_grad():
        scores, layout = _scores_and_groups(token_level_rewards, index)
        mean, _ = group_mean_std(scores, layout, backend)
        n = layout.counts[layout.group].to(scores.dtype)
        adv = (scores - mean[layout.group]) * n / (n - 1).clamp(min=1)
        adv = torch.where(n > 1, adv, scores if singleton_keeps_score else torch.zeros_like(scores))
        adv = _rows_to_tokens(adv, response_mask)
    return adv, adv


def compute_rloo(token_level_rewards, response_mask, index, epsilon: float = 1e-6, config=None,
                 *, backend: str = "auto", **kwargs):
    """verl's `rloo`: n/(n−1)·(r − μ_g); a group of one keeps its score."""
    return _rloo(token_level_rewards, response_mask, index, True, backend)


def compute_rloo_vectorized(token_level_rewards, response_mask, index, epsilon: float = 1e-6, config=None,
                            *, backend: str = "auto", **kwargs):
    """verl's `rloo_vectorized`: (n·r − Σ_g r)/(n − 1); a group of one gets 0."""
    return _rloo(token_level_rewards, response_mask, index, False, backend)


def compute_opo(token_level_rewards, response_mask, index, epsilon: float = 1e-6, config=None,
                *, backend: str = "auto", **kwargs):
    """verl's `opo`: r − b_g with the length-weighted baseline b_g = Σ|o|·r / Σ|o| (0 for a
    group of one)."""
    with torch.no_grad():
        scores = _scores(token_level_rewards)
        lengths = response_mask.sum(dim=-1)
        layout = group_layout(index, scores.shape[0], scores.device)
        weighted = group_sum(torch.stack([lengths * scores, lengths.to(scores.dtype)], 1), layout)
        baseline = torch.where(layout.counts > 1, weighted[:, 0] / weighted[:, 1], 0.0).to(scores.dtype)
        adv = _rows_to_tokens(scores - baseline[layout.group], response_mask)
    return adv, adv


def compute_reinforce_plus_plus(token_level_rewards, response_mask, config=None, *, backend: str = "auto",
                                **kwargs):
    """verl's `reinforce_plus_plus`: discounted returns (config.gamma; masked positions carry the
    return through) whitened over the valid tokens. No groups."""
    if config is None:
        raise ValueError("reinforce_plus_plus needs config (verl's algorithm config, for gamma)")
    with torch.no_grad():
        returns = discounted_returns(token_level_rewards, response_mask, float(_option(config, "gamma", 1.0)))
        advantages = masked_whiten(returns, response_mask) * response_mask
    return advantages, returns


def compute_remax(token_level_rewards, reward_baselines, response_mask, config=None, *, backend: str = "auto",
                  **kwargs):
    """verl's `remax`: returns G_t (reward-to-go), advantages G_t − baseline (the greedy
    rollout's reward, reward_baselines (B,)). No groups."""
    with torch.no_grad():
        returns = reward_to_go(token_level_rewards, response_mask)
        advantages = returns - reward_baselines.unsqueeze(-1) * response_mask
    return advantages, returns


def compute_gpg(token_level_rewards, response_mask, index, epsilon: float = 1e-6, f_norm: float = 1.0,
                alpha: float = 1.0, config=None, *, backend: str = "auto", **kwargs):
    """verl's `gpg`: α(r − μ_g)/f_norm with α = B / max(#nonzero scores, 1) (verl ignores the
    `alpha` argument; so do we)."""
    with torch.no_grad():
        scores, layout = _scores_and_groups(token_level_rewards, index)
        alpha = scores.shape[0] / torch.count_nonzero(scores).clamp(min=1)  # fp32, as verl's
        mean, _ = verl_group_mean_std(scores, layout, backend)
        adv = (alpha * (scores - mean) / f_norm).to(scores.dtype)
        adv = _rows_to_tokens(adv, response_mask)
    return adv, adv


def _token_baseline_weights(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask):
    """W_t = Σ_{j <= t} m_j (1 − 2π_j + Σπ²_j) ρ̄_j²: OTB's cumulative path-variance proxy."""
    w = 1 - 2 * torch.exp(old_log_probs) + sum_pi_squared
    if rollout_is_weights is not None:
        w = w * rollout_is_weights ** 2
    return (w * response_mask).cumsum(dim=-1)


def _optimal_baseline(returns, weights, valid, layout, members, lengths, epsilon, handle_zero_tail):
    """(B, T) per-token baseline Σ_g G·W / (Σ_g W + ε) over each group's `members` (rows; padded
    entries of `returns`, `weights` are 0), 0 for a group with < 2 members, and with
    handle_zero_tail 0 past the second-longest length on a group's unique longest row."""
    numerator = group_sum(returns * weights * valid, layout)
    denominator = group_sum(weights * valid, layout) + epsilon
    baseline = (numerator / denominator)[layout.group]
    num_members = group_sum(members.long(), layout)[layout.group]
    baseline = torch.where((num_members > 1).unsqueeze(-1), baseline, torch.zeros_like(baseline))
    if handle_zero_tail:
        member_lengths = torch.where(members, lengths, -1)
        top, top_pos = torch.topk(to_grid(member_lengths, layout, -1), 2, dim=1)
        rows = to_grid(torch.arange(lengths.shape[0], device=lengths.device), layout, -1)
        longest = rows.gather(1, top_pos[:, :1]).squeeze(1)[layout.group]
        unique = ((top[:, 0] > top[:, 1]) & (top[:, 1] >= 0))[layout.group]  # strictly longest, >= 2 members
        is_cut = unique & members & (longest == torch.arange(lengths.shape[0], device=lengths.device))
        cut = torch.where(is_cut, top[:, 1][layout.group], returns.shape[-1])
        past = torch.arange(returns.shape[-1], device=returns.device) >= cut.unsqueeze(-1)
        baseline = torch.where(past, torch.zeros_like(baseline), baseline)
    return baseline


def compute_optimal_token_baseline(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                   rollout_is_weights=None, handle_zero_tail: bool = True, epsilon: float = 1e-8,
                                   *, backend: str = "auto", **kwargs):
    """verl's `optimal_token_baseline`: A_t = G_t − B_t with the per-timestep group baseline
    B_t = Σ G_t W_t / (Σ W_t + ε) (W: `_token_baseline_weights`), aligned by position t."""
    with torch.no_grad():
        returns = reward_to_go(token_level_rewards, response_mask)
        weights = _token_baseline_weights(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask)
        layout = group_layout(index, returns.shape[0], returns.device)
        lengths = response_mask.sum(dim=-1).long()
        members = torch.ones_like(lengths, dtype=torch.bool)
        baseline = _optimal_baseline(returns, weights, response_mask, layout, members, lengths, epsilon,
                                     handle_zero_tail)
        advantages = (returns - baseline) * response_mask
    return advantages, returns


def compute_tir_optimal_token_baseline(token_level_rewards, response_mask, index, old_log_probs, sum_pi_squared,
                                       rollout_is_weights=None, handle_zero_tail: bool = True,
                                       epsilon: float = 1e-8, *, backend: str = "auto", **kwargs):
    """verl's `tir_optimal_token_baseline` (multi-turn OTB): as OTB, but each row's valid tokens
    are packed to the left first (observation tokens between turns dropped), so the baseline is
    taken over the k-th generated token of every member; rows with no valid token are no member."""
    with torch.no_grad():
        token_returns = reward_to_go(token_level_rewards, response_mask)
        weights = _token_baseline_weights(old_log_probs, sum_pi_squared, rollout_is_weights, response_mask)
        valid = response_mask.bool()
        lengths = valid.sum(dim=-1)
        # k-th valid token of each row -> packed column k (verl: all_w_values[i, :len] = w[i, mask])
        packed_col = torch.where(valid, valid.long().cumsum(-1) - 1, token_returns.shape[-1])
        rows = torch.arange(valid.shape[0], device=valid.device).unsqueeze(-1).expand_as(packed_col)

        def pack(x):
            out = x.new_zeros(x.shape[0], x.shape[1] + 1)
            out[rows, packed_col] = torch.where(valid, x, 0)
            return out[:, :-1]

        packed_returns, packed_weights = pack(token_returns), pack(weights)
        layout = group_layout(index, valid.shape[0], valid.device)
        packed_valid = torch.arange(valid.shape[1], device=valid.device) < lengths.unsqueeze(-1)
        baseline = _optimal_baseline(packed_returns, packed_weights, packed_valid.to(packed_weights.dtype), layout,
                                     lengths > 0, lengths, epsilon, handle_zero_tail)
        packed_adv = packed_returns - baseline.to(packed_returns.dtype)
        advantages = torch.where(valid, packed_adv.gather(1, packed_col.clamp(max=valid.shape[1] - 1)), 0)
        advantages = advantages * response_mask
    return advantages, token_returns


ESTIMATOR_FUNCTIONS: Dict[str, Callable[..., Tuple[Tensor, Tensor]]] = {
    "grpo": compute_grpo, "grpo_vectorized": compute_grpo_vectorized, "gdpo": compute_gdpo,
    "grpo_passk": compute_grpo_passk, "reinforce_plus_plus_baseline": compute_reinforce_plus_plus_baseline,
    "rloo": compute_rloo, "opo": compute_opo, "reinforce_plus_plus": compute_reinforce_plus_plus,
    "remax": compute_remax, "gpg": compute_gpg, "rloo_vectorized": compute_rloo_vectorized,
    "optimal_token_baseline": compute_optimal_token_baseline,
    "tir_optimal_token_baseline": compute_tir_optimal_token_baseline,
}
assert tuple(ESTIMATOR_FUNCTIONS) == ESTIMATORS


@functools.lru_cache(maxsize=None)
def advantage_estimator_fn(name: str, backend: str = "auto") -> Callable[..., Tuple[Tensor, Tensor]]:
    """verl's estimator `name` computed by our kernels, with verl's signature (the same function
    object for the same arguments, so registering it twice is not a conflict in verl's registry)."""
    if name not in ESTIMATOR_FUNCTIONS:
        raise ValueError(f"advantage estimator {name!r} has no grpo_kernels version; expected one of "
                         f"{list(ESTIMATORS)}")
    fn = functools.partial(ESTIMATOR_FUNCTIONS[name], backend=backend)
    fn = functools.update_wrapper(fn, ESTIMATOR_FUNCTIONS[name])
    fn.__name__ = fn.__qualname__ = f"{LOSS_NAME_PREFIX}{name}"
    fn.grpo_kernels_estimator = name
    return fn


def register_estimators(backend: str = "auto", prefix: str = LOSS_NAME_PREFIX) -> Tuple[str, ...]:
    """Register our estimators in verl's registry as `prefix` + verl's name; returns the names.
    Registering again (another backend) replaces our earlier entry; anyone else's is an error."""
    names = []
    for name in ESTIMATORS:
        full = f"{prefix}{name}"
        current = core_algos.ADV_ESTIMATOR_REGISTRY.get(full)
        if current is not None and getattr(current, "grpo_kernels_estimator", None) == name:
            del core_algos.ADV_ESTIMATOR_REGISTRY[full]
        core_algos.register_adv_est(full)(advantage_estimator_fn(name, backend))
        names.append(full)
    return tuple(names)


# ------------------------------------------------------------------------------------------ trainer
def _is_ours(name) -> bool:
    return isinstance(name, str) and name.startswith(LOSS_NAME_PREFIX) and name[len(LOSS_NAME_PREFIX):] in ESTIMATORS


def estimator_kwargs(name: str, batch: Any, non_tensor_batch: Dict[str, Any], config,
                     norm_adv_by_std_in_grpo: bool = True) -> Optional[Dict[str, Any]]:
    """The arguments verl's `ray_trainer.compute_advantage` gives verl's estimator `name`, for our
    estimator of that name: verl picks them by name (grpo gets norm_adv_by_std_in_grpo, the OTB
    estimators sum_pi_squared / old_log_probs / rollout_is_weights, gdpo the raw batch), which
    a `grpo_kernels_` name would otherwise miss. None for a name that is not ours."""
    if not _is_ours(name):
        return None
    base = name[len(LOSS_NAME_PREFIX):]
    kwargs = dict(token_level_rewards=batch["token_level_rewards"], response_mask=batch["response_mask"])
    if base == "grpo":  # verl's own grpo branch: no config, the trainer's norm_adv_by_std_in_grpo
        kwargs.update(index=non_tensor_batch["uid"], norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo)
        return kwargs
    kwargs["config"] = config
    if "uid" in non_tensor_batch:
        kwargs["index"] = non_tensor_batch["uid"]
    if "reward_baselines" in batch.keys():
        kwargs["reward_baselines"] = batch["reward_baselines"]
    if base == "gdpo":
        kwargs.update(non_tensor_batch=non_tensor_batch, batch=batch)
    if base in ("optimal_token_baseline", "tir_optimal_token_baseline"):
        if "sum_pi_squared" not in batch.keys():
            raise ValueError("the optimal-token-baseline estimators need sum_pi_squared from the actor: set "
                             "actor_rollout_ref.actor.calculate_sum_pi_squared=True")
        kwargs.update(sum_pi_squared=batch["sum_pi_squared"], old_log_probs=batch["old_log_probs"],
                      rollout_is_weights=batch.get("rollout_is_weights", None))
    return kwargs


# Set while verl's v1 multi-trajectory GRPO runs for grpo_kernels_grpo: its inner compute_advantage
# calls (made with verl's "grpo") then run ours.
_GRPO_IS_OURS = contextvars.ContextVar("grpo_kernels_grpo_is_ours", default=False)
OUR_GRPO = f"{LOSS_NAME_PREFIX}grpo"


def _estimator_name(adv_estimator) -> str:
    return adv_estimator.value if hasattr(adv_estimator, "value") else adv_estimator


def wrap_compute_advantage(compute_advantage: Callable) -> Callable:
    """verl's `ray_trainer.compute_advantage`, giving our `grpo_kernels_<name>` estimators the
    arguments verl gives `<name>` (see estimator_kwargs); every other estimator goes to verl's."""
    if getattr(compute_advantage, "grpo_kernels_wrapped", False):
        return compute_advantage

    @functools.wraps(compute_advantage)
    def wrapped(data, adv_estimator, gamma: float = 1.0, lam: float = 1.0, num_repeat: int = 1,
                norm_adv_by_std_in_grpo: bool = True, config=None):
        name = _estimator_name(adv_estimator)
        if name == "grpo" and _GRPO_IS_OURS.get():
            name = OUR_GRPO
        if not _is_ours(name):
            return compute_advantage(data, adv_estimator, gamma, lam, num_repeat, norm_adv_by_std_in_grpo, config)
        if "response_mask" not in data.batch.keys():  # as verl's compute_advantage: from its module
            data.batch["response_mask"] = compute_advantage.__globals__["compute_response_mask"](data)
        kwargs = estimator_kwargs(name, data.batch, data.non_tensor_batch, config, norm_adv_by_std_in_grpo)
        advantages, returns = core_algos.get_adv_estimator_fn(name)(**kwargs)
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        return data

    wrapped.grpo_kernels_wrapped = True
    return wrapped


def wrap_multi_trajectories(compute_advantage_for_multi_trajectories: Callable) -> Callable:
    """verl's v1 `compute_advantage_for_multi_trajectories`, which treats GRPO apart (advantages
    from each agent session's final output, broadcast to the session): grpo_kernels_grpo takes
    that path too, with our estimator inside it."""
    if getattr(compute_advantage_for_multi_trajectories, "grpo_kernels_wrapped", False):
        return compute_advantage_for_multi_trajectories

    @functools.wraps(compute_advantage_for_multi_trajectories)
    def wrapped(data, batch_keys, adv_estimator, *args, **kwargs):
        if _estimator_name(adv_estimator) != OUR_GRPO:
            return compute_advantage_for_multi_trajectories(data, batch_keys, adv_estimator, *args, **kwargs)
        token = _GRPO_IS_OURS.set(True)
        try:
            return compute_advantage_for_multi_trajectories(data, batch_keys, core_algos.AdvantageEstimator.GRPO,
                                                            *args, **kwargs)
        finally:
            _GRPO_IS_OURS.reset(token)

    wrapped.grpo_kernels_wrapped = True
    return wrapped


TRAINER_MODULES = ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.v1.utils",
                   "verl.experimental.separation.ray_trainer")


def patch_compute_advantage(modules=None) -> Tuple[str, ...]:
    """Install `wrap_compute_advantage` as `compute_advantage` (and `wrap_multi_trajectories` as
    v1's `compute_advantage_for_multi_trajectories`) in verl's trainer modules that are imported
    (by default TRAINER_MODULES, looked up in sys.modules: each binds the names at its import, so
    the plugin patches each as it is imported). Returns the patched module names."""
    import sys

    patched = []
    for module_name in modules or TRAINER_MODULES:
        module = sys.modules.get(module_name)
        if module is None:
            continue
        if hasattr(module, "compute_advantage"):
            module.compute_advantage = wrap_compute_advantage(module.compute_advantage)
            patched.append(module_name)
        if hasattr(module, "compute_advantage_for_multi_trajectories"):
            module.compute_advantage_for_multi_trajectories = wrap_multi_trajectories(
                module.compute_advantage_for_multi_trajectories)
    return tuple(patched)
