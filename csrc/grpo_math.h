// The per-token math of docs/math.md as __host__ __device__ inline functions: the single C++ source
// of that math, shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) builds. It mirrors
// grpo_kernels/reference.py and the Triton objective kernel; tests check all three agree.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "options.h"

#ifdef __CUDACC__
#define GK_HD __host__ __device__ __forceinline__
#else
#define GK_HD inline
#endif

namespace gk {

// ------------------------------------------------------------------ storage types
enum DType : int { DT_FLOAT32 = 0, DT_BFLOAT16 = 1, DT_FLOAT16 = 2 };

// memcpy (a register move once optimised), not a union: a union's stack temporary stops gcc
// from vectorising the loops that call these.
GK_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

GK_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

GK_HD float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

GK_HD uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t x = float_to_bits(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

GK_HD float fp16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  if (exp == 0) {
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;  // subnormal: mant * 2^-24
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
}

GK_HD uint16_t float_to_fp16(float f) {  // round to nearest even, overflow to inf
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0u));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(rintf(bits_to_float(ax) * 16777216.0f)));
  }
  uint32_t r = ax + 0x0FFFu + ((ax >> 13) & 1u) - (112u << 23);
  return static_cast<uint16_t>(sign | (r >> 13));
}

template <int DT> struct Storage;
template <> struct Storage<DT_FLOAT32> {
  using T = float;
  static GK_HD float load(T v) { return v; }
  static GK_HD T store(float f) { return f; }
};
template <> struct Storage<DT_BFLOAT16> {
  using T = uint16_t;
  static GK_HD float load(T v) { return bf16_to_float(v); }
  static GK_HD T store(float f) { return float_to_bf16(f); }
};
template <> struct Storage<DT_FLOAT16> {
  using T = uint16_t;
  static GK_HD float load(T v) { return fp16_to_float(v); }
  static GK_HD T store(float f) { return float_to_fp16(f); }
};

// ------------------------------------------------------------------ exp that vectorises
// exp(x) for x <= 88.7 with ~1 ulp error (Cephes' polynomial), exactly 0 for x < -87.3 (so −inf
// logits get probability 0). Branch-free and written with ternaries, not fminf/fmaxf (whose NaN
// rules stop gcc from vectorising without -ffast-math), so loops that call it vectorise.
GK_HD float exp_fast(float x) {
  const float lo = -87.3f, hi = 88.7f;
  float xc = x < lo ? lo : (x > hi ? hi : x);
  float n = floorf(xc * 1.44269504088896341f + 0.5f);
  float r = fmaf(n, -0.693359375f, xc);
  r = fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  float y = fmaf(p * r, r, r) + 1.0f;
  float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
  return x < lo ? 0.0f : y * scale;
}

// ------------------------------------------------------------------ logit transforms
// z' = scale·z without softcap, cap·tanh(scale·z) with it (grpo_kernels/transform.py: scale = s/τ,
// cap = 0; or scale = s/c, cap = c/τ). −inf stays −inf. dz'/dz comes from z' itself.
struct LogitTransform {
  float scale, cap;
};

template <bool CAP>
GK_HD float transform_logit(float z, const LogitTransform& f) {
  if (!CAP) return z * f.scale;
  return z == -INFINITY ? z : f.cap * tanhf(z * f.scale);
}

template <bool CAP>
GK_HD float transform_grad(float z_prime, const LogitTransform& f) {
  if (!CAP) return f.scale;
  const float t = z_prime / f.cap;
  return z_prime == -INFINITY ? 0.f : f.cap * f.scale * (1.f - t * t);
}

// ------------------------------------------------------------------ the loss options
// The enums (PolicyLoss, Level, KlKind, IsMode, Agg, Slot), LossParams and ObjectiveBuffers come from
// options.h, generated from grpo_kernels/options.py.

struct PolicyTerm {
  float loss, d_rho, direct;  // ℓ_pg, ∂ℓ/∂ρ, ∂ℓ/∂logp through other paths (cispo)
};

// 1 where DPPO's trust region keeps the token, else 0: the total-variation (π − π_old) or binary-KL
// divergence bound of the side A's sign pushes towards (ε_high for A > 0, ε_low otherwise), as verl.
GK_HD float dppo_trust_region(float adv, float logp, float old, const LossParams& p) {
  const float prob = expf(logp), old_prob = expf(old);
  bool keep;
  if (p.pg == PG_DPPO_TV) {
    keep = adv > 0.f ? prob - old_prob <= p.eps_high : prob - old_prob >= -p.eps_low;
  } else {
    const float binary_kl = old_prob * (old - logp) + (1.f - old_prob) * logf((1.f - old_prob + 1e-8f) / (1.f - prob + 1e-8f));
    keep = adv > 0.f ? (binary_kl <= p.eps_high || prob <= old_prob) : (binary_kl <= p.eps_low || prob >= old_prob);
  }
  return keep ? 1.f : 0.f;
}

// GMPO's token log-ratio before its sequence mean: min(δ, ε_high) for A > 0, max(δ, −ε_low) for A < 0,
// 0 for A = 0 (sgn(A)·min(sgn(A)·δ, sgn(A)·clamp(δ, −ε_low, ε_high))), and its derivative (1 or 0).
struct ClippedLogRatio {
  float value, d;
};

GK_HD ClippedLogRatio geo_mean_log_ratio(float log_ratio, float adv, const LossParams& p) {
  if (adv > 0.f) return {fminf(log_ratio, p.eps_high), log_ratio <= p.eps_high ? 1.f : 0.f};
  if (adv < 0.f) return {fmaxf(log_ratio, -p.eps_low), log_ratio >= -p.eps_low ? 1.f : 0.f};
  return {0.f, 0.f};
}

// ℓ_pg and its derivatives, matching autograd on reference.py: torch.minimum splits the
// gradient in half at ties, clamp passes it at the (inclusive) bounds. old: the old log-prob.
GK_HD PolicyTerm policy_term(float rho, float adv, float logp, float old, const LossParams& p) {
  PolicyTerm out{0.f, 0.f, 0.f};
  if (p.pg == PG_CLIP) {
    float lo = 1.f - p.eps_low, hi = 1.f + p.eps_high;
    float rho_c = fminf(fmaxf(rho, lo), hi);
    float rho_d = p.has_delta ? fminf(rho, p.delta) : rho;
    float d_rho_d = p.has_delta ? (rho <= p.delta ? 1.f : 0.f) : 1.f;
    float a = rho_d * adv, b = rho_c * adv;
    float da = adv * d_rho_d, db = adv * ((rho >= lo && rho <= hi) ? 1.f : 0.f);
    out.loss = -fminf(a, b);
    out.d_rho = -(a < b ? da : (b < a ? db : 0.5f * (da + db)));
    if (p.has_dual && adv < 0.f) {
      float cap = -p.dual_clip * adv;
      float d = out.loss < cap ? out.d_rho : (out.loss > cap ? 0.f : 0.5f * out.d_rho);
      out.loss = fminf(out.loss, cap);
      out.d_rho = d;
    }
  } else if (p.pg == PG_CISPO) {
    float w = fminf(fmaxf(rho, p.cispo_lo), p.eps_high);
    out.loss = -w * adv * logp;
    out.direct = -w * adv;
  } else if (p.pg == PG_DPPO_TV || p.pg == PG_DPPO_KL) {
    float w = fminf(rho, p.ratio_cap) * dppo_trust_region(adv, logp, old, p);
    out.loss = -w * adv * logp;
    out.direct = -w * adv;
  } else if (p.pg == PG_DRO) {
    float log_ratio = logp - old;
    out.loss = -(logp * adv - 0.5f * p.dro_beta * log_ratio * log_ratio);
    out.direct = -adv + p.dro_beta * log_ratio;
  } else if (p.pg == PG_KL_COV) {
    float log_ratio = logp - old;
    out.loss = -adv * rho + p.kl_cov_coef * fabsf(log_ratio);
    out.d_rho = -adv;
    out.direct = p.kl_cov_coef * (log_ratio > 0.f ? 1.f : (log_ratio < 0.f ? -1.f : 0.f));
  } else if (p.pg == PG_GEO_MEAN) {
    out.loss = -adv * rho;
    out.d_rho = -adv;
  } else {
    float s = adv > 0.f ? p.sapo_pos : p.sapo_neg;
    float sig = 1.f / (1.f + expf(-s * (rho - 1.f)));
    out.loss = -sig * 4.f / s * adv;
    out.d_rho = -4.f * adv * sig * (1.f - sig);
  }
  return out;
}

struct KlTerm {
  float value, d_logp;
};

// e^x − x − 1 without cancellation: its Taylor series (to x^11, below fp32 rounding) for |x| < 1,
// expm1(x) − x above. exp(x) − x − 1 would lose ~2·eps/x² relative at small x.
GK_HD float k3_value(float x) {
  if (fabsf(x) >= 1.f) return expm1f(x) - x;
  float p = 2.50521083854417202e-08f;
  p = fmaf(p, x, 2.75573192239858883e-07f);
  p = fmaf(p, x, 2.75573192239858925e-06f);
  p = fmaf(p, x, 2.48015873015873016e-05f);
  p = fmaf(p, x, 1.98412698412698413e-04f);
  p = fmaf(p, x, 1.38888888888888894e-03f);
  p = fmaf(p, x, 8.33333333333333322e-03f);
  p = fmaf(p, x, 4.16666666666666644e-02f);
  p = fmaf(p, x, 1.66666666666666657e-01f);
  p = fmaf(p, x, 0.5f);
  return p * x * x;
}

// k1/k2/k3 estimators of KL(π‖π_ref) with x = ref_logp − logp, and ∂/∂logp.
GK_HD KlTerm kl_term(float logp, float ref, const LossParams& p) {
  float x = ref - logp;
  KlTerm out{0.f, 0.f};
  if (p.kl == KL_K1) {
    out.value = -x;
    out.d_logp = 1.f;
  } else if (p.kl == KL_K2) {
    out.value = 0.5f * x * x;
    out.d_logp = -x;
  } else {
    float d_x = 1.f;
    if (p.has_kl_clamp) {
      d_x = (x >= -kKlLogRatioClamp && x <= kKlLogRatioClamp) ? 1.f : 0.f;
      x = fminf(fmaxf(x, -kKlLogRatioClamp), kKlLogRatioClamp);
    }
    out.value = k3_value(x);
    out.d_logp = -(out.value + x) * d_x;  // −(e^x − 1) = −(k3 + x), accurate at small x too
  }
  if (p.has_kl_clamp) {
    if (!(out.value >= -p.kl_clamp && out.value <= p.kl_clamp)) out.d_logp = 0.f;
    out.value = fminf(fmaxf(out.value, -p.kl_clamp), p.kl_clamp);
  }
  return out;
}

GK_HD float nan_to_zero(float x) { return x == x ? x : 0.f; }

// clamp(w, lo, hi) and its derivative (1 inside the inclusive bounds, as torch.clamp).
GK_HD float clamp_log_ratio(float w, const LossParams& p) { return fminf(fmaxf(w, p.log_ratio_lo), p.log_ratio_hi); }
GK_HD float log_ratio_inside(float w, const LossParams& p) {
  return (w >= p.log_ratio_lo && w <= p.log_ratio_hi) ? 1.f : 0.f;
}

GK_HD float is_clip(float w, int truncate, float lo, float hi) {
  if (truncate) return fminf(fmaxf(w, lo), hi);
  return (w < lo || w > hi) ? 0.f : w;
}

// exp(old − sampling) of one token (a NaN sampling log-prob counts as 0), clipped for a token IS mode.
GK_HD float token_is_weight(float old, float sampling, const LossParams& p) {
  return is_clip(expf(nan_to_zero(old - sampling)), p.is_mode == IS_TOKEN_TRUNCATE, p.is_lo, p.is_hi);
}

// Tokens are packed (N,): sequence b holds rows [cu_seqlens[b], cu_seqlens[b+1]) (padded (B, T)
// is cu_seqlens = arange(B+1)·T). A pass covers rows [row_lo, row_hi) of sequences [seq_lo, seq_hi).
struct ObjectiveArgs : ObjectiveBuffers {
  int64_t row_lo, row_hi;
  int adv_per_token;    // advantages hold one value per token, (N,), not (B,)
  int weights_per_seq;  // token_weights hold one weight per sequence
  LossParams p;
};

// VESPO's Gamma weight φ = exp(λ + k·log w − λ·w), (k, λ) by the advantage's sign; non-finite → 0.
GK_HD float vespo_phi(float log_w, float adv, const LossParams& p) {
  const bool pos = adv >= 0.f;
  const float k = pos ? p.vespo_k_pos : p.vespo_k_neg;
  float lam = pos ? p.vespo_lambda_pos : p.vespo_lambda_neg;
  lam = lam < kVespoLambdaMin ? kVespoLambdaMin : lam;
  const float phi = expf(lam + k * log_w - lam * expf(log_w));
  return (phi == phi && phi < INFINITY) ? phi : 0.f;
}

GK_HD float clamp_vespo_log(float x) { return fminf(fmaxf(x, kVespoLogWMin), kVespoLogWMax); }

// ------------------------------------------------------------------ the objective of one sequence
// The objective of the rows of sequence b in [row_lo, row_hi): per-token loss, dL/dlogp, dL/dH,
// and partial sums added to partials[b]. Pass 1: sequence sums; pass 2: tokens; pass 3 (GSPO):
// the gradient through the sequence mean. Options that couple a sequence's tokens (GSPO, VESPO,
// the off-policy mask, sequence IS) need the whole sequence in one pass; token-level ones take any
// row range, with n_b from `counts`. Sums accumulate in fp64: fp32 running sums lose ~T·eps.
//
// It is written as pieces that a team of workers runs over the sequence's rows (objective_sequence_by
// below): the CPU build is a team of one (objective_sequence), the CUDA build a thread block
// (csrc/cuda/objective.cu), and a test-only CPU emulation of the block (csrc/cpu/objective.cpp)
// checks the pieces and their merges in the block's reduction order.

// The rows [lo, hi) of sequence b that this pass covers.
struct SequenceRows {
  int64_t lo, hi;
};

GK_HD SequenceRows sequence_rows(const ObjectiveArgs& a, int64_t b) {
  return {a.cu_seqlens[b] > a.row_lo ? a.cu_seqlens[b] : a.row_lo,
          a.cu_seqlens[b + 1] < a.row_hi ? a.cu_seqlens[b + 1] : a.row_hi};
}

// Pass 1's sequence sums (fp64). Value-initialised ({}) is the empty sum.
struct SequenceSums {
  double n_tok, sum_delta, sum_off, sum_isd, vespo_log;
};

GK_HD SequenceSums merge_sums(const SequenceSums& x, const SequenceSums& y) {
  return {x.n_tok + y.n_tok, x.sum_delta + y.sum_delta, x.sum_off + y.sum_off, x.sum_isd + y.sum_isd,
          x.vespo_log + y.vespo_log};
}

// (a) Row i's (of sequence b) contribution to pass 1's sums.
GK_HD void add_token_sums(SequenceSums& s, const ObjectiveArgs& a, int64_t b, int64_t i) {
  const LossParams& p = a.p;
  if (!a.mask[i]) return;
  float logp = a.logp[i];
  float old = a.old ? a.old[i] : logp;
  s.n_tok += 1.0;
  if (p.pg == PG_GEO_MEAN)  // GMPO clips each token's log-ratio before the mean
    s.sum_delta += geo_mean_log_ratio(logp - old, a.adv_per_token ? a.advantages[i] : a.advantages[b], p).value;
  else
    s.sum_delta += logp - old;
  if (p.has_off_policy) {
    float behaviour = a.sampling ? a.sampling[i] : old;
    s.sum_off += nan_to_zero(behaviour - logp);
  }
  if (p.is_mode != IS_NONE) s.sum_isd += nan_to_zero(old - a.sampling[i]);
  if (p.pg == PG_VESPO) {
    const bool is_token = p.is_mode == IS_TOKEN_TRUNCATE || p.is_mode == IS_TOKEN_MASK;
    s.vespo_log += fminf(fmaxf(logp - old, -kVespoTokenLogRatio), kVespoTokenLogRatio);
    if (is_token) s.vespo_log += clamp_vespo_log(logf(token_is_weight(old, a.sampling[i], p)));
    if (a.token_weights && !a.weights_per_seq) s.vespo_log += clamp_vespo_log(logf(a.token_weights[i]));
  }
}

// What pass 2 needs of the sequence, from pass 1's sums (the whole sequence's, merged).
struct SequenceContext {
  float n_b, w_seq, rho_seq, seq_inside, off_kl, is_seq, seq_weight, vespo_log_w, agg_w, ent_w, adv_seq;
};

// (b) The sequence context of sequence b from its sums.
GK_HD SequenceContext sequence_context(const ObjectiveArgs& a, int64_t b, const SequenceSums& s) {
  const LossParams& p = a.p;
  const bool is_seq_mode = p.is_mode == IS_SEQUENCE_TRUNCATE || p.is_mode == IS_SEQUENCE_MASK;
  SequenceContext c;
  c.n_b = a.counts[b] > 1.f ? a.counts[b] : 1.f;
  c.w_seq = static_cast<float>(s.sum_delta / c.n_b);
  c.rho_seq = expf(clamp_log_ratio(c.w_seq, p));
  c.seq_inside = log_ratio_inside(c.w_seq, p);
  c.off_kl = static_cast<float>(s.sum_off / c.n_b);
  c.is_seq = expf(static_cast<float>(s.sum_isd));
  if (is_seq_mode) c.is_seq = is_clip(c.is_seq, p.is_mode == IS_SEQUENCE_TRUNCATE, p.is_lo, p.is_hi);
  c.seq_weight = a.token_weights && a.weights_per_seq ? a.token_weights[b] : 1.f;
  c.vespo_log_w = 0.f;
  if (p.pg == PG_VESPO) {
    double vespo_log = s.vespo_log;
    if (is_seq_mode) vespo_log += clamp_vespo_log(logf(c.is_seq));
    if (a.token_weights && a.weights_per_seq) vespo_log += clamp_vespo_log(logf(c.seq_weight));
    c.vespo_log_w = clamp_vespo_log(static_cast<float>(vespo_log));
  }
  c.agg_w = p.agg == AGG_SEQ_MEAN_TOKEN_MEAN ? 1.f / (c.n_b * *a.norm) : 1.f / *a.norm;
  c.ent_w = p.entropy_coef != 0.f ? p.entropy_coef / *a.ent_norm : 0.f;
  c.adv_seq = a.adv_per_token ? 0.f : a.advantages[b];
  return c;
}

// Pass 2's accumulators (fp64 sums; the ratio's max). Value-initialised ({}) is the empty one
// (ratios are >= 0, so 0 is max's neutral element here).
struct TokenSums {
  double loss, ent, low, high, region, rho, kl, is, drho, cispo, phi;
  float max_rho;
};

GK_HD TokenSums merge_token_sums(const TokenSums& x, const TokenSums& y) {
  return {x.loss + y.loss, x.ent + y.ent,     x.low + y.low, x.high + y.high, x.region + y.region,
          x.rho + y.rho,   x.kl + y.kl,       x.is + y.is,   x.drho + y.drho, x.cispo + y.cispo,
          x.phi + y.phi,   fmaxf(x.max_rho, y.max_rho)};
}

// (c) Pass 2 for row i: writes its loss, dL/dlogp and dL/dH, and adds its terms to acc.
GK_HD void objective_token(const ObjectiveArgs& a, const SequenceContext& c, int64_t i, TokenSums& acc) {
  const LossParams& p = a.p;
  if (!a.mask[i]) {
    a.per_token_loss[i] = 0.f;
    a.g_logp[i] = 0.f;
    a.g_entropy[i] = -0.f;
    return;
  }
  const bool vespo = p.pg == PG_VESPO;
  const bool is_token = p.is_mode == IS_TOKEN_TRUNCATE || p.is_mode == IS_TOKEN_MASK;
  float logp = a.logp[i], ent = a.entropy[i];
  float old = a.old ? a.old[i] : logp;
  float adv = a.adv_per_token ? a.advantages[i] : c.adv_seq;
  float rho, d_rho_direct;
  if (p.level == LEVEL_TOKEN) {
    rho = expf(clamp_log_ratio(logp - old, p));
    d_rho_direct = rho * log_ratio_inside(logp - old, p);
  } else {
    rho = c.rho_seq;
    d_rho_direct = p.level == LEVEL_SEQUENCE_TOKEN ? rho * c.seq_inside : 0.f;
  }
  PolicyTerm pg{0.f, 0.f, 0.f};
  float phi = 0.f;
  if (vespo) {
    phi = vespo_phi(c.vespo_log_w, adv, p);
    pg.loss = -phi * adv * logp;
    pg.direct = -phi * adv;
  } else {
    pg = policy_term(rho, adv, logp, old, p);
  }
  float mult = 1.f;
  if (p.has_off_policy && adv < 0.f && c.off_kl > p.off_thresh) mult = 0.f;
  float keep_ent = 1.f;
  if (a.keep_entropy) {
    keep_ent = a.keep_entropy[i] ? 1.f : 0.f;
    mult *= keep_ent;
  }
  float is_w = 1.f;
  if (is_token)
    is_w = token_is_weight(old, a.sampling[i], p);
  else if (p.is_mode != IS_NONE)
    is_w = c.is_seq;
  if (!vespo) {  // VESPO folds the IS ratios into its sequence weight instead
    if (p.is_mode != IS_NONE) mult *= is_w;
    if (a.token_weights) mult *= a.weights_per_seq ? c.seq_weight : a.token_weights[i];
  }
  float loss = pg.loss * mult;
  float g = mult * (pg.d_rho * d_rho_direct + pg.direct);
  float d_seq_rho = mult * pg.d_rho;  // ∂ℓ/∂ρ_b for the GSPO pass
  float kl = 0.f;
  if (p.kl != KL_NONE) {
    KlTerm k = kl_term(logp, a.ref[i], p);
    if (p.bias_corr) {  // β·k·ρ with ρ's gradient (TRL): ∂ = β(k'·ρ + k·∂ρ)
      kl = k.value * rho;
      g += p.beta * (k.d_logp * rho + k.value * d_rho_direct);
      d_seq_rho += p.beta * k.value;
    } else {
      kl = k.value;
      g += p.beta * k.d_logp;
    }
    loss += p.beta * kl;
  }
  a.per_token_loss[i] = loss;
  a.g_logp[i] = g * c.agg_w;
  a.g_entropy[i] = -c.ent_w * keep_ent;
  acc.loss += static_cast<double>(loss * c.agg_w) - static_cast<double>(c.ent_w * keep_ent * ent);
  acc.drho += static_cast<double>(c.agg_w * d_seq_rho);
  float low = (rho < 1.f - p.eps_low && adv < 0.f) ? 1.f : 0.f;
  float high = (rho > 1.f + p.eps_high && adv > 0.f) ? 1.f : 0.f;
  acc.ent += ent;
  acc.low += low;
  acc.high += high;
  acc.region += fmaxf(low, high);
  acc.rho += rho;
  acc.max_rho = fmaxf(acc.max_rho, rho);
  acc.kl += kl;
  acc.is += is_w;
  acc.cispo += (rho > p.eps_high && adv > 0.f) ? 1.0 : 0.0;
  acc.phi += phi;
}

// (d) GSPO (LEVEL_SEQUENCE) pass 3: the gradient through the sequence mean log-ratio, the same for
// every unmasked row of the sequence: ∂L/∂logp_i += Σ_j ∂L/∂ρ_j · ρ' / n_b, from pass 2's whole
// sequence's acc.drho. 0 (and no pass 3) for the other levels.
GK_HD float sequence_ratio_grad(const LossParams& p, const SequenceContext& c, const TokenSums& acc) {
  return p.level == LEVEL_SEQUENCE ? static_cast<float>(acc.drho) * c.rho_seq * c.seq_inside / c.n_b : 0.f;
}

// GMPO's sequence ratio is the mean of clipped token log-ratios: each row's share is scaled by its clip's
// derivative (c: the sequence's context, for its advantage).
GK_HD void add_sequence_ratio_grad(const ObjectiveArgs& a, const SequenceContext& c, int64_t i, float scale) {
  if (!a.mask[i]) return;
  if (a.p.pg == PG_GEO_MEAN) {
    const float old = a.old ? a.old[i] : a.logp[i];
    scale *= geo_mean_log_ratio(a.logp[i] - old, a.adv_per_token ? a.advantages[i] : c.adv_seq, a.p).d;
  }
  a.g_logp[i] += scale;
}

// (e) Adds the whole sequence's sums to partials[b] (one writer per sequence and pass).
GK_HD void write_partials(const ObjectiveArgs& a, int64_t b, const SequenceSums& s, const SequenceContext& c,
                          const TokenSums& acc) {
  float* part = a.partials + b * NUM_SLOTS;
  part[SLOT_LOSS] += static_cast<float>(acc.loss);
  part[SLOT_COUNT] += static_cast<float>(s.n_tok);
  part[SLOT_ENTROPY] += static_cast<float>(acc.ent);
  part[SLOT_LOW] += static_cast<float>(acc.low);
  part[SLOT_HIGH] += static_cast<float>(acc.high);
  part[SLOT_REGION] += static_cast<float>(acc.region);
  part[SLOT_RATIO_SUM] += static_cast<float>(acc.rho);
  part[SLOT_RATIO_MAX] = fmaxf(part[SLOT_RATIO_MAX], acc.max_rho);
  part[SLOT_KL] += static_cast<float>(acc.kl);
  part[SLOT_IS] += static_cast<float>(acc.is);
  part[SLOT_CISPO_CLIP] += static_cast<float>(acc.cispo);
  // TRL's vespo/phi_seq_mean: one φ per sequence (per-sequence advantages), else a token mean.
  // VESPO couples tokens, so its sequences come whole, in exactly one pass.
  part[SLOT_VESPO_PHI] += a.adv_per_token ? static_cast<float>(acc.phi)
                                          : (a.p.pg == PG_VESPO ? vespo_phi(c.vespo_log_w, c.adv_seq, a.p) : 0.f);
}

// The three passes over sequence b by a team of workers. Team provides
//   T reduce(f, merge): each worker w runs f(first = w's rank, stride = team size), which walks rows
//                       lo + first, lo + first + stride, ... and returns its accumulator; every worker
//                       gets the team's accumulators merged (a barrier: the team's writes before are seen);
//   void for_each(f):   each worker runs f(first, stride);
//   bool leader():      true for the one worker that writes the partials.
template <typename Team>
GK_HD void objective_sequence_by(const ObjectiveArgs& a, int64_t b, const Team& team) {
  const SequenceRows r = sequence_rows(a, b);
  const SequenceSums s = team.reduce(
      [&](int64_t first, int64_t stride) {
        SequenceSums mine{};
        for (int64_t i = r.lo + first; i < r.hi; i += stride) add_token_sums(mine, a, b, i);
        return mine;
      },
      [](const SequenceSums& x, const SequenceSums& y) { return merge_sums(x, y); });
  const SequenceContext c = sequence_context(a, b, s);
  const TokenSums acc = team.reduce(
      [&](int64_t first, int64_t stride) {
        TokenSums mine{};
        for (int64_t i = r.lo + first; i < r.hi; i += stride) objective_token(a, c, i, mine);
        return mine;
      },
      [](const TokenSums& x, const TokenSums& y) { return merge_token_sums(x, y); });
  if (a.p.level == LEVEL_SEQUENCE) {
    const float scale = sequence_ratio_grad(a.p, c, acc);
    team.for_each([&](int64_t first, int64_t stride) {
      for (int64_t i = r.lo + first; i < r.hi; i += stride) add_sequence_ratio_grad(a, c, i, scale);
    });
  }
  if (team.leader()) write_partials(a, b, s, c, acc);
}

// A team of one: walks the rows in order (the CPU build).
struct SerialTeam {
  template <typename F, typename Merge>
  GK_HD auto reduce(F f, Merge) const -> decltype(f(0, 1)) {
    return f(0, 1);
  }
  template <typename F>
  GK_HD void for_each(F f) const {
    f(0, 1);
  }
  GK_HD bool leader() const { return true; }
};

GK_HD void objective_sequence(const ObjectiveArgs& a, int64_t b) { objective_sequence_by(a, b, SerialTeam{}); }

}  // namespace gk
