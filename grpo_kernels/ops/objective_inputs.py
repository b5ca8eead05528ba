"""Inputs and outputs of the objective op of every backend (torch, Triton, C++, CUDA), the option
codes the kernels share (they match csrc/grpo_math.h and csrc/advantages_math.h), and the one
place that decides which metrics a config reports and under which names.

`prepare` turns the packed (N,) tensors, cu_seqlens and the config into contiguous buffers,
the batch-wide normalisers and zeroed outputs; a backend's `objective_pass` fills the outputs
of a range of rows; `finish` turns the per-sequence partial sums into the loss and metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .normalizers import ObjectiveTotals, batch_totals

PG = {"clip": 0, "cispo": 1, "sapo": 2, "vespo": 3}
LEVEL = {"token": 0, "sequence": 1, "sequence_token": 2}
KL = {"k1": 1, "k2": 2, "k3": 3}
IS = {None: 0, "token_truncate": 1, "token_mask": 2, "sequence_truncate": 3, "sequence_mask": 4}
AGG = {"seq-mean-token-mean": 0, "token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
ADVANTAGE_MODES = {"group": 0, "batch": 1, "none": 2, "rloo": 3, "reinforce++": 4, "gdpo": 5}
SLOTS = ("loss", "count", "entropy", "low", "high", "region", "ratio_sum", "ratio_max", "kl", "is", "cispo_clip",
         "vespo_phi")
NUM_SLOTS = 16
# Every metric any backend reports, in a fixed order (the fused op returns them as one vector).
METRIC_ORDER = ("entropy", "clip_ratio/low", "clip_ratio/high", "clip_ratio/region", "ratio/mean", "ratio/max",
                "kl", "is_ratio/mean", "cispo_clip_ratio", "vespo/phi_seq_mean")


def metric_names(cfg):
    """The metrics a call with this config reports (docs/math.md, "Metrics")."""
    names = list(METRIC_ORDER[:6])
    if cfg.beta != 0.0:
        names.append("kl")
    if cfg.is_correction is not None:
        names.append("is_ratio/mean")
    if cfg.pg_loss == "cispo":
        names.append("cispo_clip_ratio")
    if cfg.pg_loss == "vespo":
        names.append("vespo/phi_seq_mean")
    return names


@dataclass
class PreparedObjective:
    """The objective's inputs as every kernel reads them: the packed (N,) token layout, sequences
    given by cu_seqlens (padded (B, T) is cu_seqlens = arange(B+1)·T), and the output buffers."""

    logp: torch.Tensor  # (N,) in the statistics' dtype
    entropy: torch.Tensor
    mask: torch.Tensor  # (N,) uint8
    advantages: torch.Tensor  # (B,) one per sequence, or (N,) one per token
    cu_seqlens: torch.Tensor  # (B+1,) int64, clamped to [0, N]
    counts: torch.Tensor  # (B,) unmasked tokens of each whole sequence
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    sampling: Optional[torch.Tensor]
    token_weights: Optional[torch.Tensor]  # the caller's is_weights, (N,) per token or (B,) per sequence
    keep_entropy: Optional[torch.Tensor]  # (N,) uint8
    norm: torch.Tensor  # (1,)
    ent_norm: torch.Tensor  # (1,)
    per_token_loss: torch.Tensor  # (N,) outputs, written row range by row range
    g_logp: torch.Tensor
    g_entropy: torch.Tensor
    partials: torch.Tensor  # (B, NUM_SLOTS), zeroed; each pass adds its rows' sums (slot 7: max)

    adv_per_token: bool  # advantages hold one value per token
    weights_per_seq: bool  # token_weights hold one weight per sequence

    @property
    def num_sequences(self) -> int:
        return self.cu_seqlens.numel() - 1


def params(cfg) -> dict:
    """The config as the flat scalar parameters the kernels take."""
    inf = float("inf")
    bound = lambda x, default: default if x is None else float(x)  # noqa: E731
    return dict(
        pg=PG[cfg.pg_loss], level=LEVEL[cfg.importance_sampling_level],
        kl=KL[cfg.kl_kind] if cfg.beta != 0.0 else 0, is_mode=IS[cfg.is_correction], agg=AGG[cfg.agg_mode],
        eps_low=cfg.eps_low, eps_high=cfg.eps_high, has_delta=int(cfg.delta is not None),
        delta=float(cfg.delta or 0.0), has_dual=int(cfg.dual_clip is not None), dual_clip=float(cfg.dual_clip or 0.0),
        sapo_pos=float(cfg.sapo_temperature_pos), sapo_neg=float(cfg.sapo_temperature_neg), beta=float(cfg.beta),
        has_kl_clamp=int(cfg.kl_clamp is not None), kl_clamp=float(cfg.kl_clamp or 0.0),
        bias_corr=int(bool(cfg.use_bias_correction_kl)), has_off_policy=int(cfg.off_policy_mask_threshold is not None),
        off_thresh=float(cfg.off_policy_mask_threshold or 0.0),
        is_lo=bound(cfg.is_clip_min, -inf), is_hi=bound(cfg.is_clip_max, inf), entropy_coef=float(cfg.entropy_coef),
        log_ratio_lo=bound(cfg.log_ratio_min, -inf), log_ratio_hi=bound(cfg.log_ratio_max, inf),
        cispo_lo=bound(cfg.cispo_weight_min, -inf), vespo_k_pos=float(cfg.vespo_k_pos),
        vespo_lambda_pos=float(cfg.vespo_lambda_pos), vespo_k_neg=float(cfg.vespo_k_neg),
        vespo_lambda_neg=float(cfg.vespo_lambda_neg),
    )


def prepare(logp, entropy, mask, advantages, cu_seqlens, cfg, *, old_logp=None, ref_logp=None, sampling_logp=None,
            is_weights=None, num_items_in_batch=None, totals: Optional[ObjectiveTotals] = None,
            adv_per_token: bool = False, weights_per_seq: bool = False) -> PreparedObjective:
    """Flat (N,) inputs -> PreparedObjective; nothing is read on the host.

    advantages (B,) or (N,) as `adv_per_token` says; is_weights (N,) or (B,) as `weights_per_seq`
    says (the caller knows which from the shapes, even when B = N). fp64 logp keeps fp64 (the
    torch backend's validation path); everything else computes in fp32.
    """
    dtype = torch.float64 if logp.dtype == torch.float64 else torch.float32
    cast = lambda x: None if x is None else x.reshape(-1).to(dtype).contiguous()  # noqa: E731
    logp, entropy, mask = cast(logp), cast(entropy), mask.reshape(-1)
    n = logp.numel()
    cu = cu_seqlens.long().clamp(0, n).contiguous()  # in bounds even before the deferred checks raise
    if totals is None:
        totals = batch_totals(entropy, mask, cu, cfg, num_items_in_batch)
    keep = None if totals.entropy_keep is None else totals.entropy_keep.to(torch.uint8).contiguous()
    return PreparedObjective(
        logp=logp, entropy=entropy, mask=mask.to(torch.uint8).contiguous(), advantages=cast(advantages),
        cu_seqlens=cu, counts=totals.counts.to(dtype).contiguous(),
        old=cast(old_logp), ref=cast(ref_logp), sampling=cast(sampling_logp), token_weights=cast(is_weights),
        keep_entropy=keep, norm=totals.normalizer.to(dtype).reshape(1),
        ent_norm=totals.entropy_normalizer.to(dtype).reshape(1),
        per_token_loss=torch.zeros_like(logp), g_logp=torch.zeros_like(logp), g_entropy=torch.zeros_like(logp),
        partials=torch.zeros(cu.numel() - 1, NUM_SLOTS, dtype=dtype, device=logp.device),
        adv_per_token=adv_per_token, weights_per_seq=weights_per_seq and is_weights is not None,
    )


def finish(prep: PreparedObjective):
    """(loss 0-d, metric vector in METRIC_ORDER) from the per-sequence partial sums."""
    partials = prep.partials
    totals = partials.sum(0)  # a fixed-order sum over sequences: deterministic
    denom = totals[1].clamp(min=1)
    # TRL's vespo/phi_seq_mean is a mean over sequences when phi is one per sequence.
    phi_denom = denom if prep.adv_per_token else max(partials.shape[0], 1)
    values = {
        "entropy": totals[2] / denom,
        "clip_ratio/low": totals[3] / denom,
        "clip_ratio/high": totals[4] / denom,
        "clip_ratio/region": totals[5] / denom,
        "ratio/mean": totals[6] / denom,
        "ratio/max": partials[:, 7].amax() if partials.shape[0] else totals[7],
        "kl": totals[8] / denom,
        "is_ratio/mean": totals[9] / denom,
        "cispo_clip_ratio": totals[10] / denom,
        "vespo/phi_seq_mean": totals[11] / phi_denom,
    }
    return totals[0], torch.stack([values[name] for name in METRIC_ORDER])


def metrics_from_vector(vector: torch.Tensor, cfg) -> dict:
    """The metric vector of `finish` as the dict a call with this config reports."""
    return {name: vector[METRIC_ORDER.index(name)] for name in metric_names(cfg)}


def group_layout(group_index, num_groups, group_size, n, device):
    """Rows in group order and group boundaries: (order (N,), offsets (G+1,)), int64."""
    if group_size:
        return torch.arange(n, device=device), torch.arange(0, n + 1, group_size, device=device)
    order = torch.argsort(group_index, stable=True)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(group_index, minlength=num_groups), 0)
    return order, offsets
