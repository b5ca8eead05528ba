// CUDA log-probs + entropy and their backward. One block per row; each thread walks the row
// with 16-byte vector loads (4 fp32 or 8 bf16/fp16 values) when the row is aligned, keeping the
// online RowStats (max, Σe, Σe·z) of logprob_math.h, whose per-element and per-row math these
// kernels share with the CPU; the block merges the threads' stats with warp shuffles. fp32
// accumulation. CAP selects the softcapped logit transform (grpo_math.h, LogitTransform).
#include "../kernels.h"
#include "../logprob_math.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <int DT>
struct Vec {
  using T = typename Storage<DT>::T;
  static constexpr int kWidth = 16 / sizeof(T);
  union Pack {
    uint4 raw;
    T v[kWidth];
  };
};

template <int DT>
__device__ __forceinline__ const typename Storage<DT>::T* row_ptr(const RowsView& x, int64_t r) {
  return static_cast<const typename Storage<DT>::T*>(x.logits) + (r / x.T) * x.stride_b + (r % x.T) * x.stride_t;
}

template <int DT, bool CAP>
__global__ void __launch_bounds__(kThreads) forward_kernel(RowsView x, const int64_t* ids, LogitTransform f,
                                                           bool with_entropy, float* logp, float* entropy,
                                                           float* lse) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  RowStats<> o = RowStats<>::empty();
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16 == 0) && (x.V % W::kWidth == 0);
  if (aligned) {
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < x.V / W::kWidth; i += blockDim.x) {
      typename W::Pack pack;
      pack.raw = vrow[i];
#pragma unroll
      for (int k = 0; k < W::kWidth; ++k) o.update(transform_logit<CAP>(S::load(pack.v[k]), f));
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x) o.update(transform_logit<CAP>(S::load(row[v]), f));
  }
  o = block_reduce(o, RowStats<>::empty(), [](RowStats<> a, RowStats<> b) {
    a.merge(b);
    return a;
  });
  if (threadIdx.x == 0) {
    const RowResult res = finish(o, transform_logit<CAP>(S::load(row[ids[r]]), f));
    lse[r] = res.lse;
    logp[r] = res.logp;
    entropy[r] = with_entropy ? res.entropy : 0.f;
  }
}

template <int DT, bool CAP>
__global__ void __launch_bounds__(kThreads) backward_kernel(RowsView x, const int64_t* ids, const float* lse,
                                                            const float* entropy, const float* grad_logp,
                                                            const float* grad_entropy, void* out_ptr, int64_t out_sb,
                                                            int64_t out_st, LogitTransform f) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  using T = typename S::T;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  T* out = static_cast<T*>(out_ptr) + (r / x.T) * out_sb + (r % x.T) * out_st;
  const RowGrad rg = row_grad(r, lse, entropy, grad_logp, grad_entropy);
  const bool zero = rg.is_zero();  // logits not read
  const int64_t y = ids[r];  // outside [0, V) (another rank's target, owns_target) it matches no v
  auto grad_of = [&](float z_prime, int64_t v) { return rg.dlogit<CAP>(z_prime, v == y, f); };
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0) &&
                       (x.V % W::kWidth == 0);
  if (aligned) {
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    uint4* vout = reinterpret_cast<uint4*>(out);
    for (int64_t i = threadIdx.x; i < x.V / W::kWidth; i += blockDim.x) {
      typename W::Pack in, res;
      if (!zero) in.raw = vrow[i];
#pragma unroll
      for (int k = 0; k < W::kWidth; ++k)
        res.v[k] = S::store(zero ? 0.f : grad_of(transform_logit<CAP>(S::load(in.v[k]), f), i * W::kWidth + k));
      vout[i] = res.raw;
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x)
      out[v] = S::store(zero ? 0.f : grad_of(transform_logit<CAP>(S::load(row[v]), f), v));
  }
}

}  // namespace

template <int DT, bool CAP>
void launch_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, float* logp,
                    float* entropy, float* lse, cudaStream_t s) {
  forward_kernel<DT, CAP><<<static_cast<unsigned>(x.N), kThreads, 0, s>>>(x, ids, f, with_entropy, logp, entropy, lse);
}

template <int DT, bool CAP>
void launch_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                     const float* grad_logp, const float* grad_entropy, void* out, int64_t out_sb, int64_t out_st,
                     LogitTransform f, cudaStream_t s) {
  backward_kernel<DT, CAP><<<static_cast<unsigned>(x.N), kThreads, 0, s>>>(x, ids, lse, entropy, grad_logp,
                                                                           grad_entropy, out, out_sb, out_st, f);
}

void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, float* logp,
                      float* entropy, float* lse, uintptr_t stream) {
  if (x.N == 0) return;
  auto s = as_stream(stream);
  const bool cap = f.cap != 0.f;
  switch (x.dtype) {
    case DT_FLOAT32:
      (cap ? launch_forward<DT_FLOAT32, true> : launch_forward<DT_FLOAT32, false>)(x, ids, f, with_entropy, logp,
                                                                                   entropy, lse, s);
      break;
    case DT_BFLOAT16:
      (cap ? launch_forward<DT_BFLOAT16, true> : launch_forward<DT_BFLOAT16, false>)(x, ids, f, with_entropy, logp,
                                                                                     entropy, lse, s);
      break;
    default:
      (cap ? launch_forward<DT_FLOAT16, true> : launch_forward<DT_FLOAT16, false>)(x, ids, f, with_entropy, logp,
                                                                                   entropy, lse, s);
  }
  check(cudaGetLastError(), "grpo_kernels logprobs_forward launch");
}

void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, void* out, int64_t out_sb, int64_t out_st,
                       LogitTransform f, uintptr_t stream) {
  if (x.N == 0) return;
  auto s = as_stream(stream);
  const bool cap = f.cap != 0.f;
  switch (x.dtype) {
    case DT_FLOAT32:
      (cap ? launch_backward<DT_FLOAT32, true> : launch_backward<DT_FLOAT32, false>)(
          x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb, out_st, f, s);
      break;
    case DT_BFLOAT16:
      (cap ? launch_backward<DT_BFLOAT16, true> : launch_backward<DT_BFLOAT16, false>)(
          x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb, out_st, f, s);
      break;
    default:
      (cap ? launch_backward<DT_FLOAT16, true> : launch_backward<DT_FLOAT16, false>)(
          x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb, out_st, f, s);
  }
  check(cudaGetLastError(), "grpo_kernels logprobs_backward launch");
}

}  // namespace cuda
}  // namespace gk
