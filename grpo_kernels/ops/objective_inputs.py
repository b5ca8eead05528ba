"""Inputs and outputs of the objective op of every backend (torch, Triton, C++, CUDA), and the one
place that decides which metrics a loss reports and under which names. The option codes, slots
and the buffer order are declared in grpo_kernels/options.py.

`prepare` turns the packed (N,) tensors, cu_seqlens and the parameters into contiguous buffers,
the batch-wide normalisers and zeroed outputs; a backend's `objective_pass` fills the outputs
of a range of rows; `finish` turns the per-sequence partial sums into the loss and metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..options import METRICS, NUM_SLOTS, OBJECTIVE_BUFFER_NAMES, IsMode, KlKind, LossParams, PolicyLoss, Slot
from .normalizers import ObjectiveTotals, batch_totals

# The metric vector is the partial sums from Slot.ENTROPY on, each divided by its denominator.
assert tuple(Slot(Slot.ENTROPY + i).public for i in range(len(METRICS))) == (
    "entropy", "clip_low", "clip_high", "clip_region", "ratio_sum", "ratio_max", "kl", "is_ratio", "cispo_clip",
    "vespo_phi"), "METRICS follow the slots from ENTROPY on"
_RATIO_MAX, _VESPO_PHI = METRICS.index("ratio/max"), METRICS.index("vespo/phi_seq_mean")


def metric_names(params: LossParams) -> tuple:
    """The metrics a call with these parameters reports (docs/math.md, "Metrics")."""
    names = METRICS[:6]
    if params.kl != KlKind.NONE:
        names += ("kl",)
    if params.is_mode != IsMode.NONE:
        names += ("is_ratio/mean",)
    if params.pg == PolicyLoss.CISPO:
        names += ("cispo_clip_ratio",)
    elif params.pg == PolicyLoss.VESPO:
        names += ("vespo/phi_seq_mean",)
    return names


@dataclass
class PreparedObjective:
    """The objective's inputs as every kernel reads them: the packed (N,) token layout, sequences
    given by cu_seqlens (padded (B, T) is cu_seqlens = arange(B+1)·T), and the output buffers.
    Field order = options.OBJECTIVE_BUFFERS (the C++ ObjectiveBuffers struct)."""

    logp: torch.Tensor  # (N,) in the statistics' dtype
    entropy: torch.Tensor
    mask: torch.Tensor  # (N,) bool
    cu_seqlens: torch.Tensor  # (B+1,) int64, clamped to [0, N]
    counts: torch.Tensor  # (B,) unmasked tokens of each whole sequence
    advantages: torch.Tensor  # (B,) one per sequence, or (N,) one per token
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    sampling: Optional[torch.Tensor]
    token_weights: Optional[torch.Tensor]  # the caller's is_weights, (N,) per token or (B,) per sequence
    keep_entropy: Optional[torch.Tensor]  # (N,) bool
    norm: torch.Tensor  # (1,) the aggregation divisor
    ent_norm: torch.Tensor  # (1,) the entropy bonus's divisor (read only when the bonus is on)
    per_token_loss: torch.Tensor  # (N,) outputs, written row range by row range
    g_logp: torch.Tensor
    g_entropy: torch.Tensor
    partials: torch.Tensor  # (B, NUM_SLOTS), zeroed; each pass adds its rows' sums (RATIO_MAX: max)

    adv_per_token: bool  # advantages hold one value per token
    weights_per_seq: bool  # token_weights hold one weight per sequence

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1

    def buffers(self) -> list:
        """The buffers in options.OBJECTIVE_BUFFERS order (None for an absent optional one)."""
        return [self.logp, self.entropy, self.mask, self.cu_seqlens, self.counts, self.advantages, self.old, self.ref,
                self.sampling, self.token_weights, self.keep_entropy, self.norm, self.ent_norm, self.per_token_loss,
                self.g_logp, self.g_entropy, self.partials]

    @classmethod
    def from_buffers(cls, buffers, adv_per_token: bool, weights_per_seq: bool) -> "PreparedObjective":
        return cls(*buffers, adv_per_token=adv_per_token, weights_per_seq=weights_per_seq)


assert tuple(PreparedObjective.__dataclass_fields__)[:len(OBJECTIVE_BUFFER_NAMES)] == OBJECTIVE_BUFFER_NAMES


def _flat(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous (n,) tensor of `dtype`; no op at all when it is one already (the common case)."""
    if x.dtype != dtype:
        x = x.to(dtype)
    if x.dim() != 1 or not x.is_contiguous():
        x = x.reshape(-1).contiguous()
    return x


def prepare(logp, entropy, mask, advantages, cu_seqlens, params: LossParams, *, old_logp=None, ref_logp=None,
            sampling_logp=None, is_weights=None, num_items_in_batch=None, totals: Optional[ObjectiveTotals] = None,
            adv_per_token: bool = False, weights_per_seq: bool = False) -> PreparedObjective:
    """Flat (N,) inputs -> PreparedObjective; nothing is read on the host.

    advantages (B,) or (N,) as `adv_per_token` says; is_weights (N,) or (B,) as `weights_per_seq`
    says (the caller knows which from the shapes, even when B = N). fp64 logp keeps fp64 (the
    torch backend's validation path); everything else computes in fp32.
    """
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    logp, entropy, advantages, old, ref, sampling, weights = [
        None if x is None else _flat(x, dtype)
        for x in (logp, entropy, advantages, old_logp, ref_logp, sampling_logp, is_weights)]
    mask = _flat(mask, torch.bool)  # read as bytes holding 0/1 by every kernel
    n = logp.numel()
    cu = cu_seqlens.long().clamp(0, n).contiguous()  # in bounds even before the deferred checks raise
    if totals is None:
        totals = batch_totals(entropy, mask, cu, params, num_items_in_batch)
    keep = totals.entropy_keep
    # Every backend writes every element of the per-token outputs (tests/test_backend_contract.py);
    # the partial sums accumulate, so they start at zero.
    return PreparedObjective(
        logp, entropy, mask, cu, totals.counts, advantages, old, ref, sampling, weights,
        None if keep is None else keep.contiguous(), totals.normalizer, totals.entropy_normalizer,
        torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp),
        torch.zeros(cu.numel() - 1, NUM_SLOTS, dtype=dtype, device=logp.device),
        adv_per_token=adv_per_token, weights_per_seq=weights_per_seq and is_weights is not None,
    )


def finish(prep: PreparedObjective, params: LossParams):
    """(loss 0-d, metric vector in options.METRICS order) from the per-sequence partial sums."""
    partials = prep.partials
    totals = partials.sum(0)  # a fixed-order sum over sequences: deterministic
    vector = totals[Slot.ENTROPY:] / totals[Slot.COUNT].clamp(min=1)
    if partials.shape[0]:
        vector[_RATIO_MAX] = partials[:, Slot.RATIO_MAX].amax()
    if not prep.adv_per_token and params.pg == PolicyLoss.VESPO:  # TRL's vespo/phi_seq_mean: a mean over
        # sequences when φ is one per sequence
        vector[_VESPO_PHI] = totals[Slot.VESPO_PHI] / max(partials.shape[0], 1)
    return totals[Slot.LOSS], vector


def metrics_from_vector(vector: torch.Tensor, params: LossParams) -> dict:
    """The metric vector of `finish` as the dict a call with these parameters reports."""
    return {name: vector[METRICS.index(name)] for name in metric_names(params)}


def group_layout(group_index, num_groups, group_size, n, device):
    """Rows in group order and group boundaries: (order (N,), offsets (G+1,)), int64."""
    if group_size:
        return torch.arange(n, device=device), torch.arange(0, n + 1, group_size, device=device)
    order = torch.argsort(group_index, stable=True)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(group_index, minlength=num_groups), 0)
    return order, offsets
