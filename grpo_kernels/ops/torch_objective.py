"""`backend="torch"`'s objective op: the per-token GRPO objective of docs/math.md on packed (N,)
tokens, in PyTorch, for any device and dtype (fp64 in, fp64 out).

The torch branch of the per-token math, written like csrc/grpo_math.h's `objective_sequence`
(same names, same derivative rules: torch.minimum's half-and-half split at ties, clamp's
inclusive bounds) but vectorised over the pass's rows: each row's sequence comes from a
searchsorted on cu_seqlens, sequence sums from index_add in fp64, so nothing is read on the host
and nothing is padded. The gradients w.r.t. logp and entropy are written out explicitly, as the
kernels do; reference.py, written on padded tensors with autograd, is the independent oracle.
"""
from __future__ import annotations

import math

import torch

from ..options import (
    KL_LOG_RATIO_CLAMP, VESPO_LAMBDA_MIN, VESPO_LOG_W_MAX, VESPO_LOG_W_MIN, VESPO_TOKEN_LOG_RATIO, Agg, IsMode,
    KlKind, Level, LossParams, PolicyLoss, Slot,
)
from . import objective_inputs as io

# Taylor coefficients 1/k!, k = 2..18, of e^x − x − 1: full fp64 precision for |x| < 1.
K3_TAYLOR = [1.0 / math.factorial(k) for k in range(2, 19)]


def k3_value(x: torch.Tensor) -> torch.Tensor:
    """e^x − x − 1 without cancellation: Horner's rule on the series below |x| = 1, expm1(x) − x above."""
    near = x.abs() < 1
    t = torch.where(near, x, 0)
    acc = torch.zeros_like(x)
    for coef in reversed(K3_TAYLOR):
        acc = acc * t + coef
    return torch.where(near, acc * t * t, torch.expm1(x) - x)


def kl_term(logp, ref, p: LossParams):
    """The k1/k2/k3 estimate of KL(π‖π_ref) per token (x = ref − logp) and its derivative w.r.t. logp."""
    x = ref - logp
    if p.kl == KlKind.K1:
        value, d_logp = -x, torch.ones_like(x)
    elif p.kl == KlKind.K2:
        value, d_logp = 0.5 * x * x, -x
    else:
        d_x = 1.0
        if p.has_kl_clamp:
            d_x = inside(x, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
            x = x.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        value = k3_value(x)
        d_logp = -(value + x) * d_x  # −(e^x − 1), accurate at small x too
    if p.has_kl_clamp:
        d_logp = d_logp * inside(value, -p.kl_clamp, p.kl_clamp)
        value = value.clamp(-p.kl_clamp, p.kl_clamp)
    return value, d_logp


def inside(x, lo: float, hi: float):
    """1 where lo <= x <= hi (clamp's derivative: the bounds are inclusive), else 0, in x's dtype."""
    return ((x >= lo) & (x <= hi)).to(x.dtype)


def nan_to_zero(x):
    return torch.where(torch.isnan(x), 0, x)


def is_clip(w, p: LossParams, truncate: bool):
    """A rollout IS weight truncated to [is_lo, is_hi] (*_truncate) or zeroed outside it (*_mask)."""
    if truncate:
        return w.clamp(p.is_lo, p.is_hi)
    return torch.where((w < p.is_lo) | (w > p.is_hi), 0, w)


def by_sign(positive, if_positive: float, otherwise: float, like: torch.Tensor):
    """One of two parameters per token, in `like`'s dtype (fp64 parameters stay fp64)."""
    return torch.where(positive, torch.full_like(like, if_positive), otherwise)


def clamp_vespo_log(x):
    return x.clamp(VESPO_LOG_W_MIN, VESPO_LOG_W_MAX)


def vespo_phi(log_w, adv, p: LossParams):
    """VESPO's Gamma weight exp(λ + k·log w − λ·w), (k, λ) by the advantage's sign; non-finite → 0."""
    k = by_sign(adv >= 0, p.vespo_k_pos, p.vespo_k_neg, adv)
    lam = by_sign(adv >= 0, p.vespo_lambda_pos, p.vespo_lambda_neg, adv).clamp(min=VESPO_LAMBDA_MIN)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return torch.where(torch.isfinite(phi), phi, 0)


def dppo_trust_region(adv, logp, old, p: LossParams):
    """1 where DPPO's trust region keeps the token, else 0 (docs/math.md): the total-variation
    |π − π_old| or binary-KL divergence bound of the side A's sign pushes towards (ε_high for A > 0,
    ε_low otherwise), as verl computes it."""
    prob, old_prob = torch.exp(logp), torch.exp(old)
    if p.pg == PolicyLoss.DPPO_TV:
        keep = torch.where(adv > 0, prob - old_prob <= p.eps_high, prob - old_prob >= -p.eps_low)
    else:
        binary_kl = old_prob * (old - logp) + (1 - old_prob) * torch.log((1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8))
        keep = torch.where(adv > 0, (binary_kl <= p.eps_high) | (prob <= old_prob),
                           (binary_kl <= p.eps_low) | (prob >= old_prob))
    return keep.to(logp.dtype)


def geo_mean_log_ratio(log_ratio, adv, p: LossParams):
    """GMPO's token log-ratio before the sequence mean, sgn(A)·min(sgn(A)·δ, sgn(A)·clamp(δ, −ε_low, ε_high)),
    and its derivative (torch.min's half-and-half at ties, clamp's inclusive bounds: 1 or 0)."""
    positive, negative = adv > 0, adv < 0
    value = torch.where(positive, log_ratio.clamp(max=p.eps_high),
                        torch.where(negative, log_ratio.clamp(min=-p.eps_low), 0))
    d = torch.where(positive, log_ratio <= p.eps_high, torch.where(negative, log_ratio >= -p.eps_low, False))
    return value, d.to(log_ratio.dtype)


def policy_term(rho, adv, logp, old, p: LossParams):
    """ℓ_pg of every loss kind but VESPO with ∂ℓ/∂ρ and the direct ∂ℓ/∂logp (CISPO's, DPPO's, DRO's, KL-Cov's).
    old: the old log-probs (logp itself on policy)."""
    zero = torch.zeros_like(rho)
    if p.pg == PolicyLoss.CLIP:
        lo, hi = 1.0 - p.eps_low, 1.0 + p.eps_high
        rho_d, d_rho_d = rho, 1.0
        if p.has_delta:
            rho_d, d_rho_d = rho.clamp(max=p.delta), (rho <= p.delta).to(rho.dtype)
        a, b = rho_d * adv, rho.clamp(lo, hi) * adv
        da, db = adv * d_rho_d, adv * inside(rho, lo, hi)
        loss = -torch.minimum(a, b)
        d_rho = -torch.where(a < b, da, torch.where(b < a, db, 0.5 * (da + db)))
        if p.has_dual:
            cap = -p.dual_clip * adv
            d_capped = torch.where(loss < cap, d_rho, torch.where(loss > cap, 0, 0.5 * d_rho))
            negative = adv < 0
            loss = torch.where(negative, torch.minimum(loss, cap), loss)
            d_rho = torch.where(negative, d_capped, d_rho)
        return loss, d_rho, zero
    if p.pg == PolicyLoss.CISPO:
        weight = rho.clamp(p.cispo_lo, p.eps_high)
        return -weight * adv * logp, zero, -weight * adv
    if p.pg in (PolicyLoss.DPPO_TV, PolicyLoss.DPPO_KL):
        weight = rho.clamp(max=p.ratio_cap) * dppo_trust_region(adv, logp, old, p)
        return -weight * adv * logp, zero, -weight * adv
    if p.pg == PolicyLoss.DRO:
        log_ratio = logp - old
        return -(logp * adv - 0.5 * p.dro_beta * log_ratio * log_ratio), zero, -adv + p.dro_beta * log_ratio
    if p.pg == PolicyLoss.KL_COV:
        log_ratio = logp - old
        return -adv * rho + p.kl_cov_coef * log_ratio.abs(), -adv, p.kl_cov_coef * torch.sign(log_ratio)
    if p.pg == PolicyLoss.GEO_MEAN:
        return -adv * rho, -adv, zero
    s = by_sign(adv > 0, p.sapo_pos, p.sapo_neg, rho)
    sig = torch.sigmoid(s * (rho - 1))
    return -sig * 4 / s * adv, -4 * adv * sig * (1 - sig), zero


class _Rows:
    """The rows [lo, hi) of one objective pass: their sequence indices, mask, and sums by sequence."""

    def __init__(self, prep: io.PreparedObjective, lo: int, hi: int):
        self.lo, self.hi, self.num_sequences = lo, hi, prep.num_sequences
        rows = torch.arange(lo, hi, device=prep.logp.device)
        self.seq = torch.searchsorted(prep.cu_seqlens[1:], rows, right=True).clamp(max=max(self.num_sequences - 1, 0))
        self.mask = prep.mask[lo:hi].bool()

    def of(self, x):
        return None if x is None else x[self.lo:self.hi]

    def masked(self, x):
        return torch.where(self.mask, x, 0)

    def per_sequence_sum(self, x) -> torch.Tensor:
        """(B, ...) fp64 sums of the rows' values by sequence (masking is the caller's job): an fp32
        running sum over a 32k-token sequence would lose ~1e-4, as in the kernels."""
        out = torch.zeros((self.num_sequences,) + tuple(x.shape[1:]), dtype=torch.float64, device=x.device)
        return out.index_add_(0, self.seq, x.to(torch.float64))


def objective_pass(prep: io.PreparedObjective, params: LossParams, rows, seqs):
    """Fill prep's outputs for rows [rows) of sequences [seqs) (see objective_inputs)."""
    (lo, hi), (seq_lo, seq_hi) = rows, seqs
    hi = min(hi, prep.logp.numel())
    _objective_rows(prep, params, _Rows(prep, lo, max(lo, hi)), seq_lo, seq_hi)


def _objective_rows(prep: io.PreparedObjective, p: LossParams, r: _Rows, seq_lo: int, seq_hi: int):
    seq, m = r.seq, r.mask
    logp, ent = r.of(prep.logp), r.of(prep.entropy)
    dtype = logp.dtype
    old = logp if prep.old is None else r.of(prep.old)
    n_b = prep.counts.clamp(min=1)
    adv = r.of(prep.advantages) if prep.adv_per_token else prep.advantages[seq]
    log_ratio = r.masked(logp - old)

    # Pass 1: sequence sums (fp64), as objective_sequence's first loop.
    def sequence_mean(x):
        return (r.per_sequence_sum(x) / n_b.double()).to(dtype)

    if p.level == Level.TOKEN:
        rho = torch.exp(log_ratio.clamp(p.log_ratio_lo, p.log_ratio_hi))
        d_rho_direct = rho * inside(log_ratio, p.log_ratio_lo, p.log_ratio_hi)
    else:  # sequence: the gradient goes through the sequence mean (pass 3); sequence_token: per token
        if p.pg == PolicyLoss.GEO_MEAN:  # GMPO clips each token's log-ratio before the mean
            token_log_ratio, d_token_log_ratio = geo_mean_log_ratio(log_ratio, adv, p)
            w_seq = sequence_mean(r.masked(token_log_ratio))
        else:
            w_seq = sequence_mean(log_ratio)
        rho_seq = torch.exp(w_seq.clamp(p.log_ratio_lo, p.log_ratio_hi))
        seq_inside = inside(w_seq, p.log_ratio_lo, p.log_ratio_hi)
        rho = rho_seq[seq]
        d_rho_direct = rho * seq_inside[seq] if p.level == Level.SEQUENCE_TOKEN else torch.zeros_like(rho)

    sampling = r.of(prep.sampling)
    is_w, is_seq = None, None
    if p.is_mode in (IsMode.TOKEN_TRUNCATE, IsMode.TOKEN_MASK):
        is_w = is_clip(torch.exp(r.masked(nan_to_zero(old - sampling))), p, p.is_mode == IsMode.TOKEN_TRUNCATE)
    elif p.is_mode != IsMode.NONE:
        is_seq = is_clip(torch.exp(r.per_sequence_sum(r.masked(nan_to_zero(old - sampling))).to(dtype)), p,
                         p.is_mode == IsMode.SEQUENCE_TRUNCATE)
        is_w = is_seq[seq]
    given = None
    if prep.token_weights is not None:
        given = prep.token_weights[seq] if prep.weights_per_seq else r.masked(r.of(prep.token_weights))

    phi = phi_seq = None
    if p.pg == PolicyLoss.VESPO:  # the rollout IS ratios fold into the sequence weight w
        log_w = r.per_sequence_sum(r.masked(log_ratio.clamp(-VESPO_TOKEN_LOG_RATIO, VESPO_TOKEN_LOG_RATIO)))
        if is_seq is not None:
            log_w = log_w + clamp_vespo_log(torch.log(is_seq))
        elif is_w is not None:
            log_w = log_w + r.per_sequence_sum(r.masked(clamp_vespo_log(torch.log(is_w))))
        if given is not None and prep.weights_per_seq:
            log_w = log_w + clamp_vespo_log(torch.log(prep.token_weights))
        elif given is not None:
            log_w = log_w + r.per_sequence_sum(r.masked(clamp_vespo_log(torch.log(given))))
        log_w = clamp_vespo_log(log_w.to(dtype))
        if prep.adv_per_token:
            phi = vespo_phi(log_w[seq], adv, p)
        else:
            phi_seq = vespo_phi(log_w, prep.advantages, p)
            phi = phi_seq[seq]
        pg, d_pg_rho, d_pg_direct = -phi * adv * logp, torch.zeros_like(rho), -phi * adv
    else:
        pg, d_pg_rho, d_pg_direct = policy_term(rho, adv, logp, old, p)

    mult = torch.ones_like(rho)
    if p.has_off_policy:
        behaviour = old if sampling is None else sampling
        off_kl = sequence_mean(r.masked(nan_to_zero(behaviour - logp)))
        mult = torch.where((adv < 0) & (off_kl[seq] > p.off_thresh), 0, mult)
    keep = m.to(dtype)
    if prep.keep_entropy is not None:
        keep = keep * r.of(prep.keep_entropy).to(dtype)
        mult = mult * keep
    if p.pg != PolicyLoss.VESPO:
        for weight in (is_w, given):
            if weight is not None:
                mult = mult * weight
    loss = pg * mult
    g = mult * (d_pg_rho * d_rho_direct + d_pg_direct)
    d_seq_rho = mult * d_pg_rho  # ∂ℓ/∂ρ_b, for pass 3
    kl = None
    if p.kl != KlKind.NONE:
        k_value, d_k = kl_term(logp, r.of(prep.ref), p)
        if p.bias_corr:  # β·k·ρ with ρ's gradient (TRL): ∂ = β(k'·ρ + k·∂ρ)
            kl = k_value * rho
            g = g + p.beta * (d_k * rho + k_value * d_rho_direct)
            d_seq_rho = d_seq_rho + p.beta * k_value
        else:
            kl = k_value
            g = g + p.beta * d_k
        loss = loss + p.beta * kl

    agg_w = 1 / prep.norm[0]
    if p.agg == Agg.SEQ_MEAN_TOKEN_MEAN:
        agg_w = agg_w / n_b[seq]
    ent_w = p.entropy_coef / prep.ent_norm[0] if p.entropy_coef != 0.0 else 0.0
    loss = r.masked(loss)
    g_logp = r.masked(g * agg_w)
    if p.level == Level.SEQUENCE:  # pass 3: dρ_b/dlogp_s = ρ_b·m_s/n_b, shared by the sequence's tokens
        acc_drho = r.per_sequence_sum(r.masked(agg_w * d_seq_rho)).to(dtype)
        through_mean = (acc_drho * rho_seq * seq_inside / n_b)[seq]
        if p.pg == PolicyLoss.GEO_MEAN:
            through_mean = through_mean * d_token_log_ratio
        g_logp = g_logp + r.masked(through_mean)
    prep.per_token_loss[r.lo:r.hi] = loss
    prep.g_logp[r.lo:r.hi] = g_logp
    prep.g_entropy[r.lo:r.hi] = -ent_w * keep
    contribution = loss * agg_w - ent_w * keep * ent
    _add_partials(prep, p, r, contribution, ent, rho, adv, kl, is_w, phi, phi_seq, seq_lo, seq_hi)


def _add_partials(prep, p: LossParams, r: _Rows, contribution, ent, rho, adv, kl, is_w, phi, phi_seq, seq_lo,
                  seq_hi):
    """Per-sequence sums of the pass's rows into prep.partials, slot by slot as the kernels write them."""
    dtype = ent.dtype
    low = (rho < 1 - p.eps_low) & (adv < 0)
    high = (rho > 1 + p.eps_high) & (adv > 0)
    ones, zeros = torch.ones_like(rho), torch.zeros_like(rho)
    columns = {
        Slot.LOSS: contribution, Slot.COUNT: ones, Slot.ENTROPY: ent, Slot.LOW: low.to(dtype),
        Slot.HIGH: high.to(dtype), Slot.REGION: (low | high).to(dtype), Slot.RATIO_SUM: rho, Slot.RATIO_MAX: zeros,
        Slot.KL: zeros if kl is None else kl, Slot.IS: ones if is_w is None else is_w,
        Slot.CISPO_CLIP: ((rho > p.eps_high) & (adv > 0)).to(dtype),
        Slot.VESPO_PHI: phi if phi is not None and prep.adv_per_token else zeros,
    }
    per_token = torch.where(r.mask.unsqueeze(1), torch.stack([columns[slot] for slot in Slot], dim=1), 0)
    sums = r.per_sequence_sum(per_token).to(prep.partials.dtype)
    if phi_seq is not None:  # one φ per sequence, each sequence whole in one pass
        owned = torch.zeros_like(phi_seq, dtype=torch.bool)
        owned[seq_lo:seq_hi] = True
        sums[:, Slot.VESPO_PHI] = torch.where(owned, phi_seq, 0)
    prep.partials += sums
    peak = torch.zeros(r.num_sequences, dtype=dtype, device=rho.device).scatter_reduce(
        0, r.seq, r.masked(rho), "amax", include_self=True)
    prep.partials[:, Slot.RATIO_MAX] = torch.maximum(prep.partials[:, Slot.RATIO_MAX], peak)
