"""The per-token math of docs/math.md as @triton.jit helpers: the Triton mirror of csrc/grpo_math.h
(one function per formula, same names without the leading underscore there), used by the
objective kernel. The derivatives follow autograd on reference.py exactly, ties included:
torch.minimum splits the gradient in half at ties, and clamp passes it at the (inclusive) bounds.
"""
import triton
import triton.language as tl

from .options import (
    KL_K1, KL_K2, KL_LOG_RATIO_CLAMP, P_CISPO_LO, P_DELTA, P_DRO_BETA, P_DUAL_CLIP, P_EPS_HIGH, P_EPS_LOW,
    P_KL_COV_COEF, P_RATIO_CAP, P_SAPO_NEG, P_SAPO_POS, PG_CISPO, PG_CLIP, PG_DPPO_KL, PG_DPPO_TV, PG_DRO,
    PG_GEO_MEAN, PG_KL_COV, VESPO_LAMBDA_MIN, VESPO_LOG_W_MAX, VESPO_LOG_W_MIN, VESPO_W_MIN,
)


@triton.jit
def nan_to_zero(x):
    return tl.where(x == x, x, 0.0)


@triton.jit
def dppo_trust_region(adv, logp, old, eps_low, eps_high, PG_KIND: tl.constexpr):
    """1.0 where DPPO's trust region keeps the token (total variation or binary KL, by A's sign), else 0."""
    prob = tl.exp(logp)
    old_prob = tl.exp(old)
    if PG_KIND == PG_DPPO_TV:
        keep = tl.where(adv > 0, prob - old_prob <= eps_high, prob - old_prob >= -eps_low)
    else:
        # log of a ratio <= 0 (a log-prob > 0) is NaN in verl, and NaN <= ε is false: the same without
        # forming the NaN (Triton's interpreter raises on numpy's warning).
        odds = (1.0 - old_prob + 1e-8) / (1.0 - prob + 1e-8)
        binary_kl = old_prob * (old - logp) + (1.0 - old_prob) * tl.log(tl.where(odds > 0, odds, 1.0))
        keep = tl.where(adv > 0, ((odds > 0) & (binary_kl <= eps_high)) | (prob <= old_prob),
                        ((odds > 0) & (binary_kl <= eps_low)) | (prob >= old_prob))
    return tl.where(keep, 1.0, 0.0)


@triton.jit
def geo_mean_log_ratio(log_ratio, adv, eps_low, eps_high):
    """GMPO's sign-clipped token log-ratio (min(δ, ε_high) for A > 0, max(δ, −ε_low) for A < 0, 0 for
    A = 0) and its derivative (1 or 0, as autograd through torch.min and clamp)."""
    value = tl.where(adv > 0, tl.minimum(log_ratio, eps_high),
                     tl.where(adv < 0, tl.maximum(log_ratio, -eps_low), 0.0))
    d = tl.where(adv > 0, tl.where(log_ratio <= eps_high, 1.0, 0.0),
                 tl.where((adv < 0) & (log_ratio >= -eps_low), 1.0, 0.0))
    return value, d


@triton.jit
def policy_term(rho, adv, logp, old, params_ptr, PG_KIND: tl.constexpr, HAS_DELTA: tl.constexpr,
                HAS_DUAL: tl.constexpr):
    """Per-token policy loss, its derivative w.r.t. rho, and the direct derivative w.r.t. logp
    (old: the old log-probs). Each loss kind loads the LossParams floats it uses from the parameter
    buffer, so a new kind is one branch here (and its fields in options.py), nothing in the kernel."""
    direct = tl.zeros_like(rho)
    if PG_KIND == PG_CLIP:
        eps_low = tl.load(params_ptr + P_EPS_LOW)
        eps_high = tl.load(params_ptr + P_EPS_HIGH)
        delta = tl.load(params_ptr + P_DELTA)
        dual_clip = tl.load(params_ptr + P_DUAL_CLIP)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        rho_c = tl.minimum(tl.maximum(rho, lo), hi)
        rho_d = rho
        d_rho_d = tl.full(rho.shape, 1.0, tl.float32)
        if HAS_DELTA:
            rho_d = tl.minimum(rho, delta)
            d_rho_d = tl.where(rho <= delta, 1.0, 0.0)
        a = rho_d * adv
        b = rho_c * adv
        da = adv * d_rho_d
        db = adv * tl.where((rho >= lo) & (rho <= hi), 1.0, 0.0)
        loss = -tl.minimum(a, b)
        d_rho = -tl.where(a < b, da, tl.where(b < a, db, 0.5 * (da + db)))
        if HAS_DUAL:
            cap = -dual_clip * adv
            capped = tl.minimum(loss, cap)
            d_capped = tl.where(loss < cap, d_rho, tl.where(loss > cap, 0.0, 0.5 * d_rho))
            loss = tl.where(adv < 0, capped, loss)
            d_rho = tl.where(adv < 0, d_capped, d_rho)
    elif PG_KIND == PG_CISPO:
        weight = tl.minimum(tl.maximum(rho, tl.load(params_ptr + P_CISPO_LO)), tl.load(params_ptr + P_EPS_HIGH))
        loss = -weight * adv * logp
        d_rho = tl.zeros_like(rho)
        direct = -weight * adv
    elif (PG_KIND == PG_DPPO_TV) or (PG_KIND == PG_DPPO_KL):
        weight = tl.minimum(rho, tl.load(params_ptr + P_RATIO_CAP)) * dppo_trust_region(
            adv, logp, old, tl.load(params_ptr + P_EPS_LOW), tl.load(params_ptr + P_EPS_HIGH), PG_KIND)
        loss = -weight * adv * logp
        d_rho = tl.zeros_like(rho)
        direct = -weight * adv
    elif PG_KIND == PG_DRO:
        beta = tl.load(params_ptr + P_DRO_BETA)
        log_ratio = logp - old
        loss = -(logp * adv - 0.5 * beta * log_ratio * log_ratio)
        d_rho = tl.zeros_like(rho)
        direct = -adv + beta * log_ratio
    elif PG_KIND == PG_KL_COV:
        coef = tl.load(params_ptr + P_KL_COV_COEF)
        log_ratio = logp - old
        loss = -adv * rho + coef * tl.abs(log_ratio)
        d_rho = -adv
        direct = coef * tl.where(log_ratio > 0, 1.0, tl.where(log_ratio < 0, -1.0, 0.0))
    elif PG_KIND == PG_GEO_MEAN:
        loss = -adv * rho
        d_rho = -adv
    else:
        s = tl.where(adv > 0, tl.load(params_ptr + P_SAPO_POS), tl.load(params_ptr + P_SAPO_NEG))
        sig = tl.sigmoid(s * (rho - 1.0))
        loss = -sig * 4.0 / s * adv
        d_rho = -4.0 * adv * sig * (1.0 - sig)
    return loss, d_rho, direct


@triton.jit
def clamp_log_ratio(w, lo, hi):
    """clamp(w, lo, hi) and its derivative (1 inside the inclusive bounds, as torch.clamp)."""
    return tl.minimum(tl.maximum(w, lo), hi), tl.where((w >= lo) & (w <= hi), 1.0, 0.0)


@triton.jit
def k3_value(x):
    """e^x − x − 1 without cancellation: Taylor series to x^11 for |x| < 1, e^x − 1 − x above
    (no cancellation there). As grpo_math.h's k3_value."""
    xs = tl.where(tl.abs(x) < 1.0, x, 0.0)
    p = 2.50521083854417202e-08 * xs + 2.75573192239858883e-07
    p = p * xs + 2.75573192239858925e-06
    p = p * xs + 2.48015873015873016e-05
    p = p * xs + 1.98412698412698413e-04
    p = p * xs + 1.38888888888888894e-03
    p = p * xs + 8.33333333333333322e-03
    p = p * xs + 4.16666666666666644e-02
    p = p * xs + 1.66666666666666657e-01
    p = p * xs + 0.5
    return tl.where(tl.abs(x) < 1.0, p * xs * xs, tl.exp(x) - 1.0 - x)


@triton.jit
def is_clip(w, is_lo, is_hi, TRUNCATE: tl.constexpr):
    """The rollout IS weight truncated to [lo, hi] (*_truncate) or zeroed outside it (*_mask)."""
    if TRUNCATE:
        return tl.minimum(tl.maximum(w, is_lo), is_hi)
    return tl.where((w < is_lo) | (w > is_hi), 0.0, w)


@triton.jit
def token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, TRUNCATE: tl.constexpr):
    """exp(old − sampling) per token (NaN sampling log-probs count as 0), clipped."""
    samp = tl.load(samp_ptr + offs, mask=m, other=0.0)
    return is_clip(tl.exp(tl.where(m, nan_to_zero(old - samp), 0.0)), is_lo, is_hi, TRUNCATE)


@triton.jit
def vespo_phi(log_w, adv, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's Gamma weight exp(λ + k·log w − λ·w), (k, λ) by the advantage's sign; non-finite → 0."""
    k = tl.where(adv >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(adv >= 0, lam_pos, lam_neg), VESPO_LAMBDA_MIN)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)


@triton.jit
def clamp_vespo_log(x):
    """TRL's clamp of a log weight to [log 1e-8, 20]."""
    return tl.minimum(tl.maximum(x, VESPO_LOG_W_MIN), VESPO_LOG_W_MAX)


@triton.jit
def vespo_log_of(w):
    """clamp_vespo_log(log w) for w >= 0, without forming log 0 = −inf (the clamp would drop it anyway)."""
    return clamp_vespo_log(tl.log(tl.maximum(w, VESPO_W_MIN)))


@triton.jit
def kl_term(logp, ref, kl_clamp, KL_KIND: tl.constexpr, HAS_KL_CLAMP: tl.constexpr):
    """k1/k2/k3 value of KL(pi || pi_ref) and its derivative w.r.t. logp (x = ref − logp)."""
    x = ref - logp
    if KL_KIND == KL_K1:
        kl = -x
        d_kl = tl.full(x.shape, 1.0, tl.float32)
    elif KL_KIND == KL_K2:
        kl = 0.5 * x * x
        d_kl = -x
    else:
        d_x = tl.full(x.shape, 1.0, tl.float32)
        if HAS_KL_CLAMP:
            d_x = tl.where((x >= -KL_LOG_RATIO_CLAMP) & (x <= KL_LOG_RATIO_CLAMP), 1.0, 0.0)
            x = tl.minimum(tl.maximum(x, -KL_LOG_RATIO_CLAMP), KL_LOG_RATIO_CLAMP)
        kl = k3_value(x)
        d_kl = -(kl + x) * d_x  # −(e^x − 1), accurate at small x too
    if HAS_KL_CLAMP:
        d_kl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), d_kl, 0.0)
        kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
    return kl, d_kl
