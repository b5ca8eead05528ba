"""Inputs and outputs of the fused objective kernels (Triton and native C++/CUDA alike), and the
option codes every kernel shares (they match csrc/grpo_math.h and csrc/advantages_math.h).

`prepare` turns the padded (B, T) tensors and the config into contiguous fp32/uint8 buffers,
the batch-wide normalisers and the output buffers; `finish` turns the kernel's per-sequence
partial sums into the loss and the metrics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..reference import ObjectiveTotals, batch_totals

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
    logp: torch.Tensor
    entropy: torch.Tensor
    mask: torch.Tensor  # uint8
    advantages: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    sampling: Optional[torch.Tensor]
    token_weights: Optional[torch.Tensor]  # the caller's is_weights, (B, T) or one per sequence (B,)
    keep_entropy: Optional[torch.Tensor]  # uint8
    norm: torch.Tensor  # (1,) fp32
    ent_norm: torch.Tensor  # (1,) fp32
    per_token_loss: torch.Tensor
    g_logp: torch.Tensor
    g_entropy: torch.Tensor
    partials: torch.Tensor  # (B, NUM_SLOTS)

    @property
    def adv_per_token(self) -> bool:
        return self.advantages.dim() == 2

    @property
    def weights_per_seq(self) -> bool:
        return self.token_weights is not None and self.token_weights.dim() == 1


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


def prepare(logp, entropy, mask, advantages, cfg, *, old_logp=None, ref_logp=None, sampling_logp=None,
            is_weights=None, num_items_in_batch=None, totals: Optional[ObjectiveTotals] = None) -> PreparedObjective:
    f32 = lambda x: None if x is None else x.float().contiguous()  # noqa: E731
    logp, entropy = f32(logp), f32(entropy)
    if is_weights is not None and is_weights.shape != logp.shape:  # one weight per sequence
        is_weights = is_weights.reshape(-1)
    if totals is None:
        totals = batch_totals(torch.where(mask, entropy, 0), mask, cfg, num_items_in_batch)
    keep = None if totals.entropy_keep is None else totals.entropy_keep.to(torch.uint8).contiguous()
    return PreparedObjective(
        logp=logp, entropy=entropy, mask=mask.to(torch.uint8).contiguous(), advantages=f32(advantages),
        old=f32(old_logp), ref=f32(ref_logp), sampling=f32(sampling_logp), token_weights=f32(is_weights),
        keep_entropy=keep,
        norm=totals.normalizer.float().reshape(1), ent_norm=totals.entropy_normalizer.float().reshape(1),
        per_token_loss=torch.empty_like(logp), g_logp=torch.empty_like(logp), g_entropy=torch.empty_like(logp),
        partials=torch.empty(logp.shape[0], NUM_SLOTS, dtype=torch.float32, device=logp.device),
    )


def finish(prep: PreparedObjective, cfg):
    """(loss 0-d, per_token_loss, g_logp, g_entropy, metrics) from the kernel's outputs."""
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
    metrics = {name: values[name] for name in metric_names(cfg)}
    return totals[0], prep.per_token_loss, prep.g_logp, prep.g_entropy, metrics


def group_layout(group_index, num_groups, group_size, n, device):
    """Rows in group order and group boundaries: (order (N,), offsets (G+1,)), int64."""
    if group_size:
        return torch.arange(n, device=device), torch.arange(0, n + 1, group_size, device=device)
    order = torch.argsort(group_index, stable=True)
    offsets = torch.zeros(num_groups + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(torch.bincount(group_index, minlength=num_groups), 0)
    return order, offsets
