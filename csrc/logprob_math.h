// The per-row math of the log-prob/entropy op (docs/math.md, "One token") as GK_HD inline
// functions: the single C++ source of it, used by csrc/cpu/logprobs.cpp and csrc/cuda/logprobs.cu.
// Those files keep only their loops and parallel structure (vectorised vocabulary blocks on the
// CPU, a thread block per row on the GPU); every formula the loops evaluate is here.
//
// Forward, over the transformed logits z' of a row (grpo_math.h, transform_logit):
//   lse = m + log s,  logp = z'_y − lse,  H = lse − E_p z' = log s − t/s,
// with m a reference point (the max), s = Σ e^(z'−m) and t = Σ e^(z'−m)·(z'−m).
// Backward, per element, with p_v = e^(z'_v − lse):
//   dL/dz_v = [g_logp·(1[v=y] − p_v) − g_H·p_v·(z'_v − E_p z')] · dz'/dz.
// A −inf logit has p = 0 and contributes exactly 0 everywhere (never 0·(−inf) = NaN).
//
// Truncated sampling (docs/math.md, "Truncated sampling"): the kept set of a row is
// K = {v : z_v >= threshold} ∪ {y}, threshold a RAW logit value (z -> z' is increasing, so this is
// the same set on z' and compares identically in every backend). The sums above then run over K
// only (kept_term), Σπ² = q/s² with q = Σ_K e^(2(z'−m)), and the backward has p_v = 0 outside K.
// The thresholds are found per row without sorting the vocabulary (csrc/cpu/logprobs.cpp: a
// bucket histogram of z' − max for top_k, passes that test several cutoffs at once for top_p
// alone; csrc/cuda/logprobs.cu: a radix select on the raw logit's bits);
// both use the rules below (min_p_keeps, above_keeps) so they keep the same sets.
#pragma once

#include "grpo_math.h"

namespace gk {

// The exp of the softmax terms. On the CPU exp_fast: branch-free, so the vocabulary loops
// vectorise (it is also exactly 0 below −87.3). In device code the GPU's expf, a few instructions
// where exp_fast's polynomial would add ALU work to a memory-bound kernel.
GK_HD float softmax_exp(float x) {
#ifdef __CUDA_ARCH__
  return expf(x);
#else
  return exp_fast(x);
#endif
}

// One element's share of (s, t) at d = z' − m: e^d and e^d·d. A −inf logit (e^d = 0) adds
// exactly 0 to both: e^d·d would be 0·(−inf) = NaN.
struct SoftmaxTerm {
  float e, ed;
};

// The share of an element with e = e^d that is in the kept set (kept) or not (adds nothing).
GK_HD SoftmaxTerm kept_term(float e, float d, bool kept) {
  const float k = kept ? e : 0.f;
  return {k, k > 0.f ? k * d : 0.f};
}

GK_HD SoftmaxTerm softmax_term(float d) { return kept_term(softmax_exp(d), d, true); }

// Running softmax statistics (m, s, t, q) of a set of transformed logits. t is kept relative to m,
// so that the entropy log s − t/s has no cancellation when the logits are large. m is the max of
// the set (the CPU's fixed-shift loops use the row max, or 0 when that is not finite: the same
// sums about another point). Acc is the type of s and t: the CPU adds its fp32 block sums in
// fp64, which keeps the rounding error ~1e-7 relative even for 256k-entry vocabularies.
// q = Σ e^(2(z'−m)) gives Σπ² = q/s² (#24: the collision probability), rescaled with the max as s is.
// No constructors or member initialisers: CUDA keeps these in __shared__ memory.
template <typename Acc = float>
struct RowStats {
  float m;
  Acc s, t, q;

  static GK_HD RowStats empty() { return {-INFINITY, Acc(0), Acc(0), Acc(0)}; }

  // The same sums about a reference point m2 >= m: e^(m−m2) scales s, c² scales q, and t gains
  // s·(m − m2).
  GK_HD void rebase(float m2) {
    const float c = m == -INFINITY ? 0.f : softmax_exp(m - m2);
    t = s > Acc(0) ? c * (t + s * (m - m2)) : Acc(0);
    s = s * c;
    q = q * (c * c);
    m = m2;
  }

  // Adds one element z' (a single-pass, online update: a new max rebases the sums first).
  GK_HD void update(float z) {
    if (z == -INFINITY) return;
    if (z > m) rebase(z);
    const SoftmaxTerm k = softmax_term(z - m);
    s += k.e;
    t += k.ed;
    q += k.e * k.e;
  }

  // Adds the statistics of a disjoint set: another thread's or warp's (the CUDA block reduction),
  // or another vocabulary block's (the CPU's vectorised partial sums).
  template <typename B>
  GK_HD void merge(RowStats<B> o) {
    const float m2 = m > o.m ? m : o.m;
    if (m2 == -INFINITY) return;  // both empty (all −inf): nothing to add
    rebase(m2);
    o.rebase(m2);
    s += o.s;
    t += o.t;
    q += o.q;
  }
};

struct RowResult {
  float logp, entropy, lse, sum_pi_sq;
};

// logp of the target (transformed logit z_target), the entropy, lse and Σπ² of a row from its
// statistics. A row with nothing to sum (every kept logit −inf) has lse = −inf and H = Σπ² = 0.
template <typename Acc>
GK_HD RowResult finish(const RowStats<Acc>& st, float z_target) {
  const float s = static_cast<float>(st.s), t = static_cast<float>(st.t), q = static_cast<float>(st.q);
  const float lse = st.m + logf(s);
  if (!(s > 0.f)) return {z_target - lse, 0.f, lse, 0.f};
  return {z_target - lse, logf(s) - t / s, lse, q / (s * s)};  // H = log s − E[z' − m]
}

// ------------------------------------------------------------------ truncated sampling
// The settings as kernels take them: top_k (0: off), top_p (1: off), log(min_p) (−inf: off).
struct Truncation {
  int64_t top_k;
  float top_p, log_min_p;

  GK_HD bool active() const { return top_k > 0 || top_p < 1.f || log_min_p > -INFINITY; }
};

// min_p: v is kept while d = z'_v − max z' >= log(min_p) (p_v >= min_p · max p). −inf logits are
// dropped when min_p is on (−inf < log min_p) and kept, with p = 0, when it is off.
GK_HD bool min_p_keeps(float d, float log_min_p) { return d >= log_min_p; }

// top_k and top_p: a value is kept iff what lies strictly above it (the count of larger entries,
// or their probability mass) is below the limit (k, or top_p · Z over the set top_p works on).
// Ties have the same "above", so they are kept or dropped together; the largest value (above = 0)
// always stays.
GK_HD bool above_keeps(double above, double limit) { return above < limit; }

// Whether v (raw logit z, not the target) is in K = {z >= threshold}; threshold −inf keeps all.
// A NaN logit is kept: it makes the row's statistics NaN, which the deferred checks report (a
// NaN compares false with every bound, so the threshold search alone would drop it silently).
GK_HD bool in_kept(float z, float threshold) { return z >= threshold || z != z; }

// An order-preserving unsigned key of a raw logit's storage bits (fp32: 32 bits; bf16/fp16: 16):
// a < b as values iff key(a) < key(b), and −0 has +0's key, as values they are equal.
GK_HD uint32_t order_key(uint32_t bits, int width) {
  const uint32_t sign = 1u << (width - 1), mask = width == 32 ? 0xFFFFFFFFu : (sign << 1) - 1u;
  bits &= mask;
  if (bits == sign) bits = 0;  // −0 → +0
  return bits & sign ? ~bits & mask : bits | sign;
}

// The storage bits of the value whose order_key is `key` (the inverse of order_key).
GK_HD uint32_t key_bits(uint32_t key, int width) {
  const uint32_t sign = 1u << (width - 1), mask = width == 32 ? 0xFFFFFFFFu : (sign << 1) - 1u;
  return key & sign ? key ^ sign : ~key & mask;
}

// Whether a row's target id y lies in this logits slice. Outside [0, V) it is on another rank's
// vocabulary slice (vocab_parallel.py): no one-hot term here.
GK_HD bool owns_target(int64_t y, int64_t V) { return y >= 0 && y < V; }

// The backward of one row: its saved lse and entropy, and the upstream gradients of logp and H.
struct RowGrad {
  float lse, entropy, g_logp, g_entropy;

  // A masked token: both upstream gradients are 0, so its gradient is exactly 0 and the logits
  // need not be read.
  GK_HD bool is_zero() const { return g_logp == 0.f && g_entropy == 0.f; }

  // dL/dz of one element from its transformed logit z'. z' − E_p z' is computed as
  // (z' − lse) + H: both terms are moderate even when the logits are ~1e4. The target's
  // g·(1 − p) is exact at p near 1, where g − g·p would cancel; its explicit fmaf fixes the
  // rounding, which would otherwise depend on which product the compiler fuses.
  // kept: v is in the kept set K (always for the target); p = 0 outside it, so dL/dz = 0 there.
  template <bool CAP>
  GK_HD float dlogit(float z_prime, bool is_target, const LogitTransform& f, bool kept = true) const {
    const float d = z_prime - lse;
    const float p = kept ? softmax_exp(d) : 0.f;
    const float centred = p > 0.f ? d + entropy : 0.f;
    const float dz = is_target ? fmaf(g_logp, 1.f - p, -(g_entropy * p * centred))
                               : -p * (g_logp + g_entropy * centred);
    return dz * transform_grad<CAP>(z_prime, f);
  }
};

// Row r's RowGrad. Without an entropy gradient the entropy is not read (its term is 0 anyway).
GK_HD RowGrad row_grad(int64_t r, const float* lse, const float* entropy, const float* grad_logp,
                       const float* grad_entropy) {
  return grad_entropy ? RowGrad{lse[r], entropy[r], grad_logp[r], grad_entropy[r]}
                      : RowGrad{lse[r], 0.f, grad_logp[r], 0.f};
}

}  // namespace gk
