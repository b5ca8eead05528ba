"""Triton kernel: the per-token GRPO objective and its derivatives w.r.t. logp and entropy.

After the vocabulary sweep has produced logp and H per token, this kernel turns them into the
per-token loss, dL/dlogp and dL/dH for every option of docs/math.md. Those two per-token gradients
are all the backward sweep over the logits needs. Tokens are packed (N,) and sequences found
through cu_seqlens (padded is the special case arange·T). One program per sequence, over the
pass's rows of it:
  pass 1 over its tokens: sequence sums (GSPO log-ratio mean, off-policy KL, sequence IS weight);
  pass 2: per-token loss and gradients, plus per-sequence partial sums of the loss and metrics;
  pass 3 (GSPO only): the gradient through the sequence mean, ρ_b · m_s / n_b · Σ_t ∂L/∂ρ_b.
The kernel reads and writes O(N) floats, nothing of size V, and reduces metrics on the
device: per-sequence partials, then a deterministic sum over sequences (no atomics).

The derivatives follow autograd on reference.py exactly, ties included: torch.minimum splits
the gradient in half at ties, and clamp passes it at the bounds (inclusive).
"""
from __future__ import annotations

import triton
import triton.language as tl

from .. import objective_inputs as io

# The option codes of objective_inputs (the C++ enums in grpo_math.h), as constexpr globals so the
# kernel reads `PG_KIND == PG_CISPO`, not a bare integer.
PG_CLIP: tl.constexpr = tl.constexpr(io.PG["clip"])
PG_CISPO: tl.constexpr = tl.constexpr(io.PG["cispo"])
PG_VESPO: tl.constexpr = tl.constexpr(io.PG["vespo"])
KL_NONE: tl.constexpr = tl.constexpr(0)
KL_K1: tl.constexpr = tl.constexpr(io.KL["k1"])
KL_K2: tl.constexpr = tl.constexpr(io.KL["k2"])
IS_NONE: tl.constexpr = tl.constexpr(io.IS[None])
IS_TOKEN_TRUNCATE: tl.constexpr = tl.constexpr(io.IS["token_truncate"])
IS_TOKEN_MASK: tl.constexpr = tl.constexpr(io.IS["token_mask"])
IS_SEQUENCE_TRUNCATE: tl.constexpr = tl.constexpr(io.IS["sequence_truncate"])
IS_SEQUENCE_MASK: tl.constexpr = tl.constexpr(io.IS["sequence_mask"])
AGG_SEQ_MEAN_TOKEN_MEAN: tl.constexpr = tl.constexpr(io.AGG["seq-mean-token-mean"])
LEVEL_TOKEN: tl.constexpr = tl.constexpr(io.LEVEL["token"])
LEVEL_SEQUENCE: tl.constexpr = tl.constexpr(io.LEVEL["sequence"])


@triton.jit
def _nan_to_zero(x):
    return tl.where(x == x, x, 0.0)


@triton.jit
def _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY: tl.constexpr):
    """The mask, logp and old logp of one block of a sequence's tokens, rows offs < end (0 where masked)."""
    inb = offs < end
    m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
    logp = tl.where(m, tl.load(logp_ptr + offs, mask=m, other=0.0), 0.0)
    old = logp
    if not ON_POLICY:
        old = tl.where(m, tl.load(old_ptr + offs, mask=m, other=0.0), 0.0)
    return inb, m, logp, old


@triton.jit
def _policy_term(rho, adv, logp, eps_low, eps_high, cispo_lo, delta, dual_clip, s_pos, s_neg,
                 PG_KIND: tl.constexpr, HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr):
    """Per-token policy loss, its derivative w.r.t. rho, and the direct derivative w.r.t. logp."""
    direct = tl.zeros_like(rho)
    if PG_KIND == PG_CLIP:
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
        weight = tl.minimum(tl.maximum(rho, cispo_lo), eps_high)
        loss = -weight * adv * logp
        d_rho = tl.zeros_like(rho)
        direct = -weight * adv
    else:
        s = tl.where(adv > 0, s_pos, s_neg)
        sig = tl.sigmoid(s * (rho - 1.0))
        loss = -sig * 4.0 / s * adv
        d_rho = -4.0 * adv * sig * (1.0 - sig)
    return loss, d_rho, direct


@triton.jit
def _clamp_log_ratio(w, lo, hi):
    """clamp(w, lo, hi) and its derivative (1 inside the inclusive bounds, as torch.clamp)."""
    return tl.minimum(tl.maximum(w, lo), hi), tl.where((w >= lo) & (w <= hi), 1.0, 0.0)


@triton.jit
def _k3(x):
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
def _is_clip(w, is_lo, is_hi, TRUNCATE: tl.constexpr):
    """The rollout IS weight truncated to [lo, hi] (*_truncate) or zeroed outside it (*_mask)."""
    if TRUNCATE:
        return tl.minimum(tl.maximum(w, is_lo), is_hi)
    return tl.where((w < is_lo) | (w > is_hi), 0.0, w)


@triton.jit
def _token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, TRUNCATE: tl.constexpr):
    """exp(old − sampling) per token (NaN sampling log-probs count as 0), clipped."""
    samp = tl.load(samp_ptr + offs, mask=m, other=0.0)
    return _is_clip(tl.exp(tl.where(m, _nan_to_zero(old - samp), 0.0)), is_lo, is_hi, TRUNCATE)


@triton.jit
def _vespo_phi(log_w, adv, k_pos, lam_pos, k_neg, lam_neg):
    """VESPO's Gamma weight exp(λ + k·log w − λ·w), (k, λ) by the advantage's sign; non-finite → 0."""
    k = tl.where(adv >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(adv >= 0, lam_pos, lam_neg), 1e-4)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    return tl.where((phi == phi) & (phi < float("inf")), phi, 0.0)


@triton.jit
def _vespo_log(x):
    """TRL's clamp of a log weight to [log 1e-8, 20]."""
    return tl.minimum(tl.maximum(x, -18.420680743952367), 20.0)


@triton.jit
def _vespo_log_of(w):
    """_vespo_log(log w) for w >= 0, without forming log 0 = −inf (the clamp would drop it anyway)."""
    return _vespo_log(tl.log(tl.maximum(w, 1e-8)))


@triton.jit
def _kl_term(logp, ref, kl_clamp, KL_KIND: tl.constexpr, HAS_KL_CLAMP: tl.constexpr):
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
            d_x = tl.where((x >= -20.0) & (x <= 20.0), 1.0, 0.0)
            x = tl.minimum(tl.maximum(x, -20.0), 20.0)
        kl = _k3(x)
        d_kl = -(kl + x) * d_x  # −(e^x − 1), accurate at small x too
    if HAS_KL_CLAMP:
        d_kl = tl.where((kl >= -kl_clamp) & (kl <= kl_clamp), d_kl, 0.0)
        kl = tl.minimum(tl.maximum(kl, -kl_clamp), kl_clamp)
    return kl, d_kl


@triton.jit
def _grpo_objective_kernel(
    logp_ptr, ent_ptr, mask_ptr, cu_ptr, counts_ptr, adv_ptr, old_ptr, ref_ptr, samp_ptr, weights_ptr, keep_ent_ptr,
    norm_ptr, ent_norm_ptr,
    loss_ptr, g_logp_ptr, g_ent_ptr, part_ptr,
    row_lo, row_hi, seq_lo, eps_low, eps_high, delta, dual_clip, s_pos, s_neg, beta, kl_clamp, off_thresh,
    is_lo, is_hi, entropy_coef, log_ratio_lo, log_ratio_hi, cispo_lo, k_pos, lam_pos, k_neg, lam_neg,
    PG_KIND: tl.constexpr, LEVEL: tl.constexpr, KL_KIND: tl.constexpr, IS_MODE: tl.constexpr,
    AGG: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, ON_POLICY: tl.constexpr, HAS_SAMPLING: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, BIAS_CORR: tl.constexpr,
    HAS_OFF_POLICY: tl.constexpr, HAS_TOKEN_WEIGHTS: tl.constexpr, WEIGHTS_PER_SEQ: tl.constexpr,
    HAS_ENT_MASK: tl.constexpr, HAS_ENT_BONUS: tl.constexpr,
    NUM_SLOTS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = seq_lo + tl.program_id(0).to(tl.int64)
    # This pass's rows of sequence b: [cu[b], cu[b+1]) within [row_lo, row_hi).
    start = tl.maximum(tl.load(cu_ptr + b), row_lo)
    end = tl.minimum(tl.load(cu_ptr + b + 1), row_hi)
    lanes = tl.arange(0, BLOCK_T)
    norm = tl.load(norm_ptr)
    adv_seq = tl.zeros((), tl.float32)
    if not ADV_PER_TOKEN:
        adv_seq = tl.load(adv_ptr + b)

    VESPO = PG_KIND == PG_VESPO
    IS_TOKEN = (IS_MODE == IS_TOKEN_TRUNCATE) or (IS_MODE == IS_TOKEN_MASK)
    IS_SEQ = (IS_MODE == IS_SEQUENCE_TRUNCATE) or (IS_MODE == IS_SEQUENCE_MASK)
    seq_weight = tl.full((), 1.0, tl.float32)
    if HAS_TOKEN_WEIGHTS and WEIGHTS_PER_SEQ:
        seq_weight = tl.load(weights_ptr + b)

    # Pass 1: sequence sums. Each block is summed as a tree (tl.sum), the blocks in fp32: the
    # error grows with T / BLOCK_T, not T.
    n_tok = tl.zeros((), tl.float32)
    sum_delta = tl.zeros((), tl.float32)
    sum_off = tl.zeros((), tl.float32)
    sum_isd = tl.zeros((), tl.float32)
    vespo_log = tl.zeros((), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + lanes
        inb, m, logp, old = _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY)
        n_tok += tl.sum(m.to(tl.float32), axis=0)
        sum_delta += tl.sum(logp - old, axis=0)
        if HAS_OFF_POLICY:
            behaviour = old
            if HAS_SAMPLING:
                behaviour = tl.load(samp_ptr + offs, mask=m, other=0.0)
            sum_off += tl.sum(tl.where(m, _nan_to_zero(behaviour - logp), 0.0), axis=0)
        if IS_MODE != IS_NONE:
            samp = tl.load(samp_ptr + offs, mask=m, other=0.0)
            sum_isd += tl.sum(tl.where(m, _nan_to_zero(old - samp), 0.0), axis=0)
        if VESPO:
            log_w_t = tl.minimum(tl.maximum(logp - old, -20.0), 20.0)
            if IS_TOKEN:
                is_t = _token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, IS_MODE == IS_TOKEN_TRUNCATE)
                log_w_t += _vespo_log_of(is_t)
            if HAS_TOKEN_WEIGHTS and not WEIGHTS_PER_SEQ:
                log_w_t += _vespo_log_of(tl.load(weights_ptr + offs, mask=m, other=1.0))
            vespo_log += tl.sum(tl.where(m, log_w_t, 0.0), axis=0)
    n_b = tl.maximum(tl.load(counts_ptr + b), 1.0)  # the whole sequence's count: a pass may see part of it
    w_seq, seq_inside = _clamp_log_ratio(sum_delta / n_b, log_ratio_lo, log_ratio_hi)
    rho_seq = tl.exp(w_seq)
    off_kl = sum_off / n_b
    is_seq = tl.exp(sum_isd)
    if IS_SEQ:
        is_seq = _is_clip(is_seq, is_lo, is_hi, IS_MODE == IS_SEQUENCE_TRUNCATE)
    vespo_log_w = tl.zeros((), tl.float32)
    if VESPO:
        if IS_SEQ:
            vespo_log += _vespo_log_of(is_seq)
        if HAS_TOKEN_WEIGHTS and WEIGHTS_PER_SEQ:
            vespo_log += _vespo_log_of(seq_weight)
        vespo_log_w = _vespo_log(vespo_log)
    if AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
        agg_w = 1.0 / (n_b * norm)
    else:
        agg_w = 1.0 / norm
    ent_w = tl.zeros((), tl.float32)
    if HAS_ENT_BONUS:
        ent_w = entropy_coef / tl.load(ent_norm_ptr)

    # Pass 2: per-token loss and gradients, per-sequence partials.
    acc_loss = tl.zeros((), tl.float32)
    acc_ent = tl.zeros((), tl.float32)
    acc_low = tl.zeros((), tl.float32)
    acc_high = tl.zeros((), tl.float32)
    acc_region = tl.zeros((), tl.float32)
    acc_rho = tl.zeros((), tl.float32)
    max_rho = tl.zeros((), tl.float32)
    acc_kl = tl.zeros((), tl.float32)
    acc_is = tl.zeros((), tl.float32)
    acc_drho = tl.zeros((), tl.float32)
    acc_cispo = tl.zeros((), tl.float32)
    acc_phi = tl.zeros((), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + lanes
        inb, m, logp, old = _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY)
        mf = m.to(tl.float32)
        ent = tl.where(m, tl.load(ent_ptr + offs, mask=m, other=0.0), 0.0)
        if ADV_PER_TOKEN:
            adv = tl.where(m, tl.load(adv_ptr + offs, mask=m, other=0.0), 0.0)
        else:
            adv = tl.zeros((BLOCK_T,), tl.float32) + adv_seq
        if LEVEL == LEVEL_TOKEN:
            w_tok, inside = _clamp_log_ratio(logp - old, log_ratio_lo, log_ratio_hi)
            rho = tl.exp(w_tok)
            d_rho_direct = rho * mf * inside
        elif LEVEL == LEVEL_SEQUENCE:
            rho = tl.zeros((BLOCK_T,), tl.float32) + rho_seq
            d_rho_direct = tl.zeros((BLOCK_T,), tl.float32)
        else:
            rho = tl.zeros((BLOCK_T,), tl.float32) + rho_seq
            d_rho_direct = rho * mf * seq_inside
        phi = tl.zeros((BLOCK_T,), tl.float32)
        if VESPO:
            phi = _vespo_phi(vespo_log_w, adv, k_pos, lam_pos, k_neg, lam_neg)
            pg = -phi * adv * logp
            d_pg_rho = tl.zeros((BLOCK_T,), tl.float32)
            d_pg_direct = -phi * adv
        else:
            pg, d_pg_rho, d_pg_direct = _policy_term(rho, adv, logp, eps_low, eps_high, cispo_lo, delta, dual_clip,
                                                     s_pos, s_neg, PG_KIND, HAS_DELTA, HAS_DUAL)
        mult = tl.full((BLOCK_T,), 1.0, tl.float32)
        if HAS_OFF_POLICY:
            stale = tl.zeros((BLOCK_T,), tl.float32) + off_kl > off_thresh
            mult = tl.where((adv < 0) & stale, 0.0, mult)
        keep_ent = mf
        if HAS_ENT_MASK:
            keep_ent = (tl.load(keep_ent_ptr + offs, mask=m, other=0) != 0).to(tl.float32) * mf
            mult = mult * keep_ent
        is_w = tl.full((BLOCK_T,), 1.0, tl.float32)
        if IS_TOKEN:
            is_w = _token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, IS_MODE == IS_TOKEN_TRUNCATE)
        if IS_SEQ:
            is_w = tl.zeros((BLOCK_T,), tl.float32) + is_seq
        if not VESPO:  # VESPO folds the IS ratios into its sequence weight instead
            if IS_MODE != IS_NONE:
                mult = mult * is_w
            if HAS_TOKEN_WEIGHTS:
                if WEIGHTS_PER_SEQ:
                    mult = mult * seq_weight
                else:
                    mult = mult * tl.load(weights_ptr + offs, mask=m, other=0.0)
        loss_t = pg * mult
        g_t = mult * (d_pg_rho * d_rho_direct + d_pg_direct)
        d_seq_rho = mult * d_pg_rho  # ∂ℓ/∂ρ_b, for the GSPO pass
        kl = tl.zeros((BLOCK_T,), tl.float32)
        if KL_KIND != KL_NONE:
            ref = tl.where(m, tl.load(ref_ptr + offs, mask=m, other=0.0), 0.0)
            k_val, d_k = _kl_term(logp, ref, kl_clamp, KL_KIND, HAS_KL_CLAMP)
            if BIAS_CORR:  # β·k·ρ with ρ's gradient (TRL): ∂ = β(k'·ρ + k·∂ρ)
                kl = k_val * rho
                g_t += beta * (d_k * rho + k_val * d_rho_direct)
                d_seq_rho += beta * k_val
            else:
                kl = k_val
                g_t += beta * d_k
            loss_t += beta * kl
        w = mf * agg_w
        loss_t = tl.where(m, loss_t, 0.0)
        tl.store(loss_ptr + offs, loss_t, mask=inb)
        tl.store(g_logp_ptr + offs, tl.where(m, g_t * w, 0.0), mask=inb)
        tl.store(g_ent_ptr + offs, -ent_w * keep_ent, mask=inb)
        acc_loss += tl.sum(loss_t * w, axis=0) - ent_w * tl.sum(keep_ent * ent, axis=0)
        acc_drho += tl.sum(tl.where(m, w * d_seq_rho, 0.0), axis=0)
        low = ((rho < 1.0 - eps_low) & (adv < 0)).to(tl.float32) * mf
        high = ((rho > 1.0 + eps_high) & (adv > 0)).to(tl.float32) * mf
        acc_ent += tl.sum(ent, axis=0)
        acc_low += tl.sum(low, axis=0)
        acc_high += tl.sum(high, axis=0)
        acc_region += tl.sum(tl.maximum(low, high), axis=0)
        acc_rho += tl.sum(rho * mf, axis=0)
        max_rho = tl.maximum(max_rho, tl.max(rho * mf, axis=0))
        acc_kl += tl.sum(kl * mf, axis=0)
        acc_is += tl.sum(is_w * mf, axis=0)
        acc_cispo += tl.sum(((rho > eps_high) & (adv > 0)).to(tl.float32) * mf, axis=0)
        acc_phi += tl.sum(phi * mf, axis=0)

    # Pass 3 (GSPO): d rho_b / d logp_s = rho_b m_s / n_b, shared by every token of the sequence.
    if LEVEL == LEVEL_SEQUENCE:
        scale = acc_drho * rho_seq * seq_inside / n_b
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + lanes
            inb = offs < end
            m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
            g = tl.load(g_logp_ptr + offs, mask=inb, other=0.0)
            tl.store(g_logp_ptr + offs, tl.where(m, g + scale, 0.0), mask=inb)

    # Add this pass's sums to the sequence's partials (the ratio max: keep the larger).
    part = part_ptr + b * NUM_SLOTS
    tl.store(part + 0, tl.load(part + 0) + acc_loss)
    tl.store(part + 1, tl.load(part + 1) + n_tok)
    tl.store(part + 2, tl.load(part + 2) + acc_ent)
    tl.store(part + 3, tl.load(part + 3) + acc_low)
    tl.store(part + 4, tl.load(part + 4) + acc_high)
    tl.store(part + 5, tl.load(part + 5) + acc_region)
    tl.store(part + 6, tl.load(part + 6) + acc_rho)
    tl.store(part + 7, tl.maximum(tl.load(part + 7), max_rho))
    tl.store(part + 8, tl.load(part + 8) + acc_kl)
    tl.store(part + 9, tl.load(part + 9) + acc_is)
    tl.store(part + 10, tl.load(part + 10) + acc_cispo)
    # TRL's vespo/phi_seq_mean: one φ per sequence (per-sequence advantages), else a token mean.
    # VESPO couples tokens, so its sequences come whole, in exactly one pass.
    if ADV_PER_TOKEN:
        tl.store(part + 11, tl.load(part + 11) + acc_phi)
    elif VESPO:
        tl.store(part + 11, tl.load(part + 11) + _vespo_phi(vespo_log_w, adv_seq, k_pos, lam_pos, k_neg, lam_neg))


def objective_pass(prep: io.PreparedObjective, cfg, rows, seqs):
    """Fill prep's outputs for rows [rows) of sequences [seqs) (see objective_inputs)."""
    (row_lo, row_hi), (seq_lo, seq_hi) = rows, seqs
    if seq_hi <= seq_lo:
        return
    p = io.params(cfg)
    n = prep.logp.numel()
    # Tokens one program walks per block: a sequence's length is not known on the host, so the
    # block follows the pass's rows per sequence on average (a host-known bound).
    per_sequence = max(1, (row_hi - row_lo) // (seq_hi - seq_lo))
    _grpo_objective_kernel[(seq_hi - seq_lo,)](
        prep.logp, prep.entropy, prep.mask, prep.cu_seqlens, prep.counts, prep.advantages,
        prep.old if prep.old is not None else prep.logp, prep.ref if prep.ref is not None else prep.logp,
        prep.sampling if prep.sampling is not None else prep.logp,
        prep.token_weights if prep.token_weights is not None else prep.logp,
        prep.keep_entropy if prep.keep_entropy is not None else prep.mask, prep.norm, prep.ent_norm,
        prep.per_token_loss, prep.g_logp, prep.g_entropy, prep.partials,
        row_lo, min(row_hi, n), seq_lo,
        p["eps_low"], p["eps_high"], p["delta"], p["dual_clip"], p["sapo_pos"], p["sapo_neg"], p["beta"],
        p["kl_clamp"], p["off_thresh"], p["is_lo"], p["is_hi"], p["entropy_coef"], p["log_ratio_lo"],
        p["log_ratio_hi"], p["cispo_lo"], p["vespo_k_pos"], p["vespo_lambda_pos"], p["vespo_k_neg"],
        p["vespo_lambda_neg"],
        PG_KIND=p["pg"], LEVEL=p["level"], KL_KIND=p["kl"], IS_MODE=p["is_mode"], AGG=p["agg"],
        ADV_PER_TOKEN=prep.adv_per_token, ON_POLICY=prep.old is None, HAS_SAMPLING=prep.sampling is not None,
        HAS_DELTA=bool(p["has_delta"]), HAS_DUAL=bool(p["has_dual"]), HAS_KL_CLAMP=bool(p["has_kl_clamp"]),
        BIAS_CORR=bool(p["bias_corr"]), HAS_OFF_POLICY=bool(p["has_off_policy"]),
        HAS_TOKEN_WEIGHTS=prep.token_weights is not None, WEIGHTS_PER_SEQ=prep.weights_per_seq,
        HAS_ENT_MASK=prep.keep_entropy is not None, HAS_ENT_BONUS=p["entropy_coef"] != 0.0, NUM_SLOTS=io.NUM_SLOTS,
        BLOCK_T=min(1024, triton.next_power_of_2(per_sequence)),
    )
