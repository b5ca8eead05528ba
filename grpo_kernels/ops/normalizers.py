"""Batch-wide quantities of the objective (docs/math.md, "Aggregation" and "Entropy mask"), on the
device and without a host read, for the packed (N,) token layout every backend works in.

The loss of any subset of tokens (a row block of the fused-linear path, one sequence, the whole
batch) is its share of the batch loss once these are fixed: the aggregation divisor, the
entropy mask from the batch-wide quantile, the entropy-bonus divisor, and each sequence's token
count. reference.py computes the same quantities its own way, on padded tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..options import Agg, LossParams

# q·(n − 1) within this of an integer is that integer: the same boundary token in fp32 and fp64.
QUANTILE_SNAP = 1e-9


@dataclass
class ObjectiveTotals:
    """normalizer: the aggregation divisor (token count, B, or B·max_completion_length), 0-d fp64.
    entropy_keep: (N,) bool, the tokens the entropy mask keeps (None: no entropy mask).
    entropy_normalizer: Σ of the effective entropy mask over the batch (>= 1), 0-d fp64.
    counts: (B,) the unmasked tokens of each sequence, in the statistics' dtype."""

    normalizer: torch.Tensor
    entropy_keep: Optional[torch.Tensor]
    entropy_normalizer: torch.Tensor
    counts: torch.Tensor


def sequence_counts(mask: torch.Tensor, cu_seqlens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B,) unmasked tokens per sequence, from a cumulative count read at the sequence bounds (exact)."""
    running = torch.zeros(mask.numel() + 1, dtype=torch.int64, device=mask.device)
    running[1:] = torch.cumsum(mask, 0)
    cu = cu_seqlens.long()
    return (running[cu[1:]] - running[cu[:-1]]).to(dtype)


def masked_quantile(values: torch.Tensor, mask: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile (linear interpolation, as torch.quantile) of values[mask], as a 0-d tensor.

    Masked-out entries sort last (+inf), so the n selected values lead; positions are read
    with tensor indices, so nothing leaves the device. With no selected value the result is +inf.
    """
    if values.numel() == 0:
        return values.new_full((), float("inf"))
    ordered = torch.sort(torch.where(mask, values, float("inf"))).values
    count = mask.sum().to(torch.float64)
    pos = q * (count - 1)
    nearest = torch.round(pos)
    snapped = (pos - nearest).abs() < QUANTILE_SNAP
    lo = torch.where(snapped, nearest, torch.floor(pos)).clamp(min=0)
    frac = torch.where(snapped, torch.zeros_like(pos), pos - lo).to(values.dtype)
    last = values.numel() - 1
    lo_index = lo.long().clamp(max=last).reshape(1)
    # index_select, not ordered[lo_index]: indexing with a 0-d tensor reads it on the host.
    v_lo = ordered.index_select(0, lo_index).reshape(())
    v_hi = ordered.index_select(0, (lo_index + 1).clamp(max=last)).reshape(())
    # frac = 0 must not meet v_hi = +inf (the first masked-out entry): 0·inf is NaN.
    return torch.where(frac == 0, v_lo, v_lo + frac * (v_hi - v_lo))


def batch_totals(entropy: torch.Tensor, mask: torch.Tensor, cu_seqlens: torch.Tensor, params: LossParams,
                 num_items_in_batch=None) -> ObjectiveTotals:
    """ObjectiveTotals of a batch: entropy and mask (N,), cu_seqlens (B+1,). No host read."""
    bsz = cu_seqlens.numel() - 1
    device = mask.device
    if params.agg == Agg.TOKEN_MEAN:
        count = mask.sum()
        if num_items_in_batch is not None and params.uses_num_items:
            count = torch.as_tensor(num_items_in_batch, device=device)
        normalizer = count.to(torch.float64).clamp(min=1)
    elif params.agg == Agg.SEQ_MEAN_TOKEN_SUM_NORM:
        normalizer = torch.tensor(float(bsz * params.max_completion_length), dtype=torch.float64, device=device)
    else:
        normalizer = torch.tensor(float(bsz), dtype=torch.float64, device=device)
    keep, effective = None, mask
    if params.has_entropy_mask:
        threshold = masked_quantile(entropy, mask, 1.0 - params.top_entropy_quantile)
        keep = (entropy >= threshold) & mask
        effective = keep
    return ObjectiveTotals(normalizer, keep, effective.sum().to(torch.float64).clamp(min=1),
                           sequence_counts(mask, cu_seqlens, entropy.dtype))
