// CPU log-probs + entropy and their backward: rows in parallel (OpenMP), inner loops over the
// vocabulary vectorised (omp simd; softmax_exp is the branch-free exp_fast on the CPU). fp32, bf16
// and fp16 storage; 16-bit values are converted in registers. A row's result does not depend on
// any other row. The per-element and per-row math is logprob_math.h's, shared with the CUDA kernels.
// CAP selects the softcapped logit transform (a tanh per logit); without it z' = scale·z.
#include <cmath>
#include <limits>

#include "../kernels.h"
#include "../logprob_math.h"

namespace gk {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;
// Below this many logits a call runs on one thread: an OpenMP region costs microseconds on a quiet
// machine and a scheduler quantum on a busy one, more than the work it would split.
constexpr int64_t kParallelElements = int64_t{1} << 17;

template <int DT, bool CAP>
void forward_rows(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, float* logp,
                  float* entropy, float* lse) {
  using S = Storage<DT>;
  const auto* base = static_cast<const typename S::T*>(x.logits);
  const int64_t V = x.V;
#pragma omp parallel for schedule(static) if (x.N * V >= kParallelElements)
  for (int64_t r = 0; r < x.N; ++r) {
    const auto* row = base + (r / x.T) * x.stride_b + (r % x.T) * x.stride_t;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t v = 0; v < V; ++v) {
      const float z = transform_logit<CAP>(S::load(row[v]), f);
      m = z > m ? z : m;  // a ternary vectorises; fmaxf (NaN rules) does not without -ffast-math
    }
    // Two passes instead of RowStats::update's online one: with the max known, the sums below
    // are branch-free and vectorise. Their fp32 blocks of kBlock values merge into fp64 totals.
    const float shift = std::isfinite(m) ? m : 0.f;
    RowStats<double> total{shift, 0.0, 0.0};
    for (int64_t v0 = 0; v0 < V; v0 += kBlock) {
      const int64_t v1 = v0 + kBlock < V ? v0 + kBlock : V;
      float s = 0.f, t = 0.f;
      if (with_entropy) {
#pragma omp simd reduction(+ : s, t)
        for (int64_t v = v0; v < v1; ++v) {
          const SoftmaxTerm k = softmax_term(transform_logit<CAP>(S::load(row[v]), f) - shift);
          s += k.e;
          t += k.ed;
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t v = v0; v < v1; ++v) s += softmax_exp(transform_logit<CAP>(S::load(row[v]), f) - shift);
      }
      total.merge(RowStats<float>{shift, s, t});
    }
    const RowResult res = finish(total, transform_logit<CAP>(S::load(row[ids[r]]), f));
    lse[r] = res.lse;
    logp[r] = res.logp;
    entropy[r] = with_entropy ? res.entropy : 0.f;
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
  // firstprivate(f): each thread's own copy of the transform, which the fp32 stores to out cannot
  // alias. Through the shared f, gcc reloads f.scale every iteration and the loop does not vectorise.
#pragma omp parallel for schedule(static) firstprivate(f) if (x.N * V >= kParallelElements)
  for (int64_t r = 0; r < x.N; ++r) {
    const int64_t b = r / x.T, t = r % x.T;
    const auto* row = base + b * x.stride_b + t * x.stride_t;
    auto* out = out_base + b * out_sb + t * out_st;
    const RowGrad rg = row_grad(r, lse, entropy, grad_logp, grad_entropy);
    if (rg.is_zero()) {
      const auto zero = S::store(0.f);
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) out[v] = zero;
      continue;
    }
    const int64_t y = ids[r];
    const bool has_target = owns_target(y, V);
    const float z_y = has_target ? transform_logit<CAP>(S::load(row[y]), f) : 0.f;  // read before an in-place write
    // Every element as a non-target (no branch on v in the vectorised loop), then the target's fixed.
#pragma omp simd
    for (int64_t v = 0; v < V; ++v)
      out[v] = S::store(rg.dlogit<CAP>(transform_logit<CAP>(S::load(row[v]), f), false, f));
    if (has_target) out[y] = S::store(rg.dlogit<CAP>(z_y, true, f));
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
