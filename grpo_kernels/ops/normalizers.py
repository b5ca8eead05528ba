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


def scalar_tensor(value, dtype: torch.dtype, device) -> torch.Tensor:
    """A number or a one-element tensor as a 0-d tensor of `dtype` on `device`. A Python number
    is written by a fill kernel, not copied from the host: a pageable host-to-device copy is not
    allowed while a CUDA graph is being captured."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(())
    return torch.full((), value, dtype=dtype, device=device)


@dataclass
class ObjectiveTotals:
    """In the statistics' dtype: normalizer (1,), the aggregation divisor (token count, B, or
    B·max_completion_length); entropy_keep (N,) bool, the tokens the entropy mask keeps (None: no
    entropy mask); entropy_normalizer (1,), Σ of the effective entropy mask (>= 1), only when the
    entropy bonus is on (else the normalizer, which no backend then reads); counts (B,) the
    unmasked tokens of each sequence."""

    normalizer: torch.Tensor
    entropy_keep: Optional[torch.Tensor]
    entropy_normalizer: torch.Tensor
    counts: torch.Tensor


def sequence_counts(mask: torch.Tensor, cu_seqlens: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B,) unmasked tokens per sequence (exact: sums of 0/1), one segment sum over cu_seqlens."""
    return torch.segment_reduce(mask.to(dtype), "sum", offsets=cu_seqlens)


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
    """ObjectiveTotals of a batch: entropy (N,) in the statistics' dtype, mask (N,) bool, cu_seqlens
    (B+1,) int64. No host read."""
    bsz, dtype, device = cu_seqlens.numel() - 1, entropy.dtype, mask.device
    if params.agg == Agg.TOKEN_MEAN:
        if num_items_in_batch is not None and params.uses_num_items:
            count = scalar_tensor(num_items_in_batch, dtype, device)
        else:
            count = mask.sum()  # an exact integer, whatever N
        normalizer = count.to(dtype).clamp(min=1).reshape(1)
    else:
        per_sequence = params.max_completion_length if params.agg == Agg.SEQ_MEAN_TOKEN_SUM_NORM else 1
        normalizer = torch.full((1,), float(bsz * per_sequence), dtype=dtype, device=device)
    keep, effective = None, mask
    if params.has_entropy_mask:
        threshold = masked_quantile(entropy, mask, 1.0 - params.top_entropy_quantile)
        keep = (entropy >= threshold) & mask
        effective = keep
    entropy_normalizer = normalizer
    if params.entropy_coef != 0.0:
        entropy_normalizer = effective.sum().to(dtype).clamp(min=1).reshape(1)
    return ObjectiveTotals(normalizer, keep, entropy_normalizer, sequence_counts(mask, cu_seqlens, dtype))
