"""The math of docs/math.md in plain PyTorch: the ground truth every backend is tested against.

Clarity over speed: the logits are materialised in full, every step is differentiable by
autograd, and any dtype works (tests run it in fp64; fp64 in gives fp64 out). The per-token
objective (`policy_objective`) works on padded `(B, T)` tensors with autograd; no production
code imports this file, and every backend, torch included, has its own implementation with
explicit gradients (ops/torch_objective.py, ops/triton/, csrc/), so none is tested against itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from .config import GRPOLossConfig


def transformed_logits(logits: torch.Tensor, temperature: float = 1.0, logit_scale: float = 1.0,
                       softcap: Optional[float] = None) -> torch.Tensor:
    """z' = c·tanh(s·z/c)/τ (softcap c) or s·z/τ, written out plainly; −inf entries stay −inf."""
    z = logits * logit_scale
    if softcap is not None:
        z = torch.where(torch.isneginf(logits), logits, softcap * torch.tanh(z / softcap))
    return z / temperature


def truncation_kept(z_prime: torch.Tensor, ids: torch.Tensor, top_k: Optional[int] = None,
                    top_p: Optional[float] = None, min_p: Optional[float] = None) -> torch.Tensor:
    """The kept set K of docs/math.md "Truncated sampling", by sorting (the oracle; kernels never sort).

    z_prime (..., V) transformed logits, ids (...) -> bool (..., V). Order: min_p, top_k, top_p
    (vLLM V1), ties at each threshold kept or dropped together, the target always kept.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=z_prime.dtype, device=z_prime.device)
    kept = torch.ones_like(z_prime, dtype=torch.bool)
    if min_p:  # K1: z' >= max z' + log(min_p)
        kept &= z_prime >= z_prime.amax(-1, keepdim=True) + math.log(min_p)
    vocab = z_prime.shape[-1]
    if top_k and top_k < vocab:  # K2: z' >= the k-th largest of K1 (ties at the threshold kept)
        kth = torch.where(kept, z_prime, neg_inf).topk(top_k, dim=-1).values[..., -1:]
        kept &= z_prime >= kth
    if top_p is not None and top_p < 1.0:  # K3 on q = softmax over K2
        q = torch.softmax(torch.where(kept, z_prime, neg_inf), dim=-1)
        values, order = torch.where(kept, z_prime, neg_inf).sort(dim=-1)
        cum = q.gather(-1, order).cumsum(-1)
        # cumulative mass of every token valued <= z'_v (all its ties included): the last sorted
        # position whose value is <= z'_v
        last = torch.searchsorted(values.contiguous(), z_prime.contiguous(), right=True) - 1
        kept &= cum.gather(-1, last.clamp_min(0)) > 1.0 - top_p
    target = torch.zeros_like(kept).scatter_(-1, ids.long().unsqueeze(-1), True)
    return kept | target


def logprobs_and_entropy(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0, logit_scale: float = 1.0,
                         softcap: Optional[float] = None, top_k: Optional[int] = None, top_p: Optional[float] = None,
                         min_p: Optional[float] = None, with_sum_pi_squared: bool = False):
    """Per-token log-prob of `ids` and entropy of softmax(z'), z' the transformed logits.

    Shapes: logits (..., V), ids (...) -> logp (...), entropy (...), in logits' dtype.
    −inf logits get probability 0 and contribute 0 to the entropy (and a zero gradient).
    With top_k / top_p / min_p, the softmax is over the kept set `truncation_kept` (renormalised;
    gradient exactly 0 outside it). with_sum_pi_squared also returns Σ_v p_v² (...) (detached).
    """
    z = transformed_logits(logits, temperature, logit_scale, softcap)
    if top_k or (top_p is not None and top_p < 1.0) or min_p:
        kept = truncation_kept(z.detach(), ids, top_k, top_p, min_p)
        z = z.masked_fill(~kept, float("-inf"))
    logsm = torch.log_softmax(z, dim=-1)
    logp = logsm.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)
    p = logsm.exp()
    # masked_fill (not where) so that the backward of p * log p sees no 0 * -inf.
    entropy = -(p * logsm.masked_fill(p == 0, 0.0)).sum(-1)
    if with_sum_pi_squared:
        return logp, entropy, (p.detach() ** 2).sum(-1)
    return logp, entropy


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ mask·x / max(1, Σ mask): 0 (not NaN) when nothing is selected."""
    x = torch.broadcast_to(x, mask.shape)
    return torch.where(mask, x, 0).sum() / mask.sum().clamp(min=1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str, clamp: Optional[float]) -> torch.Tensor:
    """k1 / k2 / k3 estimators of KL(pi || pi_ref) per token, with x = ref_logp − logp."""
    x = ref_logp - logp
    if kind == "k1":
        kl = -x
    elif kind == "k2":
        kl = 0.5 * x * x
    elif kind == "k3":
        if clamp is not None:
            x = x.clamp(-20.0, 20.0)  # as verl's low_var_kl, so exp(x) stays finite
        kl = k3(x)
    else:
        raise ValueError(f"kl_estimator {kind!r} is not one of k1, k2, k3")
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


# 1/k! for k = 2..18: the Taylor series of e^x − x − 1 to fp64 precision for |x| < 1.
_K3_SERIES = tuple(1.0 / math.factorial(k) for k in range(2, 19))


def k3(x: torch.Tensor) -> torch.Tensor:
    """e^x − x − 1 without cancellation at small |x|: its Taylor series for |x| < 1, expm1(x) − x above.

    exp(x) − x − 1 (TRL, Liger) loses ~2·eps/x² relative at small x, and expm1(x) − x still
    loses ~2·eps/|x|; the series keeps full precision in fp32 and fp64 alike.
    """
    small = x.abs() < 1
    xs = torch.where(small, x, 0)
    poly = torch.full_like(x, _K3_SERIES[-1])
    for c in reversed(_K3_SERIES[:-1]):
        poly = poly * xs + c
    return torch.where(small, poly * xs * xs, torch.expm1(x) - x)


def importance_sampling_correction(old_logp, sampling_logp, mask, mode, clip_min, clip_max) -> torch.Tensor:
    """Detached rollout IS weight, (B, T) for token modes and (B, 1) for sequence modes.

    Tokens whose sampling log-prob is NaN (the engine could not score them) contribute a
    zero log-ratio, as in TRL: no correction rather than a NaN loss.
    """
    d = torch.where(mask, torch.nan_to_num(old_logp - sampling_logp, nan=0.0), 0).detach()
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    w = torch.exp(d)
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return w.clamp(lo, hi)
    return torch.where((w < lo) | (w > hi), torch.zeros_like(w), w)


def quantile_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of a 1-D tensor with linear interpolation, as torch.quantile.

    The position q·(n−1) is computed in Python float64 and snapped to an integer when
    within 1e-9 of one, so that the boundary decision (keep the token at exactly the
    quantile) is the same in fp32 and fp64 and in every backend.
    """
    ordered = torch.sort(values).values
    pos = q * (ordered.numel() - 1)
    if abs(pos - round(pos)) < 1e-9:
        return ordered[int(round(pos))]
    lo = int(pos)
    return ordered[lo] + (pos - lo) * (ordered[lo + 1] - ordered[lo])


def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """Tokens whose entropy is >= the (1 − quantile) quantile of the masked entropies (TRL's rule)."""
    selected = entropy.detach()[mask]
    if selected.numel() == 0:
        return torch.zeros_like(mask)
    return (entropy.detach() >= quantile_threshold(selected, 1.0 - quantile)) & mask


@dataclass
class ObjectiveTotals:
    """Batch-wide quantities, for evaluating the objective on a chunk of whole sequences.

    With them, the chunk losses of a batch add up to the batch loss (the fused-linear path).
    normalizer: the aggregation divisor (token count, B, or B·max_completion_length).
    entropy_keep: the entropy mask of the chunk's tokens, from the batch-wide quantile.
    entropy_normalizer: Σ of the effective entropy mask over the batch (>= 1).
    """

    normalizer: torch.Tensor
    entropy_keep: Optional[torch.Tensor] = None
    entropy_normalizer: Optional[torch.Tensor] = None


def batch_totals(entropy, mask, config: GRPOLossConfig, num_items_in_batch=None) -> ObjectiveTotals:
    """The batch-wide quantities of `ObjectiveTotals` for padded (B, T) entropy and mask."""
    bsz = mask.shape[0]
    count = mask.sum()
    mode = config.agg_mode
    if mode == "token-mean":
        if num_items_in_batch is not None and config.uses_num_items_in_batch:
            count = torch.as_tensor(num_items_in_batch, device=mask.device)
        normalizer = count.to(torch.float64).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        normalizer = torch.tensor(float(bsz * config.max_completion_length), dtype=torch.float64, device=mask.device)
    else:
        normalizer = torch.tensor(float(bsz), dtype=torch.float64, device=mask.device)
    keep = None
    effective = mask
    if config.top_entropy_quantile < 1.0:
        keep = high_entropy_mask(torch.where(mask, entropy, 0), mask, config.top_entropy_quantile)
        effective = keep
    return ObjectiveTotals(normalizer, keep, effective.sum().to(torch.float64).clamp(min=1))


VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of log w (and of each log IS ratio)


def vespo_weight(log_ratio, adv, mask, config: GRPOLossConfig, is_ratios=()) -> torch.Tensor:
    """VESPO's detached Gamma weight φ(w) = exp(λ + k·log w − λ·w), as TRL 1.16's get_gamma_weights.

    log w_b = clamp(Σ_t m·clamp(δ_t, ±20) + Σ log IS ratios, log 1e-8, 20): the rollout IS ratios
    (token (B, T) or sequence (B, 1), each log clamped to [log 1e-8, 20]) are folded into w.
    (k, λ) = (vespo_k_pos, vespo_lambda_pos) where A ≥ 0, else the _neg pair; λ ≥ 1e-4.
    Returns (B, 1) for per-sequence advantages, (B, T) for per-token ones.
    """
    with torch.no_grad():
        seq_log = torch.where(mask, log_ratio.clamp(-20.0, 20.0), 0).sum(-1, keepdim=True)
        for ratio in is_ratios:
            log_is = torch.log(ratio).clamp(VESPO_LOG_W_MIN, 20.0)
            seq_log = seq_log + (torch.where(mask, log_is, 0).sum(-1, keepdim=True) if ratio.shape == mask.shape
                                 else log_is)
        log_w = seq_log.clamp(VESPO_LOG_W_MIN, 20.0)
        nonneg = adv >= 0
        k = torch.where(nonneg, adv.new_tensor(config.vespo_k_pos), adv.new_tensor(config.vespo_k_neg))
        lam = torch.where(nonneg, adv.new_tensor(config.vespo_lambda_pos),
                          adv.new_tensor(config.vespo_lambda_neg)).clamp(min=1e-4)
        phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
        return torch.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0)


@dataclass
class ObjectiveTerms:
    loss: torch.Tensor  # 0-d, differentiable
    per_token_loss: torch.Tensor  # (B, T), 0 where masked
    metrics: Dict[str, torch.Tensor]  # 0-d, detached


def policy_objective(
    logp: torch.Tensor,
    entropy: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    config: GRPOLossConfig,
    *,
    old_logp: Optional[torch.Tensor] = None,
    ref_logp: Optional[torch.Tensor] = None,
    sampling_logp: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    totals: Optional[ObjectiveTotals] = None,
) -> ObjectiveTerms:
    """The GRPO objective from per-token log-probs, on padded tensors.

    Shapes: logp, entropy, mask, old/ref/sampling_logp (B, T); advantages (B,) or (B, T);
    is_weights (B, T) per token or (B,) / (B, 1) per sequence.
    `is_weights` are precomputed rollout importance-sampling weights (e.g. verl's
    rollout_is_weights), a detached multiplier on the policy term after the others (VESPO folds
    them into its sequence weight instead).
    `mask` is bool. Masked positions may hold anything finite or not: they are replaced
    before any arithmetic, so they contribute exactly 0 to the loss, gradients and metrics.
    `totals` (batch-wide normalisers and entropy mask) makes this the contribution of a chunk
    of whole sequences to the loss of a larger batch; by default the call is the whole batch.
    """
    cfg = config
    m = mask
    n_b = m.sum(-1, keepdim=True).clamp(min=1).to(logp.dtype)
    adv = (advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages).to(logp.dtype)
    logp_m = torch.where(m, logp, 0)
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    log_ratio = torch.where(m, logp - old, 0)

    # Importance ratio rho, (B, T) or (B, 1), from the (optionally clamped) log weight.
    def clamp_log(w):
        if cfg.log_ratio_min is None and cfg.log_ratio_max is None:
            return w
        return w.clamp(min=cfg.log_ratio_min, max=cfg.log_ratio_max)

    level = cfg.importance_sampling_level
    if level == "token":
        rho = torch.exp(clamp_log(log_ratio))
    elif level == "sequence":
        token_log_ratio = log_ratio
        if cfg.pg_loss == "geo_mean":  # GMPO: sgn(A)·min(sgn(A)·δ, sgn(A)·clamp(δ, −ε_low, ε_high)), as verl
            sign = torch.sign(adv)
            clipped = torch.clamp(log_ratio, -cfg.eps_low, cfg.eps_high)
            token_log_ratio = sign * torch.min(sign * log_ratio, sign * clipped)
        rho = torch.exp(clamp_log(token_log_ratio.sum(-1, keepdim=True) / n_b))
    else:  # sequence_token: value exp(w_b), gradient per token
        w_b = (log_ratio.sum(-1, keepdim=True) / n_b).detach()
        rho = torch.exp(clamp_log(logp_m - logp_m.detach() + w_b))
    rho_value = torch.broadcast_to(rho.detach(), m.shape)

    entropy_m = torch.where(m, entropy, 0)
    if totals is None:
        totals = batch_totals(entropy_m.detach(), m, cfg, num_items_in_batch)
    is_weight = None
    if cfg.is_correction is not None:
        if sampling_logp is None:
            raise ValueError(
                f"is_correction={cfg.is_correction!r} needs sampling_logps (the inference engine's log-probs)")
        is_weight = importance_sampling_correction(
            old.to(logp.dtype), sampling_logp.to(logp.dtype), m, cfg.is_correction, cfg.is_clip_min, cfg.is_clip_max
        )
    given_weight = None
    if is_weights is not None:  # (B, T) per token, or (B,) / (B, 1) per sequence
        given_weight = is_weights.to(logp.dtype)
        given_weight = torch.where(m, given_weight, 0) if given_weight.shape == m.shape else given_weight.reshape(-1, 1)

    pg = cfg.pg_loss
    phi = None
    if pg == "clip":
        rho_clipped = rho.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
        rho_capped = rho.clamp(max=cfg.delta) if cfg.delta is not None else rho
        loss_pg = -torch.minimum(rho_capped * adv, rho_clipped * adv)
        if cfg.dual_clip is not None:
            loss_pg = torch.where(adv < 0, torch.minimum(loss_pg, -cfg.dual_clip * adv), loss_pg)
    elif pg == "cispo":
        loss_pg = -rho.clamp(min=cfg.cispo_weight_min, max=cfg.eps_high).detach() * adv * logp_m
    elif pg in ("dppo_tv", "dppo_kl"):
        old_m = torch.where(m, old, 0)
        prob, old_prob = torch.exp(logp_m.detach()), torch.exp(old_m)
        if pg == "dppo_tv":
            keep = torch.where(adv > 0, prob - old_prob <= cfg.eps_high, prob - old_prob >= -cfg.eps_low)
        else:
            binary_kl = old_prob * (old_m - logp_m.detach()) + (1 - old_prob) * torch.log(
                (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
            keep = torch.where(adv > 0, (binary_kl <= cfg.eps_high) | (prob <= old_prob),
                               (binary_kl <= cfg.eps_low) | (prob >= old_prob))
        weight = rho.detach() if cfg.ratio_cap is None else rho.detach().clamp(max=cfg.ratio_cap)
        weight = weight * keep.to(logp.dtype)
        loss_pg = -weight * adv * logp_m
    elif pg == "dro":
        loss_pg = -(logp_m * adv - 0.5 * cfg.dro_beta * log_ratio.square())
    elif pg == "kl_cov":
        loss_pg = -adv * rho + cfg.kl_cov_coef * log_ratio.abs()
    elif pg == "geo_mean":
        loss_pg = -adv * rho
    elif pg == "sapo":
        # Tensors, not Python floats: torch.where would make the temperatures fp32.
        s = torch.where(adv > 0, adv.new_tensor(cfg.sapo_temperature_pos), adv.new_tensor(cfg.sapo_temperature_neg))
        loss_pg = -torch.sigmoid(s * (rho - 1)) * 4 / s * adv
    else:  # vespo: the rollout IS ratio is folded into the sequence weight w, not multiplied below
        phi = vespo_weight(log_ratio.detach(), adv, m, cfg, [w for w in (is_weight, given_weight) if w is not None])
        loss_pg = -phi * adv * logp_m

    if cfg.off_policy_mask_threshold is not None:
        behaviour = old if sampling_logp is None else sampling_logp.to(logp.dtype)
        seq_kl = torch.where(m, torch.nan_to_num(behaviour - logp.detach(), nan=0.0), 0).sum(-1, keepdim=True) / n_b
        keep = (adv >= 0) | (seq_kl <= cfg.off_policy_mask_threshold)
        loss_pg = loss_pg * keep.to(logp.dtype)
    entropy_keep = totals.entropy_keep
    if entropy_keep is not None:
        loss_pg = loss_pg * entropy_keep.to(logp.dtype)
    if pg != "vespo":
        if is_weight is not None:
            loss_pg = loss_pg * is_weight
        if given_weight is not None:
            loss_pg = loss_pg * given_weight

    per_token = loss_pg
    kl = None
    if cfg.beta != 0.0:
        if ref_logp is None:
            raise ValueError(
                "ref_logps is required when beta != 0 (the KL term needs the reference policy's log-probs)")
        kl = kl_penalty(logp_m, torch.where(m, ref_logp.to(logp.dtype), 0), cfg.kl_kind, cfg.kl_clamp)
        if cfg.use_bias_correction_kl:
            kl = kl * rho  # with its gradient, as TRL: the gradient of E_old[rho k] is unbiased
        per_token = per_token + cfg.beta * kl
    per_token = torch.where(m, torch.broadcast_to(per_token, m.shape), 0)

    # Every aggregation is a sum over tokens divided by a batch-wide normaliser: B sequences
    # (seq-mean-*), the token count (token-mean), or B·max_completion_length.
    if cfg.agg_mode == "seq-mean-token-mean":
        total = (per_token.sum(-1, keepdim=True) / n_b).sum()
    else:
        total = per_token.sum()
    loss = total / totals.normalizer.to(logp.dtype)

    if cfg.entropy_coef != 0.0:
        # As TRL: the bonus acts on the tokens the policy term acts on.
        effective = m if entropy_keep is None else entropy_keep
        bonus = torch.where(effective, entropy_m, 0).sum() / totals.entropy_normalizer.to(logp.dtype)
        loss = loss - cfg.entropy_coef * bonus

    with torch.no_grad():
        adv_t = torch.broadcast_to(adv, m.shape)
        low = (rho_value < 1 - cfg.eps_low) & (adv_t < 0)
        high = (rho_value > 1 + cfg.eps_high) & (adv_t > 0)
        metrics = {
            "entropy": masked_mean(entropy_m, m),
            "clip_ratio/low": masked_mean(low.to(logp.dtype), m),
            "clip_ratio/high": masked_mean(high.to(logp.dtype), m),
            "clip_ratio/region": masked_mean((low | high).to(logp.dtype), m),
            "ratio/mean": masked_mean(rho_value, m),
            # rho > 0, so the zeros at masked positions never win (and give 0 with no token).
            "ratio/max": torch.where(m, rho_value, 0).amax() if m.numel() else rho_value.new_zeros(()),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), m)
        if is_weight is not None:
            metrics["is_ratio/mean"] = masked_mean(is_weight, m)
        if pg == "cispo":  # TRL's cispo_clip_ratio: the weight's cap is active
            metrics["cispo_clip_ratio"] = masked_mean(((rho_value > cfg.eps_high) & (adv_t > 0)).to(logp.dtype), m)
        if phi is not None:  # TRL's vespo/phi_seq_mean: over sequences (per-sequence A) or tokens
            metrics["vespo/phi_seq_mean"] = phi.mean() if phi.shape[-1] == 1 else masked_mean(phi, m)
    return ObjectiveTerms(loss=loss, per_token_loss=per_token.detach(), metrics=metrics)


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    config: Optional[GRPOLossConfig] = None,
):
    """Reference GRPO loss on padded logits (B, T, V). Returns (ObjectiveTerms, logp, entropy).

    is_weights: (B, T) per token, or (B,) / (B, 1) per sequence.
    """
    config = config or GRPOLossConfig()
    mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None else mask.bool()
    logp, entropy = logprobs_and_entropy(logits, ids, config.temperature, config.logit_scale,
                                         config.final_logit_softcapping)
    terms = policy_objective(
        logp, entropy, advantages, mask, config,
        old_logp=old_logps, ref_logp=ref_logps, sampling_logp=sampling_logps, is_weights=is_weights,
        num_items_in_batch=num_items_in_batch,
    )
    return terms, logp, entropy


# ----------------------------------------------------------------------------------------
# Group advantages
# ----------------------------------------------------------------------------------------

def _nan_mean_std(values: torch.Tensor):
    """NaN-aware mean and Bessel-corrected std of a 1-D tensor; std is 0 below 2 values."""
    v = values[~torch.isnan(values)]
    if v.numel() == 0:
        return values.new_zeros(()), values.new_zeros(()), 0
    mean = v.mean()
    std = v.std(unbiased=True) if v.numel() > 1 else values.new_zeros(())
    return mean, std, v.numel()


def _is_constant(values: torch.Tensor) -> bool:
    v = values[~torch.isnan(values)]
    return v.numel() < 2 or bool((v == v[0]).all())


@dataclass
class ReferenceAdvantages:
    advantages: torch.Tensor  # (N,)
    group_mean: torch.Tensor  # (G,)
    group_std: torch.Tensor  # (G,)
    frac_zero_std: torch.Tensor  # 0-d


def group_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    *,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    reward_weights: Optional[torch.Tensor] = None,
    reward_aggregation: str = "sum_then_normalize",
) -> ReferenceAdvantages:
    """Reference group-relative advantages, one group at a time in plain loops.

    rewards (N,) or (N, F) with NaN for missing; group_index (N,) in [0, num_groups).
    A group whose scorable rewards are all equal (or fewer than 2) gets advantage 0.
    """
    r = rewards if rewards.dim() == 2 else rewards.unsqueeze(-1)
    w = torch.ones(r.shape[1], dtype=r.dtype, device=r.device) if reward_weights is None else reward_weights.to(r.dtype)
    unscorable = torch.isnan(r).all(dim=1)
    groups = [torch.nonzero(group_index == g).flatten() for g in range(num_groups)]

    if reward_aggregation == "normalize_then_sum":
        z = torch.full_like(r, float("nan"))
        for rows in groups:
            for f in range(r.shape[1]):
                col = r[rows, f]
                mean, std, _ = _nan_mean_std(col)
                z[rows, f] = 0.0 if _is_constant(col) else (col - mean) / (std + eps)
        total = torch.nansum(z * w, dim=1)
    else:
        total = torch.nansum(r * w, dim=1)
    total = torch.where(unscorable, torch.full_like(total, float("nan")), total)

    adv = torch.zeros_like(total)
    g_mean = total.new_zeros(num_groups)
    g_std = total.new_zeros(num_groups)
    degenerate = torch.zeros(num_groups, dtype=torch.bool)
    for g, rows in enumerate(groups):
        mean, std, count = _nan_mean_std(total[rows])
        g_mean[g], g_std[g] = mean, std
        degenerate[g] = _is_constant(total[rows])
        centred = total[rows] - mean
        if reward_aggregation == "normalize_then_sum":
            adv[rows] = total[rows]
        elif scale_rewards == "group":
            adv[rows] = centred / (std + eps)
        elif scale_rewards == "rloo":
            adv[rows] = centred * count / max(count - 1, 1)
        else:  # batch, none, reinforce++: scaled over the batch below
            adv[rows] = centred

    _, batch_std, _ = _nan_mean_std(total)
    if reward_aggregation == "normalize_then_sum":
        batch_mean, _, _ = _nan_mean_std(total)
        adv = (adv - batch_mean) / (batch_std + eps)
    elif scale_rewards == "batch":
        adv = adv / (batch_std + eps)
    elif scale_rewards == "reinforce++":
        c_mean, c_std, _ = _nan_mean_std(adv)
        adv = (adv - c_mean) / (c_std + eps)

    for g, rows in enumerate(groups):
        if degenerate[g]:
            adv[rows] = 0.0
    adv = torch.where(torch.isnan(adv), torch.zeros_like(adv), adv)
    return ReferenceAdvantages(
        advantages=adv, group_mean=g_mean, group_std=g_std, frac_zero_std=degenerate.to(r.dtype).mean().to(r.device)
    )
