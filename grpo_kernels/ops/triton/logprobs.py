"""Triton kernels: per-token log-prob, entropy and Σπ² over the (possibly truncated) vocabulary,
and its backward. One program per row; the contract is ops/contract.py.

z' is the transformed logit (grpo_kernels/transform.py): scale·z, or cap·tanh(scale·z) with a
softcap; −inf stays −inf. The kept set of a row is K = {v : z_v >= threshold} ∪ {y}, the
threshold in raw logit units (docs/math.md, "Truncated sampling").

Statistics over K, one sweep with an online log-sum-exp (relative to the running max m, so no
cancellation when the logits are large):
    s   Σ exp(z' − m)             lse = m + log s
    t   Σ exp(z' − m) · (z' − m)  H   = log s − t/s
    q   Σ exp(2 (z' − m))         Σπ² = q / s²   (each rescaled when m grows)
Backward, one sweep:
    dz = [g_logp (1[v=y] − p) − g_H p (z' − E_p[z'])] · dz'/dz,  p = exp(z' − lse) on K, 0 outside
Rows whose upstream gradients are both 0 (masked tokens) write zeros without reading logits.
Logits are (B, T, V) with any batch and time strides (a `logits[:, :-1]` slice is read in
place, never copied); row r is (r // T, r % T). Packed (N, V) logits are (1, N, V).

Forward modes (constexpr MODE):
    0 no truncation: one sweep over the row (V·s bytes read for s-byte logits, 5 floats written).
    1 threshold given (vocabulary-parallel path): one sweep, entries below it masked out.
    2 search: the threshold is found per row without sorting, by a multi-pivot select over
      order-preserving int32 keys of the raw logits (the fp32 bits made monotone, −0 as +0; bf16
      and fp16 keys are those bits shifted right by 16 and 13: a 16-bit key space).
      pass 1 (HBM)  m, s over the row (as mode 0, without t and q) and the largest logit of each
                    of KB = 512 position classes (v mod KB, one max per entry): those are KB
                    distinct entries of the row, so the k-th largest of them (a pivot select on
                    the KB keys in registers, k <= KB) is a lower bound of the top-k threshold.
      pass 2 (L2)   candidates: the entries the bounds cannot rule out, copied raw, in order (an
                    in-tile prefix sum gives each its slot), into a per-row scratch of CAPACITY
                    = 2048 entries:
                      min_p   z' >= M + log min_p                               (exact)
                      top_k   key >= the bound of pass 1
                      top_p   z' >= M + log((1 − top_p)·Z/V) − 0.01, top_k off: the entries below
                              hold less than (1 − top_p)·Z together (Z the mass of the remainder,
                              Z = s without min_p, Z >= 1 = the max's share with it), so none is kept.
                    More candidates than CAPACITY (a flat row, top_k > KB with top_p): the
                    selects read the whole row instead (correct, several times slower).
      select        per search, a bracket [lo, hi) of keys holding the answer; each pass over
                    the candidates evaluates NPIV = 16 pivots at once (pivot 0 = lo, 15 splitting
                    the bracket): over the entries of K1 = {z' >= M + log min_p} at or above
                    each pivot, the count (min_p alone, top_k: k = min(top_k, |K1|)) or the mass
                    Σ exp(z' − M) (top_p: target top_p·Z2), with the smallest key at or above
                    and the largest key below each pivot. The answer is the largest key whose
                    count/mass reaches the target; the new bracket runs from the last pivot
                    that reaches it to the first that does not, both moved onto keys present,
                    so the answer is always an exact logit of the row (ties are kept or dropped
                    together) and a bracket holding one present key is done. Passes: at most
                    5 (16-bit keys) or 9 (fp32) per search, fewer as the candidates are few;
                    min_p/top_k (by count, also giving Z2) before top_p (by mass).
      pass 3        the statistics over K from the candidates (K ⊆ candidates), plus y.
    Bytes per row in mode 2: V·s from HBM, V·s again from L2 (the row was just read), C·s
    written and read about (passes + 1) times for C <= CAPACITY candidates, so about 2·V·s when
    C << V. Scratch: N × min(CAPACITY, V) entries of the logits' dtype, only while searching.
    The plain pass is ~8 ops per entry; pass 2 ~6 (and an exp for min_p with top_p, top_k off,
    whose Z is the mass of K1 over the row), its prefix sum and stores skipped in tiles without a
    candidate. Which of top_k / top_p / min_p is on is a runtime branch, uniform per row, not a
    constexpr (kernel comment). Registers (sm_90, every variant compiled with triton 3.9,
    benchmarks/results/kernels_sm90.md): mode 0/1 24-48, mode 2 98-101 (16 warps at the largest
    tile), backward 26-114, no spills.
    Not yet timed on a GPU (target: <= 1.5x mode 0 at V = 151936 bf16). By the counts above,
    pass 1 is mode 0 with one max more per entry, pass 2 a cheaper re-read from L2, and the
    selects cost (C/V)·16·passes of a sweep, so ~1.5-2x when C is a few hundred; a flat row
    (C > CAPACITY) costs several sweeps.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...transform import KernelTransform
from ...truncation import NO_TRUNCATION, Truncation

MAX_BLOCK_V = 4096
# Pass 1's position classes for the top-k bound (k above it: no top-k pruning).
TOP_K_CLASSES = 512  # 1024 spilt 12 bytes on sm_90 (top_k alone, 80 registers)
# Candidates kept per row (scratch: N × CAPACITY entries of the logits' dtype, only while searching).
SEARCH_CAPACITY = 2048
PIVOTS = 16  # pivots per select pass: pivot 0 is the bracket's low end, 15 split it
SELECT_BLOCK = 512
# Relative margin (in log units) of the top-p candidate bound against fp32 rounding of the sums.
TOP_P_BOUND_MARGIN = 0.01
# Bits dropped from the fp32 key: those the narrower float formats never set.
_KEY_SHIFT = {torch.bfloat16: 16, torch.float16: 13}


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _transform(z, scale, cap, HAS_CAP: tl.constexpr):
    """z' = scale·z, or cap·tanh(scale·z) (tanh as 2σ(2x) − 1, as TRL's kernel), −inf kept."""
    if HAS_CAP:
        # |2x| <= 40 already saturates tanh in fp32; the clamp keeps exp(-2x) from overflowing.
        x2 = tl.minimum(tl.maximum(2.0 * scale * z, -40.0), 40.0)
        return tl.where(z == float("-inf"), z, cap * (2.0 * tl.sigmoid(x2) - 1.0))
    return z * scale


@triton.jit
def _softcap_grad(z_prime, scale, cap):
    """dz'/dz of z' = cap·tanh(scale·z), from z' itself (scale alone without a softcap)."""
    t = z_prime / cap
    return tl.where(z_prime == float("-inf"), 0.0, cap * scale * (1.0 - t * t))


@triton.jit
def _key(x, KEY_SHIFT: tl.constexpr):
    """Order-preserving int32 key of fp32 values x (exact values of the input logits): equal values
    have equal keys (−0 is +0), x < x' iff key < key'. KEY_SHIFT drops the low bits that bf16 (16)
    or fp16 (13) values never set, so their keys span 16 bits."""
    u = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    return (u ^ ((u >> 31) & 0x7FFFFFFF)) >> KEY_SHIFT


@triton.jit
def _key_value(key, KEY_SHIFT: tl.constexpr):
    """The fp32 value whose key is `key` (inverse of _key on the values it produces)."""
    low = (1 << KEY_SHIFT) - 1
    k = (key << KEY_SHIFT) | tl.where(key < 0, low, 0)
    return (k ^ ((k >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _rescaled(m, s, t, q, m_new, m_ref, sum_e, sum_ed, sum_ee, WITH_ENTROPY: tl.constexpr,
              WITH_SUM_PI_SQ: tl.constexpr):
    """The state (m, s, t, q) moved to the max m_new (m_ref: m_new, or 0 while it is −inf) with the
    new entries' Σe, Σe·d, Σe² (relative to m_ref) added."""
    rescale = tl.exp(m - m_ref)
    if WITH_ENTROPY:
        # Operands are masked before multiplying (never 0·inf): no NaN is formed, even in dead lanes.
        m_safe = tl.where(s > 0, m, m_ref)
        t = tl.where(s > 0, rescale * (t + s * (m_safe - m_ref)), 0.0) + sum_ed
    if WITH_SUM_PI_SQ:
        q = q * rescale * rescale + sum_ee
    return m_new, s * rescale + sum_e, t, q


@triton.jit
def _absorb(m, s, t, q, z, WITH_ENTROPY: tl.constexpr, WITH_SUM_PI_SQ: tl.constexpr):
    """Online (m, s, t, q) after the entries z (a tile; −inf entries contribute nothing)."""
    m_new = tl.maximum(m, tl.max(z, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: avoid −inf − −inf
    d = z - m_ref
    e = tl.exp(d)
    sum_ed = 0.0
    sum_ee = 0.0
    if WITH_ENTROPY:
        sum_ed = tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
    if WITH_SUM_PI_SQ:
        sum_ee = tl.sum(e * e, axis=0)
    return _rescaled(m, s, t, q, m_new, m_ref, tl.sum(e, axis=0), sum_ed, sum_ee, WITH_ENTROPY, WITH_SUM_PI_SQ)


@triton.jit
def _absorb_one(m, s, t, q, z, WITH_ENTROPY: tl.constexpr, WITH_SUM_PI_SQ: tl.constexpr):
    """_absorb for one entry z (a scalar; −inf adds nothing)."""
    m_new = tl.maximum(m, z)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    e = tl.exp(z - m_ref)
    return _rescaled(m, s, t, q, m_new, m_ref, e, e * tl.where(e > 0, z - m_ref, 0.0), e * e,
                     WITH_ENTROPY, WITH_SUM_PI_SQ)


@triton.jit
def _kept_stats(src, n, threshold, scale, cap, MASKED: tl.constexpr, HAS_CAP: tl.constexpr,
                WITH_ENTROPY: tl.constexpr, WITH_SUM_PI_SQ: tl.constexpr, BLOCK: tl.constexpr):
    """Online (m, s, t, q) of z' over src[0:n] (raw logits), only entries >= threshold when MASKED."""
    cols = tl.arange(0, BLOCK)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    q = tl.zeros((), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + cols
        x = tl.load(src + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
        z = _transform(x, scale, cap, HAS_CAP)
        if MASKED:
            z = tl.where((x >= threshold) | (x != x), z, float("-inf"))  # a NaN logit stays in K: it must reach lse
        m, s, t, q = _absorb(m, s, t, q, z, WITH_ENTROPY, WITH_SUM_PI_SQ)
    return m, s, t, q


@triton.jit
def _pivot_stats(key, live, pivots):
    """For each pivot key c (pivots (NPIV,)) over the live entries of a tile: which are at or above
    c (NPIV, BLOCK), their count, the smallest key at or above c and the largest key below c."""
    above = (key[None, :] >= pivots[:, None]) & live[None, :]
    count = tl.sum(above.to(tl.int32), axis=1)
    above_min = tl.min(tl.where(above, key[None, :], 2147483647), axis=1)
    below_max = tl.max(tl.where(live[None, :] & ~above, key[None, :], -2147483648), axis=1)
    return above, count, above_min, below_max


@triton.jit
def _pivots(lo, hi, NPIV: tl.constexpr):
    """Pivot 0 = lo; pivots 1..NPIV−1 split (lo, hi) evenly (every key of it when it has < NPIV)."""
    j = tl.arange(0, NPIV).to(tl.int64)
    inner = lo + 1 + ((hi - lo - 1) * tl.maximum(j - 1, 0)) // (NPIV - 1)
    return tl.where(j == 0, lo, inner).to(tl.int32)


@triton.jit
def _narrow(lo, hi, reached, mass, above_min, below_max, NPIV: tl.constexpr):
    """The bracket [lo, hi) after one pass: from the last pivot that reached the target (pivot 0, lo,
    always does) to the first that did not, both moved onto keys present (the answer is one of
    them: the count and mass change only at present keys). Returns lo, hi and the mass at lo."""
    j = tl.arange(0, NPIV)
    reached = reached | (j == 0)
    a = tl.max(tl.where(reached, j, 0), axis=0)
    b = tl.min(tl.where(reached, NPIV, j), axis=0)
    new_lo = tl.minimum(tl.sum(tl.where(j == a, above_min, 0).to(tl.int64), axis=0), hi - 1)
    new_hi = tl.where(b < NPIV, tl.sum(tl.where(j == b, below_max, 0).to(tl.int64), axis=0) + 1, hi)
    return new_lo, tl.maximum(new_hi, new_lo + 1), tl.sum(tl.where(j == a, mass, 0.0), axis=0)


@triton.jit
def _kth_largest(keys, k, lo, hi, NPIV: tl.constexpr):
    """The k-th largest of `keys` (a register vector, all in [lo, hi), k <= its size), by pivots."""
    while hi - lo > 1:
        pivots = _pivots(lo, hi, NPIV)
        _, count, above_min, below_max = _pivot_stats(keys, keys == keys, pivots)
        lo, hi, _ = _narrow(lo, hi, count >= k, tl.zeros((NPIV,), tl.float32), above_min, below_max, NPIV)
    return lo


@triton.jit
def _select(src, n, lo, hi, target, m_ref, min_p_bound, scale, cap, has_min_p, with_mass, IS_COUNT: tl.constexpr,
            HAS_CAP: tl.constexpr, KEY_SHIFT: tl.constexpr, NPIV: tl.constexpr, BLOCK: tl.constexpr):
    """The largest key c in [lo, hi) whose count (IS_COUNT; target capped at the count at lo, the
    size of K1 ∩ src) or mass Σ exp(z' − m_ref) (else) over the entries of src[0:n] in K1
    (z' >= min_p_bound when has_min_p, else every entry) at or above c reaches `target`, and the
    mass at that key (computed when with_mass, or not IS_COUNT). has_min_p and with_mass are
    runtime flags (or constants): z' and the exponentials are formed only where they are read.
    Invariants: lo reaches the target, hi does not (hi − 1 is the row's largest key).
    Tiles without an entry at or above lo skip the pivot work."""
    cols = tl.arange(0, BLOCK)
    j = tl.arange(0, NPIV)
    target = tl.zeros((), tl.float32) + target
    lo_mass = tl.zeros((), tl.float32)
    while hi - lo > 1:
        pivots = _pivots(lo, hi, NPIV)
        count = tl.zeros((NPIV,), tl.int32)
        mass = tl.zeros((NPIV,), tl.float32)
        above_min = tl.full((NPIV,), 2147483647, tl.int32)
        below_max = tl.full((NPIV,), -2147483648, tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + cols
            x = tl.load(src + offs, mask=offs < n, other=float("-inf")).to(tl.float32)
            key = _key(x, KEY_SHIFT)
            live = (offs < n) & (key >= lo)
            if has_min_p:
                live = live & (_transform(x, scale, cap, HAS_CAP) >= min_p_bound)
            if tl.max(live.to(tl.int32), axis=0) > 0:
                above, c, a, b = _pivot_stats(key, live, pivots)
                if with_mass:
                    e = tl.exp(_transform(x, scale, cap, HAS_CAP) - m_ref)
                    mass += tl.sum(tl.where(above, e[None, :], 0.0), axis=1)
                count += c
                above_min = tl.minimum(above_min, a)
                below_max = tl.maximum(below_max, b)
        if IS_COUNT:
            target = tl.minimum(target, tl.max(tl.where(j == 0, count, 0), axis=0).to(tl.float32))
            reached = count.to(tl.float32) >= target
        else:
            reached = mass >= target
        lo, hi, lo_mass = _narrow(lo, hi, reached, mass, above_min, below_max, NPIV)
    return lo, lo_mass


# The truncation settings are runtime values, not constexprs: which of top_k / top_p / min_p is on
# is read from them (top_k 0, top_p 1, log_min_p −inf: off), so one compiled search serves all seven
# combinations (7x fewer variants to compile on first use and in the sm_90 compile test; the
# branches they select are uniform per row). Unspecialised, so top_k = 1 or a multiple of 16 does
# not compile a variant of its own either.
@triton.jit(do_not_specialize=("top_k", "capacity"))
def _logprobs_fwd_kernel(
    logits_ptr, ids_ptr, logp_ptr, entropy_ptr, lse_ptr, threshold_in_ptr, threshold_ptr, sum_pi_sq_ptr,
    scratch_ptr, stride_b, stride_t, T, V, scale, cap, top_k, top_p, log_min_p, log_tail, capacity,
    MODE: tl.constexpr, WITH_ENTROPY: tl.constexpr, WITH_SUM_PI_SQ: tl.constexpr, HAS_CAP: tl.constexpr,
    KEY_SHIFT: tl.constexpr, BLOCK_V: tl.constexpr, KB: tl.constexpr, NPIV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    target = tl.load(ids_ptr + row).to(tl.int64)
    # An id outside [0, V): the target is in another rank's vocabulary slice, not in this K.
    in_slice = (target >= 0) & (target < V)
    x_target = tl.load(base + tl.where(in_slice, target, 0), mask=in_slice, other=float("-inf")).to(tl.float32)
    z_target = _transform(x_target, scale, cap, HAS_CAP)
    if MODE == 0:
        threshold = tl.full((), float("-inf"), tl.float32)
        m, s, t, q = _kept_stats(base, V, threshold, scale, cap, False, HAS_CAP, WITH_ENTROPY, WITH_SUM_PI_SQ, BLOCK_V)
    else:
        if MODE == 1:
            threshold = tl.load(threshold_in_ptr + row).to(tl.float32)
            src = base
            n = V
        else:
            # Pass 1: M, s (the mass of the row relative to M) and the largest logit of each position
            # class (a float max per entry: keys are formed for the KB class maxima only).
            offs2 = tl.arange(0, BLOCK_V // KB)[:, None] * KB + tl.arange(0, KB)[None, :]
            key_lowest = _key(tl.full((), float("-inf"), tl.float32), KEY_SHIFT)
            class_max = tl.full((KB,), float("-inf"), tl.float32)
            m = tl.full((), float("-inf"), tl.float32)
            s = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + offs2
                x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                # NaN logits: out of the maxima (the search skips them), into s (so row_nan below)
                nan = x != x
                x = tl.where(nan, float("-inf"), x)
                class_max = tl.maximum(class_max, tl.max(x, axis=0))
                z = _transform(x, scale, cap, HAS_CAP)
                m_new = tl.maximum(m, tl.max(tl.max(z, axis=1), axis=0))
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                e = tl.exp(z - m_ref) + tl.where(nan, float("nan"), 0.0)
                s = s * tl.exp(m - m_ref) + tl.sum(tl.sum(e, axis=1), axis=0)
                m = m_new
            row_nan = s != s  # a NaN logit: the search skips it, the outputs must still be NaN
            m_ref = tl.where(m == float("-inf"), 0.0, m)
            key_max = _key(tl.max(class_max, axis=0), KEY_SHIFT)
            min_p_bound = m + log_min_p  # −inf when min_p is off (log_min_p = −inf) or the row is all −inf
            has_top_k = top_k > 0
            has_top_p = top_p < 1.0
            has_min_p = log_min_p > float("-inf")
            # min_p and top_p, top_k off: top-p's Z is the mass of K1 over the whole row, in pass 2
            mass_of_k1 = has_min_p & has_top_p & (top_k == 0)
            # Pass 2: candidates into the row's scratch (bounds in the header).
            key_bound = key_lowest
            if (top_k > 0) & (top_k <= KB):
                key_bound = _kth_largest(_key(class_max, KEY_SHIFT), top_k, key_lowest.to(tl.int64),
                                         key_max.to(tl.int64) + 1, NPIV).to(tl.int32)
            z_bound = min_p_bound
            if has_top_p & (top_k == 0):
                # Z >= 1 with min_p (the max's share); s >= 1 without it unless the row is all −inf
                log_z = tl.where(has_min_p, 0.0, tl.log(tl.maximum(s, 1.0)))
                z_bound = tl.maximum(z_bound, m + log_z + log_tail)
            scratch = scratch_ptr + row * capacity
            cols = tl.arange(0, BLOCK_V)
            n_cand = tl.zeros((), tl.int32)
            mass_k1 = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                raw = tl.load(base + offs, mask=offs < V, other=float("-inf"))
                x = raw.to(tl.float32)
                z = _transform(x, scale, cap, HAS_CAP)
                cand = (offs < V) & (z >= z_bound)
                if has_top_k:
                    cand = cand & (_key(x, KEY_SHIFT) >= key_bound)
                if mass_of_k1:  # Z of top-p: the mass of K1 over the whole row
                    mass_k1 += tl.sum(tl.where(z >= min_p_bound, tl.exp(z - m_ref), 0.0), axis=0)
                n_tile = tl.sum(cand.to(tl.int32), axis=0)
                if n_tile > 0:
                    slot = n_cand + tl.cumsum(cand.to(tl.int32), axis=0) - 1
                    tl.store(scratch + slot, raw, mask=cand & (slot < capacity))
                n_cand += n_tile
            tl.debug_barrier()  # the scratch written by every thread is read by every thread below
            if n_cand <= capacity:
                src = scratch
                n = n_cand
            else:  # too many candidates: select over the whole row
                src = base
                n = n_cand * 0 + V  # a tensor like n_cand even where V is specialised to the constant 1
            # Select: min_p / top_k by count, then top_p by mass.
            lo = key_lowest.to(tl.int64)
            hi = key_max.to(tl.int64) + 1
            mass_k2 = tl.where(has_min_p, mass_k1, s)
            if has_top_k | (top_p >= 1.0):
                k_target = tl.where(has_top_k, top_k, V).to(tl.float32)
                lo, mass_k2 = _select(src, n, lo, hi, k_target, m_ref, min_p_bound, scale, cap, has_min_p, has_top_p,
                                      True, HAS_CAP, KEY_SHIFT, NPIV, BLOCK_S)
            if has_top_p:
                lo, _ = _select(src, n, lo, hi, top_p * mass_k2, m_ref, min_p_bound, scale, cap, has_min_p, 1, False,
                                HAS_CAP, KEY_SHIFT, NPIV, BLOCK_S)
            threshold = _key_value(lo.to(tl.int32), KEY_SHIFT)
        # Statistics over K: src holds every entry >= threshold; y is added when it is below.
        m, s, t, q = _kept_stats(src, n, threshold, scale, cap, True, HAS_CAP, WITH_ENTROPY, WITH_SUM_PI_SQ, BLOCK_V)
        m, s, t, q = _absorb_one(m, s, t, q, tl.where(x_target < threshold, z_target, float("-inf")),
                                 WITH_ENTROPY, WITH_SUM_PI_SQ)
        if MODE == 2:
            s = tl.where(row_nan, float("nan"), s)
    # s = 0: nothing finite in K (no log 0 or 0/0 is formed). `!= 0`, not `> 0`: a NaN logit makes s
    # NaN, which must reach the outputs (the deferred NaN check reads them), not pass for an empty K.
    nonempty = s != 0.0
    s_safe = tl.where(nonempty, s, 1.0)
    log_s = tl.log(s_safe)
    lse = tl.where(nonempty, m + log_s, float("-inf"))
    # −inf for a −inf target or one in another slice (never −inf − −inf when K has nothing finite)
    tl.store(logp_ptr + row, tl.where(z_target == float("-inf"), float("-inf"),
                                           z_target - tl.where(nonempty, lse, 0.0)))
    tl.store(lse_ptr + row, lse)
    tl.store(threshold_ptr + row, threshold)
    # The contract (ops/contract.py): zeros when not computed, and for a row with nothing in K.
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(nonempty, log_s - t / s_safe, 0.0))
    else:
        tl.store(entropy_ptr + row, 0.0)
    if WITH_SUM_PI_SQ:
        tl.store(sum_pi_sq_ptr + row, tl.where(nonempty, q / (s_safe * s_safe), 0.0))
    else:
        tl.store(sum_pi_sq_ptr + row, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, ids_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, threshold_ptr, out_ptr,
    stride_b, stride_t, out_stride_b, out_stride_t, T, V, scale, cap,
    HAS_GRAD_ENTROPY: tl.constexpr, HAS_THRESHOLD: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    base = logits_ptr + b * stride_b + t * stride_t
    out = out_ptr + b * out_stride_b + t * out_stride_t
    cols = tl.arange(0, BLOCK_V)
    g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    g_ent = tl.zeros((), tl.float32)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
    if (g_logp == 0.0) & (g_ent == 0.0):
        zero = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out + offs, zero.to(out_ptr.dtype.element_ty), mask=offs < V)
    else:
        lse = tl.load(lse_ptr + row)
        lse = tl.where(lse == float("-inf"), 0.0, lse)  # nothing finite in K: every p is 0 (never −inf − −inf)
        h = tl.load(entropy_ptr + row)  # z' − E[z'] = (z' − lse) + H: no cancellation with large logits
        target = tl.load(ids_ptr + row).to(tl.int64)
        threshold = tl.full((), float("-inf"), tl.float32)
        if HAS_THRESHOLD:
            threshold = tl.load(threshold_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            z = _transform(x, scale, cap, HAS_CAP)
            d = z - lse
            p = tl.exp(d)
            if HAS_THRESHOLD:  # p = 0 outside K: an exact zero gradient there
                p = tl.where((x >= threshold) | (offs == target), p, 0.0)
            grad = tl.where(offs == target, g_logp, 0.0) - g_logp * p
            if HAS_GRAD_ENTROPY:
                grad -= g_ent * p * tl.where(p > 0, d + h, 0.0)
            if HAS_CAP:  # (two branches, not one helper returning a tensor or a scalar: triton 3.2 refuses that)
                grad = grad * _softcap_grad(z, scale, cap)
            else:
                grad = grad * scale
            tl.store(out + offs, grad.to(out_ptr.dtype.element_ty), mask=offs < V)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def _forward_mode(truncation: Truncation, threshold) -> int:
    """0: full vocabulary, 1: the given threshold, 2: search the threshold (the kernel's MODE)."""
    if threshold is not None:
        return 1
    return 2 if truncation.active else 0


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, transform: KernelTransform, with_entropy: bool = True,
                     truncation: Truncation = NO_TRUNCATION, threshold=None, with_sum_pi_sq: bool = False):
    """logits (B, T, V) or (N, V) with unit vocabulary stride, ids (N,) ->
    (logp, entropy, lse, threshold, sum_pi_sq), each (N,) fp32 (ops/contract.py).

    threshold (N,) fp32 given: used as is (no search). Else, with truncation.active, found per
    row (header); −inf when off. Without `with_entropy` / `with_sum_pi_sq` those outputs are zeros.
    """
    logits = _as_3d(logits)
    _, t, vocab = logits.shape
    n = ids.numel()
    device = logits.device
    logp = torch.empty(n, dtype=torch.float32, device=device)
    entropy, lse, threshold_out, sum_pi_sq = (torch.empty_like(logp) for _ in range(4))
    if n == 0:
        return logp, entropy, lse, threshold_out, sum_pi_sq
    mode = _forward_mode(truncation, threshold)
    block = _block_v(vocab)
    block_select = min(SELECT_BLOCK, block)
    has_top_k = mode == 2 and 0 < truncation.top_k < vocab  # k >= V keeps everything
    has_top_p = mode == 2 and truncation.top_p < 1.0
    has_min_p = mode == 2 and truncation.min_p > 0.0
    if mode == 2 and not (has_top_k or has_top_p or has_min_p):
        mode = 0  # only top_k >= V was asked: nothing is truncated
    capacity = min(SEARCH_CAPACITY, vocab)
    scratch = torch.empty((n, capacity) if mode == 2 else (1,), dtype=logits.dtype, device=device)
    # Top-p candidate bound: log((1 − top_p)/V) less the margin (header); unused otherwise.
    log_tail = math.log((1.0 - truncation.top_p) / vocab) - TOP_P_BOUND_MARGIN if has_top_p else 0.0
    scale, cap = transform
    _logprobs_fwd_kernel[(n,)](
        logits, ids, logp, entropy, lse, threshold if mode == 1 else logp, threshold_out, sum_pi_sq, scratch,
        logits.stride(0), logits.stride(1), t, vocab, scale, cap,
        int(truncation.top_k) if has_top_k else 0, float(truncation.top_p) if has_top_p else 1.0,
        truncation.log_min_p if has_min_p else float("-inf"), log_tail, capacity,
        MODE=mode, WITH_ENTROPY=with_entropy, WITH_SUM_PI_SQ=with_sum_pi_sq, HAS_CAP=cap != 0.0,
        KEY_SHIFT=_KEY_SHIFT.get(logits.dtype, 0),
        BLOCK_V=block, KB=min(TOP_K_CLASSES, block), NPIV=PIVOTS, BLOCK_S=block_select,
        # The truncated modes at the largest tile: 16 warps. With 8, ptxas left an 8-byte stack frame
        # in mode 1 with a softcap, and capped mode 2 at 128 registers with a 48-byte spill for fp32
        # logits under triton 3.6 (the GPU machine's; compiled with benchmarks.kernel_resources, the
        # 8-warp rows not kept); on 16 warps mode 2 needs 98-101 registers under 3.9
        # (kernels_sm90.csv), spills under neither 3.9 nor 3.6 (kernels_triton_versions.csv), and
        # still fills 16 warps an SM.
        num_warps=16 if mode != 0 and block >= MAX_BLOCK_V else _num_warps(block),
    )
    return logp, entropy, lse, threshold_out, sum_pi_sq


def logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, transform: KernelTransform, out,
                      threshold=None):
    """Write dL/dlogits into `out` (logits' shape; may be `logits` itself for the in-place variant).
    threshold (N,) fp32: the kept set's bound from the forward (None: every entry kept)."""
    logits, out3 = _as_3d(logits), _as_3d(out)
    _, t, vocab = logits.shape
    n = ids.numel()
    if n == 0:
        return out
    block = _block_v(vocab)
    has_grad_entropy = grad_entropy is not None
    scale, cap = transform
    _logprobs_bwd_kernel[(n,)](
        logits, ids, lse, entropy, grad_logp, grad_entropy if has_grad_entropy else grad_logp,
        threshold if threshold is not None else lse, out3,
        logits.stride(0), logits.stride(1), out3.stride(0), out3.stride(1), t, vocab, scale, cap,
        HAS_GRAD_ENTROPY=has_grad_entropy, HAS_THRESHOLD=threshold is not None, HAS_CAP=cap != 0.0,
        BLOCK_V=block, num_warps=_num_warps(block),
    )
    return out
