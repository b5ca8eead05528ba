// CPU log-probs + entropy and their backward: rows in parallel (OpenMP), inner loops over the
// vocabulary vectorised (omp simd, branch-free exp_fast). fp32, bf16 and fp16 storage; 16-bit
// values are converted in registers. A row's result does not depend on any other row.
// CAP selects the softcapped logit transform (a tanh per logit); without it z' = scale·z.
#include <cmath>
#include <limits>

#include "../kernels.h"

namespace gk {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;

template <int DT, bool CAP>
void forward_rows(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, float* logp,
                  float* entropy, float* lse) {
  using S = Storage<DT>;
  const auto* base = static_cast<const typename S::T*>(x.logits);
  const int64_t V = x.V;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < x.N; ++r) {
    const auto* row = base + (r / x.T) * x.stride_b + (r % x.T) * x.stride_t;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      const float z = transform_logit<CAP>(S::load(row[v]), f);
      m = z > m ? z : m;  // a ternary vectorises; fmaxf (NaN rules) does not without -ffast-math
    }
    const float shift = std::isfinite(m) ? m : 0.f;
    // Vectorised fp32 sums over blocks of kBlock values, added up in fp64: the rounding error
    // stays ~1e-7 relative even for 256k-entry vocabularies.
    double s_total = 0.0, t_total = 0.0;
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
      const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
      float s = 0.f, t = 0.f;
      if (with_entropy) {
#pragma omp simd reduction(+ : s, t)
        for (int64_t v = v0; v < v1; ++v) {
          float d = transform_logit<CAP>(S::load(row[v]), f) - shift;
          float e = exp_fast(d);
          s += e;
          t += e > 0.f ? e * d : 0.f;  // relative to the max: no cancellation with large logits
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t v = v0; v < v1; ++v) s += exp_fast(transform_logit<CAP>(S::load(row[v]), f) - shift);
      }
      s_total += s;
      t_total += t;
    }
    const float s = static_cast<float>(s_total), t = static_cast<float>(t_total);
    const float row_lse = shift + logf(s);
    lse[r] = row_lse;
    logp[r] = transform_logit<CAP>(S::load(row[ids[r]]), f) - row_lse;
    entropy[r] = with_entropy ? logf(s) - (s > 0.f ? t / s : 0.f) : 0.f;  // H = lse − E[z] = log s − E[z − m]
  }
}

template <int DT, bool CAP>
void backward_rows(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                   const float* grad_logp, const float* grad_entropy, void* out_ptr, int64_t out_sb, int64_t out_st,
                   LogitTransform f) {
  using S = Storage<DT>;
  const auto* base = static_cast<const typename S::T*>(x.logits);
  auto* out_base = static_cast<typename S::T*>(out_ptr);
  const int64_t V = x.V;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < x.N; ++r) {
    const int64_t b = r / x.T, t = r % x.T;
    const auto* row = base + b * x.stride_b + t * x.stride_t;
    auto* out = out_base + b * out_sb + t * out_st;
    const float g = grad_logp[r];
    const float gh = grad_entropy ? grad_entropy[r] : 0.f;
    if (g == 0.f && gh == 0.f) {  // a masked token: exact zeros, logits not read
      const auto zero = S::store(0.f);
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] = zero;
      continue;
    }
    const float row_lse = lse[r];
    // z − E[z] = (z − lse) + H: both terms are moderate even when the logits are ~1e4.
    const float h = grad_entropy ? entropy[r] : 0.f;
    const int64_t y = ids[r];
    // y outside [0, V): the target lies in another rank's vocabulary slice, no one-hot term here.
    const bool has_target = y >= 0 && y < V;
    const float z_y = has_target ? transform_logit<CAP>(S::load(row[y]), f) : 0.f;  // read before an in-place write
    const float p_y = exp_fast(z_y - row_lse);
#pragma omp simd
    for (int64_t v = 0; v < V; ++v) {
      float z = transform_logit<CAP>(S::load(row[v]), f);
      float d = z - row_lse;
      float p = exp_fast(d);
      float centred = p > 0.f ? d + h : 0.f;
      out[v] = S::store(-p * (g + gh * centred) * transform_grad<CAP>(z, f));
    }
    if (has_target)
      out[y] = S::store((g * (1.f - p_y) - gh * p_y * ((z_y - row_lse) + h)) * transform_grad<CAP>(z_y, f));
  }
}

// One entry point per (dtype, softcap) pair of the templates above.
template <template <int, bool> class Fn, typename... Args>
void dispatch(const RowsView& x, const LogitTransform& f, Args... args) {
  const bool cap = f.cap != 0.f;
  switch (x.dtype) {
    case DT_FLOAT32: return cap ? Fn<DT_FLOAT32, true>::run(x, f, args...) : Fn<DT_FLOAT32, false>::run(x, f, args...);
    case DT_BFLOAT16:
      return cap ? Fn<DT_BFLOAT16, true>::run(x, f, args...) : Fn<DT_BFLOAT16, false>::run(x, f, args...);
    default: return cap ? Fn<DT_FLOAT16, true>::run(x, f, args...) : Fn<DT_FLOAT16, false>::run(x, f, args...);
  }
}

template <int DT, bool CAP>
struct Forward {
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, bool with_entropy, float* logp,
                  float* entropy, float* lse) {
    forward_rows<DT, CAP>(x, ids, f, with_entropy, logp, entropy, lse);
  }
};

template <int DT, bool CAP>
struct Backward {
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, const float* lse, const float* entropy,
                  const float* grad_logp, const float* grad_entropy, void* out, int64_t out_sb, int64_t out_st) {
    backward_rows<DT, CAP>(x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb, out_st, f);
  }
};

}  // namespace

void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, float* logp,
                      float* entropy, float* lse) {
  dispatch<Forward>(x, f, ids, with_entropy, logp, entropy, lse);
}

void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, void* out, int64_t out_sb, int64_t out_st,
                       LogitTransform f) {
  dispatch<Backward>(x, f, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb, out_st);
}

}  // namespace cpu
}  // namespace gk
