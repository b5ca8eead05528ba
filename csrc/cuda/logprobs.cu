// CUDA log-probs + entropy and their backward. One block per row; each thread walks the row
// with 16-byte vector loads (4 fp32 or 8 bf16/fp16 values) when the row is aligned, keeping an
// online (max, Σe, Σe·z) triple; the block merges them with warp shuffles. fp32 accumulation.
#include "../kernels.h"
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

template <int DT>
__global__ void __launch_bounds__(kThreads) forward_kernel(RowsView x, const int64_t* ids, float inv_temp,
                                                           bool with_entropy, float* logp, float* entropy,
                                                           float* lse) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  Online o{-INFINITY, 0.f, 0.f};
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16 == 0) && (x.V % W::kWidth == 0);
  if (aligned) {
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < x.V / W::kWidth; i += blockDim.x) {
      typename W::Pack pack;
      pack.raw = vrow[i];
#pragma unroll
      for (int k = 0; k < W::kWidth; ++k) online_add(o, S::load(pack.v[k]) * inv_temp);
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x) online_add(o, S::load(row[v]) * inv_temp);
  }
  o = block_merge(o);
  if (threadIdx.x == 0) {
    const float row_lse = o.m + logf(o.s);
    lse[r] = row_lse;
    logp[r] = S::load(row[ids[r]]) * inv_temp - row_lse;
    entropy[r] = with_entropy ? logf(o.s) - (o.s > 0.f ? o.t / o.s : 0.f) : 0.f;
  }
}

template <int DT>
__global__ void __launch_bounds__(kThreads) backward_kernel(RowsView x, const int64_t* ids, const float* lse,
                                                            const float* entropy, const float* grad_logp,
                                                            const float* grad_entropy, void* out_ptr, int64_t out_sb,
                                                            int64_t out_st, float inv_temp) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  using T = typename S::T;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  T* out = static_cast<T*>(out_ptr) + (r / x.T) * out_sb + (r % x.T) * out_st;
  const float g = grad_logp[r];
  const float gh = grad_entropy ? grad_entropy[r] : 0.f;
  const bool zero = g == 0.f && gh == 0.f;  // a masked token: exact zeros, logits not read
  const float row_lse = lse[r];
  const float h = grad_entropy ? entropy[r] : 0.f;  // z − E[z] = (z − lse) + H, no cancellation
  const int64_t y = ids[r];
  auto grad_of = [&](float z, int64_t v) {
    float d = z - row_lse;
    float p = expf(d);
    float centred = p > 0.f ? d + h : 0.f;
    return ((v == y ? g : 0.f) - p * (g + gh * centred)) * inv_temp;
  };
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
        res.v[k] = S::store(zero ? 0.f : grad_of(S::load(in.v[k]) * inv_temp, i * W::kWidth + k));
      vout[i] = res.raw;
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x)
      out[v] = S::store(zero ? 0.f : grad_of(S::load(row[v]) * inv_temp, v));
  }
}

}  // namespace

void logprobs_forward(const RowsView& x, const int64_t* ids, float inv_temp, bool with_entropy, float* logp,
                      float* entropy, float* lse, uintptr_t stream) {
  if (x.N == 0) return;
  dim3 grid(static_cast<unsigned>(x.N)), block(kThreads);
  switch (x.dtype) {
    case DT_FLOAT32:
      forward_kernel<DT_FLOAT32><<<grid, block, 0, as_stream(stream)>>>(x, ids, inv_temp, with_entropy, logp, entropy, lse);
      break;
    case DT_BFLOAT16:
      forward_kernel<DT_BFLOAT16><<<grid, block, 0, as_stream(stream)>>>(x, ids, inv_temp, with_entropy, logp, entropy, lse);
      break;
    default:
      forward_kernel<DT_FLOAT16><<<grid, block, 0, as_stream(stream)>>>(x, ids, inv_temp, with_entropy, logp, entropy, lse);
  }
  check(cudaGetLastError(), "grpo_kernels logprobs_forward launch");
}

void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, void* out, int64_t out_sb, int64_t out_st,
                       float inv_temp, uintptr_t stream) {
  if (x.N == 0) return;
  dim3 grid(static_cast<unsigned>(x.N)), block(kThreads);
  auto s = as_stream(stream);
  switch (x.dtype) {
    case DT_FLOAT32:
      backward_kernel<DT_FLOAT32><<<grid, block, 0, s>>>(x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb,
                                                         out_st, inv_temp);
      break;
    case DT_BFLOAT16:
      backward_kernel<DT_BFLOAT16><<<grid, block, 0, s>>>(x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb,
                                                          out_st, inv_temp);
      break;
    default:
      backward_kernel<DT_FLOAT16><<<grid, block, 0, s>>>(x, ids, lse, entropy, grad_logp, grad_entropy, out, out_sb,
                                                         out_st, inv_temp);
  }
  check(cudaGetLastError(), "grpo_kernels logprobs_backward launch");
}

}  // namespace cuda
}  // namespace gk
