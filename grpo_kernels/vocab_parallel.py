"""Vocabulary-parallel log-probs: each rank of a torch.distributed group holds a slice of V.

Megatron, verl's Megatron backend and other tensor-parallel trainers shard the lm_head by
vocabulary rows: rank k holds logits (or lm_head rows) for ids [start_k, start_k + V_k). Each
rank runs the usual fused kernel on its slice, which gives the slice's own (logp_k, H_k, lse_k)
per row, and the full-vocabulary statistics follow from two all-reduces of O(N) floats:

    M     = max_k lse_k                                     all-reduce MAX, N floats
    w_k   = exp(lse_k − M)                                  (the slice's share of Σ exp(z' − M))
    S     = Σ_k w_k                      ┐
    E     = Σ_k w_k · (H_k + M − lse_k)  ├ one packed       all-reduce SUM, 3·N floats
    Y     = logp_o + lse_o − M           ┘ (o owns the target; 0 elsewhere)
    lse   = M + log S,   H = log S + E / S,   logp = Y − log S

Both terms of E are non-negative, so the entropy has no cancellation, and the target enters
relative to M, so large logits lose no precision. The backward needs no communication for the
logits: each rank's gradient of its slice is the usual kernel's, given the global lse and H,
with the one-hot term only on the rank that owns the target (ids outside the slice are passed
as −1). The lm_head path's gradient w.r.t. hidden is a sum over slices: one all-reduce of N·H.
The logits and the weights are never gathered.

Σp² (verl's sum_pi_squared) adds a fourth row to the packed sum: Σ_k Σp²_k · w_k², over S².
Truncated sampling (top-k, top-p, min-p): the thresholds are found first by the single-rank radix
search with its per-row reductions all-reduced (a max and a min per row, a 256-bin histogram per
row and pass), then each rank runs its kernel with them and the combine above, over the kept set.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist

from .ops.dispatch import stats_dtype
from .ops.logprobs import LogprobsBackward, RowStats, logprobs_rows
from .ops.torch_backend import row_chunks
from .ops.truncation_search import RowReduce, find_threshold
from .transform import KernelTransform
from .truncation import NO_TRUNCATION, Truncation

# Rows per chunk of the cross-rank threshold search (the same on every rank): its temporaries are a
# few (rows, V_local) tensors, and each chunk costs ~4 + 2·passes all-reduces of O(rows) values.
SEARCH_ROWS = {"cpu": 16}
DEVICE_SEARCH_ROWS = 256

# The per-rank layout entries compared before any per-row collective: a disagreement raises on
# every rank (they all see the same gathered table) instead of hanging in a mismatched all-reduce.
_LAYOUT_FIELDS = ("vocab_start", "V_local", "rows", "width")


class VocabShard:
    """This rank's slice [start, start + size) of a vocabulary of `total` ids over `group`.

    `total` and `widest` (the largest slice) are None when the layout was not gathered
    (validate=False); the slices are then trusted as given."""

    def __init__(self, group, start: int, size: int, total: Optional[int], widest: Optional[int] = None):
        self.group, self.start, self.size, self.total, self.widest = group, start, size, total, widest

    def split_ids(self, ids: torch.Tensor):
        """Global ids (N,) -> (ids to read in the forward, clamped into the slice; ids for the
        backward, −1 where the target is another rank's; (N,) bool: the target is here)."""
        local = ids.long() - self.start
        owned = (local >= 0) & (local < self.size)
        return local.clamp(0, self.size - 1), torch.where(owned, local, -1), owned

    def backward_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.split_ids(ids)[1]

    def combine(self, local: RowStats, owned, with_entropy: bool = True, with_sum_pi_sq: bool = False) -> RowStats:
        """The slice's RowStats per row -> the full vocabulary's (the threshold passes through)."""
        logp, entropy, lse = local.logp, local.entropy, local.lse
        peak = lse.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=self.group)
        shift = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # no finite logit anywhere: 0
        offset = lse - shift  # <= 0, −inf for a slice without a finite logit
        weight = torch.exp(offset)
        present = weight > 0
        spread = torch.where(present, weight * (entropy - offset), 0.0) if with_entropy else torch.zeros_like(weight)
        # The owner's target logit relative to M (−inf when it is −inf, or its slice has no finite logit).
        target = torch.where(owned, torch.where(present, logp + offset, float("-inf")), 0.0)
        parts = [weight, spread, target]
        if with_sum_pi_sq:  # Σ_v e^{2(z'_v − M)} = Σ_k Σp²_k · w_k², divided by S² below
            parts.append(torch.where(present, local.sum_pi_sq * weight * weight, 0.0))
        sums = torch.stack(parts)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        total, spread_sum, target_sum = sums[0], sums[1], sums[2]
        log_total = torch.log(total)
        full_entropy = (torch.where(total > 0, log_total + spread_sum / total, 0.0) if with_entropy
                        else torch.zeros_like(total))
        sum_pi_sq = (torch.where(total > 0, sums[3] / (total * total), 0.0) if with_sum_pi_sq
                     else torch.zeros_like(total))
        return RowStats(target_sum - log_total, full_entropy, shift + log_total, local.threshold, sum_pi_sq)

    def thresholds(self, logits: torch.Tensor, transform: KernelTransform, truncation: Truncation) -> torch.Tensor:
        """(N,) truncation thresholds (raw-logit units) over the whole vocabulary, from this rank's
        slice (N, V_local) or (B, T, V_local): the single-rank search (ops/truncation_search.py) with
        its per-row maxima, minima and 256-bin histograms all-reduced over the group, a fixed
        number of rows at a time (the same chunks on every rank, whatever its slice's width)."""
        dtype = stats_dtype(logits)
        n = logits.numel() // max(logits.shape[-1], 1)
        out = torch.empty(n, dtype=dtype, device=logits.device)
        reduce = RowReduce(self.group)
        vocab = self.total if self.total is not None else sys.maxsize  # unknown: searched whatever k is
        step = SEARCH_ROWS.get(logits.device.type, DEVICE_SEARCH_ROWS)
        for r0, r1, rows in row_chunks(logits, step):
            out[r0:r1] = find_threshold(rows, transform.apply(rows.to(dtype)), truncation, reduce, vocab)
        return out

    def local_stats(self, logits, ids, transform: KernelTransform, backend: str, with_entropy: bool,
                    truncation: Truncation, with_sum_pi_sq: bool):
        """(the full vocabulary's RowStats, the ids the gradient kernel takes) from this rank's slice:
        the thresholds across ranks when truncated, this slice's kernel with them, the combine."""
        read_ids, grad_ids, owned = self.split_ids(ids)
        threshold = None
        if truncation.active:
            threshold = self.thresholds(logits, transform, truncation)
            read_ids = grad_ids  # the kept set adds the target only on the rank that owns it
        local = logprobs_rows(logits, read_ids, transform, backend, with_entropy, threshold=threshold,
                              with_sum_pi_sq=with_sum_pi_sq)
        return self.combine(local, owned, with_entropy, with_sum_pi_sq), grad_ids

    def fewest(self, value: int, device) -> int:
        """The smallest of the ranks' `value` (one all-reduce and a host read)."""
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the group, in place (the lm_head's partial gradients w.r.t. hidden)."""
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


def vocab_shard(process_group, vocab_start, local_size: int, rows: int, width: int, device, validate: bool,
                what: str = "logits") -> Optional[VocabShard]:
    """The VocabShard of this rank, or None without a process group (the whole vocabulary here).

    `vocab_start` defaults to Megatron's even split, rank · V_local. With validate=True every rank's
    (vocab_start, V_local, rows, width) is gathered once (one all-gather of 4 ints) and checked:
    slices must tile [0, V) without gaps or overlaps, and every rank must pass the same number
    of rows (and hidden width), so a bad layout raises the same named error on every rank before
    any per-row collective could hang. `what` names the sliced input in the errors.
    """
    if process_group is None:
        if vocab_start is not None:
            raise ValueError("vocab_start is only meaningful with process_group (a vocabulary-parallel group)")
        return None
    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first")
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if vocab_start is None:
        vocab_start = rank * local_size
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be a non-negative int (the first id of this rank's slice), "
                         f"got {vocab_start!r}")
    if world == 1 or not validate:
        known = vocab_start + local_size if world == 1 else None
        return VocabShard(process_group, vocab_start, local_size, known, local_size if world == 1 else None)
    mine = torch.tensor([vocab_start, local_size, rows, width], dtype=torch.int64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=process_group)
    layout = [dict(zip(_LAYOUT_FIELDS, entry)) for entry in torch.stack(table).tolist()]  # one host read
    _check_layout(layout, what)
    sizes = [entry["V_local"] for entry in layout]
    return VocabShard(process_group, vocab_start, local_size, sum(sizes), max(sizes))


def _check_layout(layout, what: str) -> None:
    """Raise, on every rank alike, when the ranks' slices do not tile the vocabulary or their
    row counts differ. `layout`: one dict of _LAYOUT_FIELDS per rank, in rank order."""
    described = ", ".join(f"rank {k}: [{e['vocab_start']}, {e['vocab_start'] + e['V_local']})"
                          for k, e in enumerate(layout))
    for field, meaning in (("rows", "token rows"), ("width", "hidden size")):
        values = [e[field] for e in layout]
        if len(set(values)) > 1:
            raise ValueError(f"vocab-parallel ranks disagree on the number of {meaning} ({values} by rank); every "
                             f"rank of process_group must pass the same tokens and only its own slice of {what}")
    expected = 0
    for entry in sorted(layout, key=lambda e: e["vocab_start"]):
        start = entry["vocab_start"]
        if start != expected:
            lo, hi = sorted((start, expected))
            owners = "no rank" if start > expected else "two ranks"
            raise ValueError(
                f"vocab_start/V_local do not tile the vocabulary: ids [{lo}, {hi}) belong to {owners} ({described}); "
                "the slices must be contiguous, and V_local that differ between ranks need an explicit vocab_start")
        expected += entry["V_local"]


class _VocabParallelLogprobs(LogprobsBackward):
    """RowStats over the full vocabulary from this rank's (N, V_local) logits; the backward
    (LogprobsBackward's) writes the gradient of this rank's slice only (no communication)."""

    @staticmethod
    def forward(ctx, logits, ids, shard: VocabShard, transform: KernelTransform, backend: str, inplace: bool,
                with_entropy: bool, truncation: Truncation, with_sum_pi_sq: bool):
        stats, grad_ids = shard.local_stats(logits, ids, transform, backend, with_entropy, truncation, with_sum_pi_sq)
        LogprobsBackward.save(ctx, logits, grad_ids, stats, transform, backend, inplace, with_entropy,
                              truncation.active)
        return tuple(stats)


def vocab_parallel_logprobs(logits: torch.Tensor, ids: torch.Tensor, shard: VocabShard, transform: KernelTransform,
                            backend: str, inplace_backward: bool = False, with_entropy: bool = True,
                            truncation: Truncation = NO_TRUNCATION, with_sum_pi_sq: bool = False) -> RowStats:
    """logits (N, V_local) or (B, T, V_local) of this rank's slice, global ids (N,) -> RowStats,
    each (N,) over the full vocabulary, identical on every rank; differentiable w.r.t. this rank's
    logits. Two all-reduces of N and 3·N floats (4·N with Σp²), and with truncation the search's
    per-row reductions (ops/truncation_search.py)."""
    return RowStats(*_VocabParallelLogprobs.apply(logits, ids, shard, transform, backend, bool(inplace_backward),
                                                  bool(with_entropy), truncation, bool(with_sum_pi_sq)))


def rows_stats(logits: torch.Tensor, ids: torch.Tensor, transform: KernelTransform, backend: str,
               shard: Optional[VocabShard], with_entropy: bool = True, truncation: Truncation = NO_TRUNCATION,
               with_sum_pi_sq: bool = False) -> RowStats:
    """RowStats of (rows, V or V_local) logits outside autograd (the fused-linear path): the local
    kernel alone (it finds the thresholds), or with the vocabulary-parallel search and combine."""
    if shard is None:
        return logprobs_rows(logits, ids, transform, backend, with_entropy, truncation,
                             with_sum_pi_sq=with_sum_pi_sq)
    return shard.local_stats(logits, ids, transform, backend, with_entropy, truncation, with_sum_pi_sq)[0]


def gradient_ids(ids: torch.Tensor, shard: Optional[VocabShard]) -> torch.Tensor:
    """The ids the gradient kernel takes: as they are, or local to the slice (−1: another rank's)."""
    return ids if shard is None else shard.backward_ids(ids)
