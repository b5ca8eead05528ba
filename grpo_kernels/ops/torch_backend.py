"""`backend="torch"`: memory-lean PyTorch kernels for any device.

Rows are processed in chunks, so at most one chunk of fp32 logits lives at a time
(`CHUNK_BYTES`), and the backward keeps only per-row statistics (lse, entropy) between
forward and backward: never an (N, V) fp32 tensor. Statistics are fp32, or fp64 for fp64
logits (the validation path: fp64 in, fp64 out).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..transform import KernelTransform
from ..truncation import NO_TRUNCATION, Truncation
from .dispatch import stats_dtype
from .truncation_search import find_threshold
from .torch_objective import objective_pass  # noqa: F401 - the backend's objective op

# Working set of one chunk of rows (fp32, or fp64 for fp64 logits). Two temporaries of this size
# coexist; small enough to stay in the CPU's cache between the passes over a chunk, which is
# what makes the chunked passes faster than eager log_softmax + gather on the whole (N, V).
CHUNK_BYTES = {"cpu": 1024 * 1024}
# On GPUs a chunk is large enough to fill the device; the per-chunk host syncs stay few.
DEVICE_CHUNK_BYTES = 64 * 1024 * 1024


def rows_per_chunk(vocab: int, itemsize: int = 4, device_type: str = "cpu") -> int:
    budget = CHUNK_BYTES.get(device_type, DEVICE_CHUNK_BYTES)
    return max(1, budget // (itemsize * max(vocab, 1)))


def _row_blocks(logits: torch.Tensor):
    """(first row, 2-D view of rows) pieces covering (N, V) or strided (B, T, V) logits without copying."""
    if logits.dim() == 2:
        yield 0, logits
        return
    t = logits.shape[1]
    for b in range(logits.shape[0]):
        yield b * t, logits[b]


def _chunk_step(logits: torch.Tensor) -> int:
    """Rows per chunk for these logits: the statistics' itemsize and the device's budget."""
    return rows_per_chunk(logits.shape[-1], torch.finfo(stats_dtype(logits)).bits // 8, logits.device.type)


def row_chunks(logits: torch.Tensor, step: int):
    """(r0, r1, rows) chunks of at most `step` rows, in row order."""
    for offset, rows in _row_blocks(logits):
        for c0 in range(0, rows.shape[0], step):
            c1 = min(rows.shape[0], c0 + step)
            yield offset + c0, offset + c1, rows[c0:c1]


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, transform: KernelTransform, with_entropy: bool = True,
                     truncation: Truncation = NO_TRUNCATION, threshold: Optional[torch.Tensor] = None,
                     with_sum_pi_sq: bool = False):
    """logits (B, T, V) or (N, V), ids (N,) -> (logp, entropy, lse, threshold, sum_pi_sq), each (N,)
    fp32 (fp64 for fp64 logits: the threshold too, so that it stays an exact input value).

    `transform` maps logits to z' (temperature, logit scale, softcap). Without `with_entropy`
    (`with_sum_pi_sq`) that output is zeros. With `truncation` active and no `threshold`, each
    chunk's rows find theirs (ops/truncation_search.py); the kept set is {z >= threshold} ∪ {y}
    (y only when the id is in [0, V): vocabulary-parallel rows pass −1 for another rank's target).
    Branch-free: −inf logits and rows without a finite logit are handled by the same arithmetic
    as any other row, so nothing is read on the host.
    """
    n = ids.numel()
    logp = torch.empty(n, dtype=stats_dtype(logits), device=logits.device)
    entropy = torch.empty_like(logp) if with_entropy else torch.zeros_like(logp)
    sum_pi_sq = torch.empty_like(logp) if with_sum_pi_sq else torch.zeros_like(logp)
    lse = torch.empty_like(logp)
    found = torch.full_like(logp, float("-inf")) if threshold is None else threshold.to(logp.dtype)
    search = threshold is None and truncation.active
    truncated = threshold is not None or truncation.active
    for r0, r1, chunk in row_chunks(logits, _chunk_step(logits)):
        z = _transformed(chunk, transform)
        if search:
            found[r0:r1] = find_threshold(chunk, z, truncation)
        if truncated:
            z = _truncated(z, chunk, ids[r0:r1], found[r0:r1])
        _forward_chunk(z, ids, r0, r1, logp, entropy if with_entropy else None, lse,
                       sum_pi_sq if with_sum_pi_sq else None)
    return logp, entropy, lse, found, sum_pi_sq


def _transformed(chunk, transform):
    return transform.apply(chunk.to(stats_dtype(chunk)))


def _kept(chunk, ids, threshold):
    """(rows, V) bool: the kept set {z >= threshold} ∪ {y}; a target id outside [0, V) (another
    rank's) adds nothing. Compared on the raw logits, exactly as the threshold was found. NaN
    logits are kept, so that they make the row's statistics NaN (reported, never dropped)."""
    values = chunk.to(threshold.dtype)
    kept = (values >= threshold.unsqueeze(-1)) | values.isnan()  # a NaN logit stays in K: it must reach lse
    target = ids.long().unsqueeze(-1)
    owned = (target >= 0) & (target < chunk.shape[-1])
    return kept.scatter_(-1, target.clamp(0, chunk.shape[-1] - 1), owned | kept.gather(-1, target.clamp(
        0, chunk.shape[-1] - 1)))


def _truncated(z, chunk, ids, threshold):
    """z' with −inf outside the kept set: the softmax over K, renormalised."""
    return torch.where(_kept(chunk, ids, threshold), z, float("-inf"))


def _forward_chunk(z, ids, r0, r1, logp, entropy, lse, sum_pi_sq=None):
    """lse = m + log Σ exp(z' − m); H = log s − Σ p·(z' − m) / s (two non-negative terms, so no
    cancellation when the logits are large); Σp² = Σ e² / s². −inf entries are lifted to the lowest
    finite value after the target is read: exp gives exactly 0 there and 0·(lowest) = 0 in the entropy."""
    peak = z.amax(-1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a row of −inf: shift by 0
    shifted = z - peak
    target = ids[r0:r1].long().clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    # log p_y = (z'_y − m) − log s, from the shifted values: exact for large logits; −inf stays −inf.
    target_shifted = shifted.gather(-1, target).squeeze(-1)
    shifted.clamp_(min=torch.finfo(shifted.dtype).min)
    e = torch.exp(shifted)
    total = e.sum(-1)
    log_total = torch.log(total)
    logp[r0:r1] = target_shifted - log_total
    lse[r0:r1] = peak.squeeze(-1) + log_total
    if entropy is not None:
        h = log_total - torch.linalg.vecdot(e, shifted) / total
        entropy[r0:r1] = torch.where(total > 0, h, torch.zeros_like(h))  # no finite logit: H = 0
    if sum_pi_sq is not None:
        squares = torch.linalg.vecdot(e, e) / (total * total)
        sum_pi_sq[r0:r1] = torch.where(total > 0, squares, torch.zeros_like(squares))


def logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, transform: KernelTransform, out,
                      threshold: Optional[torch.Tensor] = None):
    """Write dL/dlogits into `out` (which may be `logits` itself, for the in-place variant).
    An id outside [0, V) means the row's target is not in these logits (vocabulary-parallel).

    dz_v = [g_logp (1[v=y] − p_v) − g_H p_v (z'_v − E_p z')] · dz'_v/dz_v, with E_p z' = lse − H,
    and p_v = 0 outside the kept set {z >= threshold} ∪ {y} (threshold None: every entry).
    Branch-free like the forward: a row without a finite logit (lse = −inf) gets p = 0.
    """
    lse = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, float("inf")))
    step = _chunk_step(logits)  # one step for both, so the chunks of logits and out line up
    for (r0, r1, chunk), (_, _, out_rows) in zip(row_chunks(logits, step), row_chunks(out, step)):
        _backward_chunk(chunk, ids, r0, r1, lse, entropy, grad_logp, grad_entropy, transform, out_rows,
                        None if threshold is None else threshold[r0:r1])
    return out


def _chain(grad, z, transform):
    """grad w.r.t. z' -> grad w.r.t. z, in place where it can be."""
    if transform.cap != 0.0:
        return grad.mul_(transform.derivative(z))
    return grad if transform.scale == 1.0 else grad.mul_(transform.scale)


def _backward_chunk(chunk, ids, r0, r1, lse, entropy, grad_logp, grad_entropy, transform, out_rows, threshold):
    z = _transformed(chunk, transform)
    dtype = z.dtype
    chunk_lse = lse[r0:r1].unsqueeze(-1)
    g_logp = grad_logp[r0:r1].to(dtype).unsqueeze(-1)
    # A target outside [0, V) lies in another rank's vocabulary slice: no one-hot term here.
    row_ids = ids[r0:r1].long().unsqueeze(-1)
    vocab = chunk.shape[-1]
    target, g_onehot = row_ids.clamp(0, vocab - 1), torch.where((row_ids >= 0) & (row_ids < vocab), g_logp, 0.0)
    direct = transform.is_identity and out_rows.dtype == dtype  # write the result straight into `out`
    p = torch.exp(z - chunk_lse)  # 0 at −inf logits and in rows without a finite logit
    if threshold is not None:  # 0 outside the kept set: the set is piecewise constant in z
        p = p.masked_fill_(~_kept(chunk, ids[r0:r1], threshold.to(dtype)), 0.0)
    if grad_entropy is None:
        grad = torch.mul(p, g_logp.neg(), out=out_rows if direct else None)
        grad.nan_to_num_(nan=0.0)  # a NaN row (masked garbage) with zero upstream: 0·NaN is NaN, the gradient 0
    else:
        # dz = onehot·g_logp − p·(g_logp + g_H·(z' − lse + H)) = p·(a·z' + c) + onehot·g_logp, with
        # a = −g_H and c = −g_logp − g_H·(H − lse): three passes, no temporary besides p.
        g_h = grad_entropy[r0:r1].to(dtype).unsqueeze(-1)
        c = -g_logp - g_h * (entropy[r0:r1].unsqueeze(-1) - chunk_lse)
        grad = torch.mul(torch.addcmul(c, z, g_h.neg()), p, out=out_rows if direct else None)
        # Where p = 0 the bracket may be ±inf (z' = −inf, or no finite logit): 0·inf is NaN, the
        # true value is 0. NaN logits give NaN loss and log-probs, which the checks report.
        grad.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    grad.scatter_add_(-1, target, g_onehot)
    if not direct:
        out_rows.copy_(_chain(grad, z, transform))


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
