"""`backend="torch"`: memory-lean PyTorch kernels for any device.

Rows are processed in chunks, so at most one chunk of fp32 logits lives at a time
(`CHUNK_BYTES`), and the backward keeps only per-row statistics (lse, entropy) between
forward and backward: never an (N, V) fp32 tensor. Statistics are fp32, or fp64 for fp64
logits (the validation path: fp64 in, fp64 out).
"""
from __future__ import annotations

import torch

from ..transform import LogitTransform
from .dispatch import stats_dtype

# fp32 working set of one chunk of rows; several temporaries of this size may coexist.
CHUNK_BYTES = 16 * 1024 * 1024


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def _chunk_stats(z: torch.Tensor, lse: torch.Tensor):
    """Probabilities p and the finite-safe z' (−inf entries set to 0, where p is 0 anyway)."""
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(z - finite_lse.unsqueeze(-1))
    p = torch.where(torch.isneginf(z) | ~torch.isfinite(lse).unsqueeze(-1), torch.zeros_like(p), p)
    z_safe = torch.where(p > 0, z, torch.zeros_like(z))
    return p, z_safe


def _finite(z: torch.Tensor, lse: torch.Tensor) -> bool:
    """No −inf or NaN in the chunk: the fast paths, without the −inf-safe masking, apply."""
    return bool(torch.isfinite(lse).all()) and not bool(torch.isinf(z).any())


def _row_blocks(logits: torch.Tensor):
    """(first row, 2-D view of rows) pieces covering (N, V) or strided (B, T, V) logits without copying."""
    if logits.dim() == 2:
        yield 0, logits
        return
    t = logits.shape[1]
    for b in range(logits.shape[0]):
        yield b * t, logits[b]


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, transform: LogitTransform, with_entropy: bool = True):
    """logits (B, T, V) or (N, V), ids (N,) -> logp, entropy, lse, each (N,) fp32 (fp64 for fp64 logits).

    `transform` maps logits to z' (temperature, logit scale, softcap). Without `with_entropy`
    the entropy is not computed (returned as zeros).
    """
    vocab = logits.shape[-1]
    n = ids.numel()
    logp = torch.empty(n, dtype=stats_dtype(logits), device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
    lse = torch.empty_like(logp)
    step = rows_per_chunk(vocab)
    for offset, rows in _row_blocks(logits):
        for c0 in range(0, rows.shape[0], step):
            c1 = min(rows.shape[0], c0 + step)
            _forward_chunk(rows[c0:c1], ids, offset + c0, offset + c1, transform, logp,
                           entropy if with_entropy else None, lse)
    return logp, entropy, lse


def _transformed(chunk, transform):
    return transform.apply(chunk.to(stats_dtype(chunk)))


def _forward_chunk(chunk, ids, r0, r1, transform, logp, entropy, lse):
    z = _transformed(chunk, transform)
    chunk_lse = torch.logsumexp(z, dim=-1)
    lse[r0:r1] = chunk_lse
    logp[r0:r1] = z.gather(-1, ids[r0:r1].long().unsqueeze(-1)).squeeze(-1) - chunk_lse
    if entropy is None:
        return
    if _finite(z, chunk_lse):
        # Fast path (no −inf, no NaN): H = −Σ p·(z' − lse), one fused dot product per row, and
        # no cancellation between lse and E[z'] when the logits are large.
        log_p = z - chunk_lse.unsqueeze(-1)
        entropy[r0:r1] = -torch.linalg.vecdot(torch.exp(log_p), log_p)
        return
    p, z_safe = _chunk_stats(z, chunk_lse)
    log_p = torch.where(p > 0, z_safe - chunk_lse.unsqueeze(-1), torch.zeros_like(z_safe))
    entropy[r0:r1] = -(p * log_p).sum(-1)


def logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, transform: LogitTransform, out):
    """Write dL/dlogits into `out` (which may be `logits` itself, for the in-place variant).

    dz_v = [g_logp (1[v=y] − p_v) − g_H p_v (z'_v − E_p z')] · dz'_v/dz_v, with E_p z' = lse − H.
    """
    step = rows_per_chunk(logits.shape[-1])
    for (offset, rows), (_, out_rows) in zip(_row_blocks(logits), _row_blocks(out)):
        for c0 in range(0, rows.shape[0], step):
            c1 = min(rows.shape[0], c0 + step)
            out_rows[c0:c1] = _backward_chunk(rows[c0:c1], ids, offset + c0, offset + c1, lse, entropy, grad_logp,
                                              grad_entropy, transform).to(out.dtype)
    return out


def _chain(grad, z, transform):
    """grad w.r.t. z' -> grad w.r.t. z, in place where it can be."""
    scale, cap = transform.kernel_params
    if cap != 0.0:
        return grad.mul_(transform.derivative(z))
    return grad if scale == 1.0 else grad.mul_(scale)


def _backward_chunk(chunk, ids, r0, r1, lse, entropy, grad_logp, grad_entropy, transform):
    z = _transformed(chunk, transform)
    dtype = z.dtype
    chunk_lse = lse[r0:r1]
    g_logp = grad_logp[r0:r1].to(dtype).unsqueeze(-1)
    target = ids[r0:r1].long().unsqueeze(-1)
    if _finite(z, chunk_lse):
        # Fast path (no −inf): dz = onehot·g_logp − p·(g_logp + g_H·(z' − E_p z')), one buffer, in place,
        # with z' − E_p z' = (z' − lse) + H (no cancellation when the logits are large).
        softcapped = transform.softcap is not None  # z' is needed again for dz'/dz
        log_p = z - chunk_lse.unsqueeze(-1)
        p = torch.exp(log_p)
        if grad_entropy is None:
            grad = p.mul_(-g_logp)
        else:
            grad = log_p.add_(entropy[r0:r1].unsqueeze(-1)).mul_(grad_entropy[r0:r1].to(dtype).unsqueeze(-1))
            grad = grad.add_(g_logp).mul_(p).neg_()
        grad.scatter_add_(-1, target, g_logp)
        return _chain(grad, z if softcapped else None, transform)
    p, z_safe = _chunk_stats(z, chunk_lse)
    grad = -g_logp * p
    grad.scatter_add_(-1, target, g_logp)
    if grad_entropy is not None:
        finite_lse = torch.where(torch.isfinite(chunk_lse), chunk_lse, torch.zeros_like(chunk_lse))
        centred = torch.where(p > 0, z_safe - finite_lse.unsqueeze(-1) + entropy[r0:r1].unsqueeze(-1),
                              torch.zeros_like(z_safe))
        grad = grad - grad_entropy[r0:r1].to(dtype).unsqueeze(-1) * p * centred
    return _chain(grad, z, transform)


def group_advantages(total, group_index, num_groups, scale_rewards, eps, group_size=None):
    """Vectorised group statistics with deterministic row reductions (no atomics).

    total (N,) aggregated rewards (NaN = unscorable); group_index (N,) in [0, num_groups).
    Rows are laid out as a padded (num_groups, max_size) matrix, then reduced along dim 1.
    scale_rewards "gdpo" is the last step of normalize_then_sum: a batch z-score, no centring.
    """
    grid = total.view(num_groups, group_size) if group_size else _group_grid(total, group_index, num_groups)
    mean, std, count, constant = _nan_row_stats(grid)
    centred = total - mean[group_index]
    if scale_rewards == "gdpo":
        b_mean, b_std = _nan_stats_1d(total)
        adv = (total - b_mean) / (b_std + eps)
    elif scale_rewards == "group":
        adv = centred / (std[group_index] + eps)
    elif scale_rewards == "rloo":
        c = count[group_index]
        adv = centred * c / (c - 1).clamp(min=1)
    else:
        adv = centred
    if scale_rewards == "batch":
        adv = adv / (_nan_stats_1d(total)[1] + eps)
    elif scale_rewards == "reinforce++":
        c_mean, c_std = _nan_stats_1d(adv)
        adv = (adv - c_mean) / (c_std + eps)
    adv = torch.where(constant[group_index] | torch.isnan(adv), torch.zeros_like(adv), adv)
    return adv, mean, std, constant


def zscore_within_groups(rewards, group_index, num_groups, eps, group_size=None):
    """GDPO step: z-score each reward function (column) within its group; constant groups give 0."""
    cols = []
    for f in range(rewards.shape[1]):
        col = rewards[:, f]
        grid = col.view(num_groups, group_size) if group_size else _group_grid(col, group_index, num_groups)
        mean, std, _, constant = _nan_row_stats(grid)
        z = (col - mean[group_index]) / (std[group_index] + eps)
        cols.append(torch.where(constant[group_index] & ~torch.isnan(col), torch.zeros_like(z), z))
    return torch.stack(cols, dim=1)


def _group_grid(values, group_index, num_groups):
    order = torch.argsort(group_index, stable=True)
    counts = torch.bincount(group_index, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    sorted_groups = group_index[order]
    pos = torch.arange(values.numel(), device=values.device) - starts[sorted_groups]
    width = int(counts.max()) if values.numel() else 1
    grid = torch.full((num_groups, width), float("nan"), dtype=values.dtype, device=values.device)
    grid[sorted_groups, pos] = values[order]
    return grid


def _nan_row_stats(grid):
    ok = ~torch.isnan(grid)
    count = ok.sum(1).to(grid.dtype)
    mean = torch.where(ok, grid, 0).sum(1) / count.clamp(min=1)
    var = torch.where(ok, (grid - mean.unsqueeze(1)) ** 2, 0).sum(1) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.zeros_like(var))
    first = torch.where(ok, grid, float("inf")).amin(1)
    last = torch.where(ok, grid, -float("inf")).amax(1)
    constant = (count < 2) | (first == last)
    return mean, std, count, constant


def _nan_stats_1d(values):
    mean, std, _, _ = _nan_row_stats(values.unsqueeze(0))
    return mean[0], std[0]
