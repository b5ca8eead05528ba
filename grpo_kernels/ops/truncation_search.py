"""The truncation threshold of each row (top-k, top-p, min-p) without sorting the vocabulary.

Shared by the torch backend (one chunk of rows, the whole vocabulary) and the vocabulary-parallel
path (every rank's slice of the same rows; each per-row reduction is then an all-reduce over the
group, O(1) per row per pass: a maximum, a minimum, or a 256-bin histogram).

Semantics (docs/math.md, "Truncated sampling"), on z' = transform(z) per row:
    min_p  K1 = {z' >= max z' + log min_p}
    top_k  K2 = {v in K1 : z_v >= the k-th largest value of K1}            (ties kept)
    top_p  K3 = {v in K2 : mass of K2 strictly above z_v < top_p}          (q = softmax over K2;
           the same as vLLM's "ascending cumulative mass up to and including z_v > 1 − top_p")
The result is one threshold per row in RAW logit units: K3 = {v : z_v >= threshold}. The transform
is non-decreasing, so every set above is an upper set of the raw values, and its smallest member is
an exact input value: compared with `z >= threshold` it selects the same entries in every backend.

The select is a radix select on order-preserving integer keys of the raw logits (the IEEE bits with
the magnitude flipped for negative values, then the sign bit flipped): one pass per 8-bit digit,
2 for bf16/fp16 logits, 4 for fp32 (8 for the fp64 validation path). Each pass builds per row a
256-bin histogram (scatter_add) of the counts (top_k) or the probability mass (top_p) of the
entries still tied with the prefix chosen so far, and picks the digit where the descending
cumulative count reaches k (mass reaches top_p). Per row and chunk this reads the logits
2 + 2·passes times (z', then per pass the digits), never sorts, and keeps no (V,) state between rows.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..truncation import Truncation

DIGIT_BITS = 8
BINS = 1 << DIGIT_BITS
_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class RowReduce:
    """The per-row reductions of the search: over this tensor's vocabulary (group None), or over
    the vocabulary slices of a torch.distributed group (one all-reduce each, in place)."""

    def __init__(self, group=None):
        self.group = group

    def _all(self, x: torch.Tensor, op) -> torch.Tensor:
        if self.group is not None:
            dist.all_reduce(x, op=op, group=self.group)
        return x

    def max(self, x):
        return self._all(x, dist.ReduceOp.MAX if self.group is not None else None)

    def min(self, x):
        return self._all(x, dist.ReduceOp.MIN if self.group is not None else None)

    def sum(self, x):
        return self._all(x, dist.ReduceOp.SUM if self.group is not None else None)


LOCAL = RowReduce()


def ordered_keys(raw: torch.Tensor) -> torch.Tensor:
    """Integer keys (raw's itemsize) whose unsigned order is the order of the float values:
    negative floats get their magnitude bits flipped (larger magnitude, smaller key), then the sign
    bit is flipped (negatives below positives). −0.0 sorts just below +0.0, which is harmless:
    the kept set is read back with `z >= threshold`, where they compare equal."""
    ints = raw.contiguous().view(_INT_OF[raw.element_size()])
    bits = raw.element_size() * 8
    low_bits = (1 << (bits - 1)) - 1
    sign = torch.tensor(-(1 << (bits - 1)), dtype=ints.dtype, device=ints.device)
    return (ints ^ ((ints >> (bits - 1)) & low_bits)) ^ sign


def _digit(keys: torch.Tensor, pass_index: int) -> torch.Tensor:
    """The pass's 8-bit digit of every key, most significant first, as int64 bin indices."""
    shift = keys.element_size() * 8 - DIGIT_BITS * (pass_index + 1)
    # `& (BINS - 1)` extracts the byte whether the shift is arithmetic or logical.
    return ((keys >> shift) & (BINS - 1)).long()


def _radix_select(keys, raw, candidates, weights, target, reduce: RowReduce):
    """The largest value t of each row such that the weight of {candidates >= t} reaches `target`
    ((R,), > 0), or, when the candidates' whole weight falls short of it, their smallest value;
    −inf for a row without candidates. `weights` (R, V) >= 0 (counts or masses), 0 off-candidate.

    Per pass: the histogram of the weight of the candidates tied with the prefix so far, by digit;
    the descending cumulative weight (suffix sums) picks the digit d where the target is reached;
    the weight of the digits above d is taken off the target; the candidates narrow to digit d.
    """
    for pass_index in range(keys.element_size() * 8 // DIGIT_BITS):
        digit = _digit(keys, pass_index)
        hist = torch.zeros(keys.shape[0], BINS, dtype=weights.dtype, device=keys.device)
        hist.scatter_add_(1, digit, torch.where(candidates, weights, 0))
        reduce.sum(hist)
        above_or_at = hist.flip(1).cumsum(1).flip(1)  # weight with digit >= d
        # When the prefix's weight falls short (fewer than k left, or rounding of the masses), aim
        # at all of it: the chosen digit is then the smallest with weight, and every candidate stays.
        aim = torch.minimum(target.unsqueeze(1), above_or_at[:, :1])
        chosen = ((above_or_at >= aim) & (above_or_at > 0)).sum(1, keepdim=True) - 1  # -1: no candidate
        chosen_clamped = chosen.clamp(min=0)
        target = (aim - (above_or_at.gather(1, chosen_clamped) - hist.gather(1, chosen_clamped))).squeeze(1)
        candidates = candidates & (digit == chosen) & (chosen >= 0)
    # The candidates left all hold the threshold's key: read its value (an exact input value).
    return reduce.max(_row_extreme(torch.where(candidates, raw, float("-inf")), "amax"))


def _as_rows(values: torch.Tensor) -> torch.Tensor:
    return values.unsqueeze(1)


def _row_extreme(values: torch.Tensor, which: str) -> torch.Tensor:
    """Row max ("amax") or min ("amin") of (R, V), −inf / +inf for a slice with no entry (V = 0)."""
    if values.shape[1] == 0:
        fill = float("-inf") if which == "amax" else float("inf")
        return torch.full(values.shape[:1], fill, dtype=values.dtype, device=values.device)
    return getattr(values, which)(1)


def find_threshold(logits: torch.Tensor, z_prime: torch.Tensor, truncation: Truncation,
                   reduce: RowReduce = LOCAL, vocab: Optional[int] = None) -> torch.Tensor:
    """(R,) thresholds in raw-logit units (stats dtype of z_prime) of the rows of `logits` (R, V)
    (the input dtype: its bits are the radix keys) with z_prime = transform(logits) (R, V), in the
    stats dtype. `reduce` combines the per-row reductions over vocabulary slices; `vocab` is the
    whole vocabulary's size (default V: top_k >= vocab keeps everything). −inf: keep every entry.

    Never reads a value on the host: every branch below is on the settings, not on the data.
    """
    rows = logits.shape[0]
    raw = logits.to(z_prime.dtype)
    threshold = torch.full((rows,), float("-inf"), dtype=z_prime.dtype, device=logits.device)
    vocab = logits.shape[1] if vocab is None else vocab
    if rows == 0 or not truncation.active:
        return threshold
    needs_peak = truncation.min_p > 0.0 or truncation.top_p < 1.0
    peak = reduce.max(_row_extreme(z_prime, "amax")) if needs_peak else None
    kept = None  # (R, V) bool: the set so far (None: every entry)
    if truncation.min_p > 0.0:
        # K1: z' >= max z' + log min_p; its smallest raw value is the threshold. A row of −inf
        # has bound −inf and keeps everything.
        kept = z_prime >= _as_rows(peak + truncation.log_min_p)
        lowest = reduce.min(_row_extreme(torch.where(kept, raw, float("inf")), "amin"))
        threshold = torch.where(lowest == float("inf"), threshold, lowest)  # a slice with no entry
    keys = ordered_keys(logits) if 0 < truncation.top_k < vocab or truncation.top_p < 1.0 else None
    if 0 < truncation.top_k < vocab:
        candidates = kept if kept is not None else torch.ones_like(z_prime, dtype=torch.bool)
        counts = torch.ones_like(z_prime)
        target = torch.full((rows,), float(truncation.top_k), dtype=z_prime.dtype, device=logits.device)
        # K2: the k-th largest of K1 (K1's smallest value when it holds fewer than k).
        kth = _radix_select(keys, raw, candidates, counts, target, reduce)
        threshold = torch.maximum(threshold, kth)
        kept = raw >= _as_rows(threshold)
    if truncation.top_p < 1.0:
        # q over K2, unnormalised: e = exp(z' − max z') (the peak is always in K2); the target mass
        # is top_p · Σ_K2 e. K3's smallest value is where the descending cumulative mass reaches it.
        shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
        e = torch.exp(z_prime - _as_rows(shift))
        if kept is not None:
            e = torch.where(kept, e, 0.0)
        total = reduce.sum(e.sum(1))
        candidates = e > 0  # entries of zero mass are never needed to reach the target
        cut = _radix_select(keys, raw, candidates, e, total * truncation.top_p, reduce)
        threshold = torch.maximum(threshold, cut)
    return threshold
