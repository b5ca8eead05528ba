"""Triton kernel: the per-token GRPO objective and its derivatives w.r.t. logp and entropy.

After the vocabulary sweep has produced logp and H per token, this kernel turns them into the
per-token loss, dL/dlogp and dL/dH for every option of docs/math.md. Those two per-token gradients
are all the backward sweep over the logits needs. Tokens are packed (N,) and sequences found
through cu_seqlens (padded is the special case arange·T). One program per sequence, over the
pass's rows of it:
  pass 1 over its tokens: sequence sums (GSPO log-ratio mean, off-policy KL, sequence IS weight);
  pass 2: per-token loss and gradients, plus per-sequence partial sums of the loss and metrics;
  pass 3 (GSPO, GMPO): the gradient through the sequence mean, ρ_b · m_s / n_b · Σ_t ∂L/∂ρ_b
  (GMPO: times each token's clipped log-ratio derivative).
The kernel reads and writes O(N) floats, nothing of size V, and reduces metrics on the
device: per-sequence partials, then a deterministic sum over sequences (no atomics).

The derivatives follow autograd on reference.py exactly, ties included: torch.minimum splits
the gradient in half at ties, and clamp passes it at the bounds (inclusive).
"""
from __future__ import annotations

import functools
import re

import torch
import triton
import triton.language as tl

from ...options import LOSS_FLOAT_FIELDS, OBJECTIVE_BUFFER_NAMES, LossParams
from .. import objective_inputs as io
from .math import (
    clamp_log_ratio, clamp_vespo_log, geo_mean_log_ratio, is_clip, kl_term, nan_to_zero, policy_term,
    token_is_weight, vespo_log_of, vespo_phi,
)
from .options import (
    AGG_SEQ_MEAN_TOKEN_MEAN, IS_NONE, IS_SEQUENCE_MASK, IS_SEQUENCE_TRUNCATE, IS_TOKEN_MASK, IS_TOKEN_TRUNCATE,
    KL_NONE, LEVEL_SEQUENCE, LEVEL_TOKEN, NUM_SLOTS, P_BETA, P_ENTROPY_COEF, P_EPS_HIGH, P_EPS_LOW, P_IS_HI, P_IS_LO,
    P_KL_CLAMP, P_LOG_RATIO_HI, P_LOG_RATIO_LO, P_OFF_THRESH, P_VESPO_K_NEG, P_VESPO_K_POS, P_VESPO_LAMBDA_NEG,
    P_VESPO_LAMBDA_POS, PG_GEO_MEAN, PG_VESPO, SLOT_CISPO_CLIP, SLOT_COUNT, SLOT_ENTROPY, SLOT_HIGH, SLOT_IS, SLOT_KL,
    SLOT_LOSS, SLOT_LOW, SLOT_RATIO_MAX, SLOT_RATIO_SUM, SLOT_REGION, SLOT_VESPO_PHI, VESPO_TOKEN_LOG_RATIO,
)


_KEEP_ENTROPY = OBJECTIVE_BUFFER_NAMES.index("keep_entropy")


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
def _token_advantages(adv_ptr, offs, m, adv_seq, ADV_PER_TOKEN: tl.constexpr, BLOCK_T: tl.constexpr):
    """The advantage of each token of a block (0 where masked when given per token)."""
    if ADV_PER_TOKEN:
        return tl.where(m, tl.load(adv_ptr + offs, mask=m, other=0.0), 0.0)
    return tl.zeros((BLOCK_T,), tl.float32) + adv_seq


@triton.jit
def _grpo_objective_kernel(
    logp_ptr, ent_ptr, mask_ptr, cu_ptr, counts_ptr, adv_ptr, old_ptr, ref_ptr, samp_ptr, weights_ptr, keep_ent_ptr,
    norm_ptr, ent_norm_ptr,
    loss_ptr, g_logp_ptr, g_ent_ptr, part_ptr,
    params_ptr, row_lo, row_hi, seq_lo,
    PG_KIND: tl.constexpr, LEVEL: tl.constexpr, KL_KIND: tl.constexpr, IS_MODE: tl.constexpr,
    AGG: tl.constexpr, ADV_PER_TOKEN: tl.constexpr, ON_POLICY: tl.constexpr, HAS_SAMPLING: tl.constexpr,
    HAS_DELTA: tl.constexpr, HAS_DUAL: tl.constexpr, HAS_KL_CLAMP: tl.constexpr, BIAS_CORR: tl.constexpr,
    HAS_OFF_POLICY: tl.constexpr, HAS_TOKEN_WEIGHTS: tl.constexpr, WEIGHTS_PER_SEQ: tl.constexpr,
    HAS_ENT_MASK: tl.constexpr, HAS_ENT_BONUS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # LossParams' floats, from the one float32 buffer (options.LOSS_FLOAT_FIELDS order).
    eps_low = tl.load(params_ptr + P_EPS_LOW)
    eps_high = tl.load(params_ptr + P_EPS_HIGH)
    beta = tl.load(params_ptr + P_BETA)
    kl_clamp = tl.load(params_ptr + P_KL_CLAMP)
    off_thresh = tl.load(params_ptr + P_OFF_THRESH)
    is_lo = tl.load(params_ptr + P_IS_LO)
    is_hi = tl.load(params_ptr + P_IS_HI)
    entropy_coef = tl.load(params_ptr + P_ENTROPY_COEF)
    log_ratio_lo = tl.load(params_ptr + P_LOG_RATIO_LO)
    log_ratio_hi = tl.load(params_ptr + P_LOG_RATIO_HI)
    k_pos = tl.load(params_ptr + P_VESPO_K_POS)
    lam_pos = tl.load(params_ptr + P_VESPO_LAMBDA_POS)
    k_neg = tl.load(params_ptr + P_VESPO_K_NEG)
    lam_neg = tl.load(params_ptr + P_VESPO_LAMBDA_NEG)
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

    # Pass 1: sequence sums. Each block is summed as a tree (tl.sum) and the blocks in fp64 (as the
    # C++ build accumulates): with BLOCK_T <= 512, a 131072-token sequence is 256 blocks, whose fp32
    # running sum alone would lose ~1e-6 relative.
    n_tok = tl.zeros((), tl.float32)
    sum_delta = tl.zeros((), tl.float64)
    sum_off = tl.zeros((), tl.float64)
    sum_isd = tl.zeros((), tl.float64)
    vespo_log = tl.zeros((), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + lanes
        inb, m, logp, old = _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY)
        n_tok += tl.sum(m.to(tl.float32), axis=0)
        if PG_KIND == PG_GEO_MEAN:  # GMPO clips each token's log-ratio before the mean
            clipped, _ = geo_mean_log_ratio(
                logp - old, _token_advantages(adv_ptr, offs, m, adv_seq, ADV_PER_TOKEN, BLOCK_T), eps_low, eps_high)
            sum_delta += tl.sum(tl.where(m, clipped, 0.0), axis=0).to(tl.float64)
        else:
            sum_delta += tl.sum(logp - old, axis=0).to(tl.float64)
        if HAS_OFF_POLICY:
            behaviour = old
            if HAS_SAMPLING:
                behaviour = tl.load(samp_ptr + offs, mask=m, other=0.0)
            sum_off += tl.sum(tl.where(m, nan_to_zero(behaviour - logp), 0.0), axis=0).to(tl.float64)
        if IS_MODE != IS_NONE:
            samp = tl.load(samp_ptr + offs, mask=m, other=0.0)
            sum_isd += tl.sum(tl.where(m, nan_to_zero(old - samp), 0.0), axis=0).to(tl.float64)
        if VESPO:
            log_w_t = tl.minimum(tl.maximum(logp - old, -VESPO_TOKEN_LOG_RATIO), VESPO_TOKEN_LOG_RATIO)
            if IS_TOKEN:
                is_t = token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, IS_MODE == IS_TOKEN_TRUNCATE)
                log_w_t += vespo_log_of(is_t)
            if HAS_TOKEN_WEIGHTS and not WEIGHTS_PER_SEQ:
                log_w_t += vespo_log_of(tl.load(weights_ptr + offs, mask=m, other=1.0))
            vespo_log += tl.sum(tl.where(m, log_w_t, 0.0), axis=0)
    n_b = tl.maximum(tl.load(counts_ptr + b), 1.0)  # the whole sequence's count: a pass may see part of it
    w_seq, seq_inside = clamp_log_ratio((sum_delta / n_b).to(tl.float32), log_ratio_lo, log_ratio_hi)
    rho_seq = tl.exp(w_seq)
    off_kl = (sum_off / n_b).to(tl.float32)
    is_seq = tl.exp(sum_isd.to(tl.float32))
    if IS_SEQ:
        is_seq = is_clip(is_seq, is_lo, is_hi, IS_MODE == IS_SEQUENCE_TRUNCATE)
    vespo_log_w = tl.zeros((), tl.float32)
    if VESPO:
        if IS_SEQ:
            vespo_log += vespo_log_of(is_seq)
        if HAS_TOKEN_WEIGHTS and WEIGHTS_PER_SEQ:
            vespo_log += vespo_log_of(seq_weight)
        vespo_log_w = clamp_vespo_log(vespo_log)
    # Pass 3's d rho_b / d logp_s = rho_b m_s / n_b (times the clip's pass-through), applied to each
    # block's sum in pass 2 rather than once after it (the same to fp32 rounding), so that no value
    # formed before pass 2 is used only after it: ptxas kept such a value in a stack slot across the
    # loop in some variants (an 8-byte frame, a spill to the compile test; OBJECTIVE_WARPS).
    seq_grad_scale = rho_seq * seq_inside / n_b
    if AGG == AGG_SEQ_MEAN_TOKEN_MEAN:
        agg_w = 1.0 / (n_b * norm)
    else:
        agg_w = 1.0 / norm
    ent_w = tl.zeros((), tl.float32)
    if HAS_ENT_BONUS:
        ent_w = entropy_coef / tl.load(ent_norm_ptr)

    # Pass 2: per-token loss and gradients, per-sequence partials.
    acc_loss = tl.zeros((), tl.float64)  # fp64 across blocks, as pass 1's sums
    acc_ent = tl.zeros((), tl.float32)
    acc_low = tl.zeros((), tl.float32)
    acc_high = tl.zeros((), tl.float32)
    acc_region = tl.zeros((), tl.float32)
    acc_rho = tl.zeros((), tl.float32)
    max_rho = tl.zeros((), tl.float32)
    acc_kl = tl.zeros((), tl.float64)
    acc_is = tl.zeros((), tl.float32)
    acc_drho = tl.zeros((), tl.float64)
    acc_cispo = tl.zeros((), tl.float32)
    acc_phi = tl.zeros((), tl.float32)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + lanes
        inb, m, logp, old = _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY)
        mf = m.to(tl.float32)
        ent = tl.where(m, tl.load(ent_ptr + offs, mask=m, other=0.0), 0.0)
        adv = _token_advantages(adv_ptr, offs, m, adv_seq, ADV_PER_TOKEN, BLOCK_T)
        if LEVEL == LEVEL_TOKEN:
            w_tok, inside = clamp_log_ratio(logp - old, log_ratio_lo, log_ratio_hi)
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
            phi = vespo_phi(vespo_log_w, adv, k_pos, lam_pos, k_neg, lam_neg)
            pg = -phi * adv * logp
            d_pg_rho = tl.zeros((BLOCK_T,), tl.float32)
            d_pg_direct = -phi * adv
        else:
            pg, d_pg_rho, d_pg_direct = policy_term(rho, adv, logp, old, params_ptr, PG_KIND, HAS_DELTA, HAS_DUAL)
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
            is_w = token_is_weight(samp_ptr, offs, m, old, is_lo, is_hi, IS_MODE == IS_TOKEN_TRUNCATE)
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
            k_val, d_k = kl_term(logp, ref, kl_clamp, KL_KIND, HAS_KL_CLAMP)
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
        acc_loss += (tl.sum(loss_t * w, axis=0) - ent_w * tl.sum(keep_ent * ent, axis=0)).to(tl.float64)
        if LEVEL == LEVEL_SEQUENCE:
            acc_drho += (tl.sum(tl.where(m, w * d_seq_rho, 0.0), axis=0) * seq_grad_scale).to(tl.float64)
        low = ((rho < 1.0 - eps_low) & (adv < 0)).to(tl.float32) * mf
        high = ((rho > 1.0 + eps_high) & (adv > 0)).to(tl.float32) * mf
        acc_ent += tl.sum(ent, axis=0)
        acc_low += tl.sum(low, axis=0)
        acc_high += tl.sum(high, axis=0)
        acc_region += tl.sum(tl.maximum(low, high), axis=0)
        acc_rho += tl.sum(rho * mf, axis=0)
        max_rho = tl.maximum(max_rho, tl.max(rho * mf, axis=0))
        acc_kl += tl.sum(kl * mf, axis=0).to(tl.float64)
        acc_is += tl.sum(is_w * mf, axis=0)
        acc_cispo += tl.sum(((rho > eps_high) & (adv > 0)).to(tl.float32) * mf, axis=0)
        acc_phi += tl.sum(phi * mf, axis=0)

    # Pass 3 (GSPO, GMPO): d rho_b / d logp_s = rho_b m_s / n_b, shared by every token of the sequence
    # (GMPO: times the derivative of the token's clipped log-ratio).
    if LEVEL == LEVEL_SEQUENCE:
        scale = acc_drho.to(tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + lanes
            inb = offs < end
            m = (tl.load(mask_ptr + offs, mask=inb, other=0) != 0) & inb
            through_mean = tl.zeros((BLOCK_T,), tl.float32) + scale
            if PG_KIND == PG_GEO_MEAN:  # times the derivative of each token's clipped log-ratio
                inb, m, logp, old = _load_tokens(mask_ptr, logp_ptr, old_ptr, offs, end, ON_POLICY)
                _, d_clipped = geo_mean_log_ratio(
                    logp - old, _token_advantages(adv_ptr, offs, m, adv_seq, ADV_PER_TOKEN, BLOCK_T), eps_low, eps_high)
                through_mean = through_mean * d_clipped
            g = tl.load(g_logp_ptr + offs, mask=inb, other=0.0)
            tl.store(g_logp_ptr + offs, tl.where(m, g + through_mean, 0.0), mask=inb)

    # Add this pass's sums to the sequence's partials (the ratio max: keep the larger).
    # (b again from the program id, for the same reason: not a value kept across the loops)
    part = part_ptr + (seq_lo + tl.program_id(0).to(tl.int64)) * NUM_SLOTS
    tl.store(part + SLOT_LOSS, tl.load(part + SLOT_LOSS) + acc_loss.to(tl.float32))
    tl.store(part + SLOT_COUNT, tl.load(part + SLOT_COUNT) + n_tok)
    tl.store(part + SLOT_ENTROPY, tl.load(part + SLOT_ENTROPY) + acc_ent)
    tl.store(part + SLOT_LOW, tl.load(part + SLOT_LOW) + acc_low)
    tl.store(part + SLOT_HIGH, tl.load(part + SLOT_HIGH) + acc_high)
    tl.store(part + SLOT_REGION, tl.load(part + SLOT_REGION) + acc_region)
    tl.store(part + SLOT_RATIO_SUM, tl.load(part + SLOT_RATIO_SUM) + acc_rho)
    tl.store(part + SLOT_RATIO_MAX, tl.maximum(tl.load(part + SLOT_RATIO_MAX), max_rho))
    tl.store(part + SLOT_KL, tl.load(part + SLOT_KL) + acc_kl.to(tl.float32))
    tl.store(part + SLOT_IS, tl.load(part + SLOT_IS) + acc_is)
    tl.store(part + SLOT_CISPO_CLIP, tl.load(part + SLOT_CISPO_CLIP) + acc_cispo)
    # TRL's vespo/phi_seq_mean: one φ per sequence (per-sequence advantages), else a token mean.
    # VESPO couples tokens, so its sequences come whole, in exactly one pass.
    if ADV_PER_TOKEN:
        tl.store(part + SLOT_VESPO_PHI, tl.load(part + SLOT_VESPO_PHI) + acc_phi)
    elif VESPO:
        phi_seq = vespo_phi(vespo_log_w, adv_seq, k_pos, lam_pos, k_neg, lam_neg)
        tl.store(part + SLOT_VESPO_PHI, tl.load(part + SLOT_VESPO_PHI) + phi_seq)


def objective_pass(prep: io.PreparedObjective, params: LossParams, rows, seqs):
    """Fill prep's outputs for rows [rows) of sequences [seqs) (see objective_inputs)."""
    (row_lo, row_hi), (seq_lo, seq_hi) = rows, seqs
    if seq_hi <= seq_lo:
        return
    n = prep.logp.numel()
    block_t = block_t_for((row_hi - row_lo) // (seq_hi - seq_lo))
    absent = prep.logp  # any valid pointer for an absent optional buffer: the constexprs skip its loads
    buffers = [absent if t is None else t for t in prep.buffers()]
    buffers[_KEEP_ENTROPY] = prep.mask if prep.keep_entropy is None else prep.keep_entropy  # uint8, like keep_entropy
    _grpo_objective_kernel[(seq_hi - seq_lo,)](
        *buffers, _params_buffer(params.floats, prep.logp.device), row_lo, min(row_hi, n), seq_lo,
        PG_KIND=params.pg, LEVEL=params.level, KL_KIND=params.kl, IS_MODE=params.is_mode, AGG=params.agg,
        ADV_PER_TOKEN=prep.adv_per_token, ON_POLICY=prep.old is None, HAS_SAMPLING=prep.sampling is not None,
        HAS_DELTA=bool(params.has_delta), HAS_DUAL=bool(params.has_dual), HAS_KL_CLAMP=bool(params.has_kl_clamp),
        BIAS_CORR=bool(params.bias_corr), HAS_OFF_POLICY=bool(params.has_off_policy),
        HAS_TOKEN_WEIGHTS=prep.token_weights is not None, WEIGHTS_PER_SEQ=prep.weights_per_seq,
        HAS_ENT_MASK=prep.keep_entropy is not None, HAS_ENT_BONUS=params.entropy_coef != 0.0,
        BLOCK_T=block_t, num_warps=OBJECTIVE_WARPS,
    )


# Tokens one program walks per block. A sequence's length is not known on the host, so the block
# follows the pass's rows per sequence on average (a host-known bound), rounded up to one of a few
# fixed sizes: each BLOCK_T is a separate compiled kernel, and a size per batch shape would compile
# a new variant for nearly every new batch. tests/test_kernels_sm90.py compiles every bucket for
# sm_90 and sm_100 and checks that none spills. Measured with triton 3.9 (benchmarks/results/
# kernels_sm90.md), other sizes spilled a few bytes in one variant or more whatever the warps: 256
# on 4 warps, 1024 on 8 or 16, 2048 on 8 (up to 181 registers) or 16 (a thread capped at 128
# registers: 64K per SM / 512 threads). One program walks a whole sequence, so a larger block buys
# little: a 16k-token sequence is 32 blocks of 512.
BLOCK_T_BUCKETS = (128, 512)
_TRITON_VERSION = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:2])
# Warps per sequence block, by compiler: every variant compiled for sm_90 and sm_100 with 4 and
# with 8 warps (benchmarks.kernel_resources), the choice with no stack frame anywhere. Triton 3.9
# runs ptxas with --regAllocOptLevel=2 (its workaround of a ptxas 13 bug), which on 4 warps kept
# a value of two BLOCK_T = 512 variants in an 8-byte stack frame on sm_100, and none on 8; triton
# 3.6 (the GPU machine's, ptxas 12.8) and 3.2 are the other way round (8 warps: 2 and 1 variants
# with a frame; 4 warps: none). kernels_triton_versions.csv keeps each version's result with the
# choice made, not the other. Untested tritons between take 4. Neither choice is timed on a GPU.
OBJECTIVE_WARPS = 8 if _TRITON_VERSION >= (3, 9) else 4


def block_t_for(tokens_per_sequence: int) -> int:
    """The smallest bucket that holds `tokens_per_sequence` tokens, else the largest."""
    return next((b for b in BLOCK_T_BUCKETS if tokens_per_sequence <= b), BLOCK_T_BUCKETS[-1])


@functools.lru_cache(maxsize=64)
def _params_buffer(floats: tuple, device: torch.device) -> torch.Tensor:
    """LossParams' floats as the float32 buffer the kernel loads them from: made once per set of
    values and device (before any CUDA-graph capture that replays the same loss)."""
    assert len(floats) == len(LOSS_FLOAT_FIELDS)
    return torch.tensor(floats, dtype=torch.float32, device=device)
