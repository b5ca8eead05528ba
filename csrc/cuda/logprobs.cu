// CUDA log-probs + entropy (+ Σπ²) and their backward, with truncated sampling (top-k, top-p, min-p).
// One block per row; each thread walks the row with 16-byte vector loads (4 fp32 or 8 bf16/fp16
// values) when the row is aligned, keeping the online RowStats (max, Σe, Σe·z, Σe²) of
// logprob_math.h over the kept set K = {z >= threshold} ∪ {y}, whose per-element and per-row math
// these kernels share with the CPU; the block merges the threads' stats with warp shuffles. fp32
// accumulation. CAP selects the softcapped logit transform (grpo_math.h, LogitTransform).
//
// The threshold, when truncation is on and none is given, is found by the same block before the
// sums, without sorting: a radix select on order_key (logprob_math.h) of the raw logits, 8 bits a
// pass from the top, with a 256-bin shared-memory histogram per pass (counts for top-k, masses
// e^(z'−m) for top-p), and one warp picking the digit of the lowest kept value (above_keeps).
// Passes over a row of V logits of b bytes (all but the first and last hit L2 on a GPU, where the
// rows being worked on fit):  1 (max)  + [min_p alone: 1 (min of the kept)]  + [top_k: b]
// + [top_p: 1 (Z over what top_k kept) + b]  + 1 (sums over K):  V·b bytes each, e.g. fp32 with
// top_k and top_p 11·4·V bytes, bf16 with top_p alone 5·2·V bytes.
#include "../kernels.h"
#include "../logprob_math.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kDigits = 256;  // 8 bits per radix pass

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

// The raw logit's storage bits and width (for order_key), and the value of a key.
template <int DT>
struct Keys {
  using T = typename Storage<DT>::T;
  static constexpr int kWidth = 8 * sizeof(T);
  static __device__ __forceinline__ uint32_t key(T v) {
    if constexpr (DT == DT_FLOAT32) return order_key(__float_as_uint(v), kWidth);
    else return order_key(v, kWidth);
  }
  static __device__ __forceinline__ float value(uint32_t key) {
    const uint32_t bits = key_bits(key, kWidth);
    if constexpr (DT == DT_FLOAT32) return __uint_as_float(bits);
    else return Storage<DT>::load(static_cast<T>(bits));
  }
};

// What the threshold search of one row needs: its logits, the transform, its max z' (m) and
// min_p's bound; an entry is a candidate when min_p keeps it and its key is >= floor (what top_k
// kept, for top_p).
template <int DT, bool CAP>
struct Search {
  using T = typename Storage<DT>::T;
  const T* row;
  int64_t V;
  LogitTransform f;
  float m, log_min_p;

  __device__ __forceinline__ float d(T v) const { return transform_logit<CAP>(Storage<DT>::load(v), f) - m; }

  // The key of the lowest value kept by above_keeps(weight strictly above it, limit) among the
  // candidates, weight 1 (MASS false: top_k) or e^(z'−m) (MASS true: top_p): a radix select from the
  // top digit. `above` carries the weight above the current prefix; every thread returns the key.
  template <bool MASS>
  __device__ uint32_t lowest_kept(uint32_t floor, float limit) const {
    __shared__ float hist[kDigits];
    __shared__ uint32_t chosen_prefix;
    __shared__ float chosen_above;
    uint32_t prefix = 0, prefix_mask = 0;
    float above = 0.f;
    for (int shift = Keys<DT>::kWidth - 8; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < kDigits; i += blockDim.x) hist[i] = 0.f;
      __syncthreads();
      for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
        const T raw = row[v];
        const uint32_t key = Keys<DT>::key(raw);
        if (key < floor || (key & prefix_mask) != prefix) continue;
        const float dv = d(raw);
        if (!min_p_keeps(dv, log_min_p)) continue;
        atomicAdd(&hist[(key >> shift) & (kDigits - 1)], MASS ? softmax_exp(dv) : 1.f);
      }
      __syncthreads();
      if (threadIdx.x < kWarp) {
        // Lane l owns digits [8l, 8l + 8): its total, the totals of the lanes above it, then its
        // lowest digit j with entries and above(j) = above + Σ_{i > j} hist[i] < limit.
        const int lane = threadIdx.x, per = kDigits / kWarp;
        float own = 0.f;
        for (int i = 0; i < per; ++i) own += hist[lane * per + i];
        float suffix = own;  // Σ over lanes >= lane
        for (int o = 1; o < kWarp; o <<= 1) {
          const float n = __shfl_down_sync(0xffffffffu, suffix, o);
          if (lane + o < kWarp) suffix += n;
        }
        float a = above + (suffix - own);
        int best = -1;
        float best_above = 0.f;
        for (int j = lane * per + per - 1; j >= lane * per; --j) {
          const float h = hist[j];
          if (h > 0.f) {
            if (!above_keeps(a, limit)) break;
            best = j;
            best_above = a;
          }
          a += h;
        }
        const unsigned found = __ballot_sync(0xffffffffu, best >= 0);
        const int src = found ? __ffs(found) - 1 : 0;
        const int digit = __shfl_sync(0xffffffffu, best, src);
        const float digit_above = __shfl_sync(0xffffffffu, best_above, src);
        if (lane == 0) {
          chosen_prefix = prefix | (static_cast<uint32_t>(digit < 0 ? 0 : digit) << shift);
          chosen_above = found ? digit_above : above;
        }
      }
      __syncthreads();
      prefix = chosen_prefix;
      above = chosen_above;
      prefix_mask |= static_cast<uint32_t>(kDigits - 1) << shift;
      __syncthreads();  // chosen_* are read before the next pass writes them
    }
    return prefix;
  }

  // Σ e^(z'−m) over the candidates (top_p's Z).
  __device__ float mass(uint32_t floor) const {
    float z = 0.f;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const T raw = row[v];
      const float dv = d(raw);
      if (Keys<DT>::key(raw) >= floor && min_p_keeps(dv, log_min_p)) z += softmax_exp(dv);
    }
    return block_sum(z);
  }

  // The smallest raw logit min_p keeps.
  __device__ float min_kept() const {
    float lo = INFINITY;
    for (int64_t v = threadIdx.x; v < V; v += blockDim.x) {
      const T raw = row[v];
      const float z = Storage<DT>::load(raw);
      if (min_p_keeps(d(raw), log_min_p)) lo = fminf(lo, z);
    }
    return block_reduce(lo, INFINITY, [](float a, float b) { return fminf(a, b); });
  }
};

// The threshold of a row (the smallest kept raw logit; docs/math.md "Truncated sampling"):
// min_p, then top_k, then top_p, each on what the previous kept. Every thread returns it.
template <int DT, bool CAP>
__device__ float search_threshold(const typename Storage<DT>::T* row, int64_t V, LogitTransform f,
                                  const Truncation& tr) {
  float zmax = -INFINITY;
  for (int64_t v = threadIdx.x; v < V; v += blockDim.x) zmax = fmaxf(zmax, Storage<DT>::load(row[v]));
  zmax = block_reduce(zmax, -INFINITY, [](float a, float b) { return fmaxf(a, b); });
  if (zmax == -INFINITY) return -INFINITY;  // nothing finite: keep every entry
  const Search<DT, CAP> s{row, V, f, transform_logit<CAP>(zmax, f), tr.log_min_p};
  uint32_t floor = 0;
  if (tr.top_k > 0) floor = s.template lowest_kept<false>(0, static_cast<float>(tr.top_k));
  if (tr.top_p < 1.f) floor = s.template lowest_kept<true>(floor, tr.top_p * s.mass(floor));
  return tr.top_k > 0 || tr.top_p < 1.f ? Keys<DT>::value(floor) : s.min_kept();
}

template <int DT, bool CAP>
__global__ void __launch_bounds__(kThreads) forward_kernel(RowsView x, const int64_t* ids, LogitTransform f,
                                                           bool with_entropy, Truncation tr,
                                                           const float* threshold_in, bool with_sum_pi_sq,
                                                           float* logp, float* entropy, float* lse,
                                                           float* threshold_out, float* sum_pi_sq) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  const float thr = threshold_in ? threshold_in[r]
                                 : (tr.active() ? search_threshold<DT, CAP>(row, x.V, f, tr) : -INFINITY);
  RowStats<> o = RowStats<>::empty();
  auto add = [&](float z) {
    if (in_kept(z, thr)) o.update(transform_logit<CAP>(z, f));
  };
  const bool aligned = (reinterpret_cast<uintptr_t>(row) % 16 == 0) && (x.V % W::kWidth == 0);
  if (aligned) {
    const uint4* vrow = reinterpret_cast<const uint4*>(row);
    for (int64_t i = threadIdx.x; i < x.V / W::kWidth; i += blockDim.x) {
      typename W::Pack pack;
      pack.raw = vrow[i];
#pragma unroll
      for (int k = 0; k < W::kWidth; ++k) add(S::load(pack.v[k]));
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x) add(S::load(row[v]));
  }
  o = block_reduce(o, RowStats<>::empty(), [](RowStats<> a, RowStats<> b) {
    a.merge(b);
    return a;
  });
  if (threadIdx.x == 0) {
    const int64_t y = ids[r];
    const bool has_target = owns_target(y, x.V);
    const float z_y = has_target ? S::load(row[y]) : 0.f;
    if (has_target && !in_kept(z_y, thr)) o.update(transform_logit<CAP>(z_y, f));  // the target is always kept
    const RowResult res = finish(o, transform_logit<CAP>(z_y, f));
    lse[r] = res.lse;
    logp[r] = res.logp;
    entropy[r] = with_entropy ? res.entropy : 0.f;
    sum_pi_sq[r] = with_sum_pi_sq ? res.sum_pi_sq : 0.f;
    threshold_out[r] = thr;
  }
}

template <int DT, bool CAP>
__global__ void __launch_bounds__(kThreads) backward_kernel(RowsView x, const int64_t* ids, const float* lse,
                                                            const float* entropy, const float* grad_logp,
                                                            const float* grad_entropy, const float* threshold,
                                                            void* out_ptr, int64_t out_sb, int64_t out_st,
                                                            LogitTransform f) {
  using S = Storage<DT>;
  using W = Vec<DT>;
  using T = typename S::T;
  const int64_t r = blockIdx.x;
  const auto* row = row_ptr<DT>(x, r);
  T* out = static_cast<T*>(out_ptr) + (r / x.T) * out_sb + (r % x.T) * out_st;
  const RowGrad rg = row_grad(r, lse, entropy, grad_logp, grad_entropy);
  const bool zero = rg.is_zero();  // logits not read
  const int64_t y = ids[r];  // outside [0, V) (another rank's target, owns_target) it matches no v
  const float thr = threshold ? threshold[r] : -INFINITY;
  // p = 0 outside K (the target is always in it)
  auto grad_of = [&](float z, int64_t v) {
    return rg.dlogit<CAP>(transform_logit<CAP>(z, f), v == y, f, v == y || in_kept(z, thr));
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
        res.v[k] = S::store(zero ? 0.f : grad_of(S::load(in.v[k]), i * W::kWidth + k));
      vout[i] = res.raw;
    }
  } else {
    for (int64_t v = threadIdx.x; v < x.V; v += blockDim.x)
      out[v] = S::store(zero ? 0.f : grad_of(S::load(row[v]), v));
  }
}

}  // namespace

template <int DT, bool CAP>
void launch_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, Truncation tr,
                    const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                    float* threshold_out, float* sum_pi_sq, cudaStream_t s) {
  forward_kernel<DT, CAP><<<static_cast<unsigned>(x.N), kThreads, 0, s>>>(
      x, ids, f, with_entropy, tr, threshold_in, with_sum_pi_sq, logp, entropy, lse, threshold_out, sum_pi_sq);
}

template <int DT, bool CAP>
void launch_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                     const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                     int64_t out_sb, int64_t out_st, LogitTransform f, cudaStream_t s) {
  backward_kernel<DT, CAP><<<static_cast<unsigned>(x.N), kThreads, 0, s>>>(
      x, ids, lse, entropy, grad_logp, grad_entropy, threshold, out, out_sb, out_st, f);
}

// The launcher of a (dtype, softcap) pair.
template <template <int, bool> class L, typename... Args>
void launch(const RowsView& x, const LogitTransform& f, Args... args) {
  const bool cap = f.cap != 0.f;
  switch (x.dtype) {
    case DT_FLOAT32: return cap ? L<DT_FLOAT32, true>::run(x, f, args...) : L<DT_FLOAT32, false>::run(x, f, args...);
    case DT_BFLOAT16:
      return cap ? L<DT_BFLOAT16, true>::run(x, f, args...) : L<DT_BFLOAT16, false>::run(x, f, args...);
    default: return cap ? L<DT_FLOAT16, true>::run(x, f, args...) : L<DT_FLOAT16, false>::run(x, f, args...);
  }
}

template <int DT, bool CAP>
struct Forward {
  template <typename... Args>
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, Args... args) {
    launch_forward<DT, CAP>(x, ids, f, args...);
  }
};

template <int DT, bool CAP>
struct Backward {
  static void run(const RowsView& x, LogitTransform f, const int64_t* ids, const float* lse, const float* entropy,
                  const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                  int64_t out_sb, int64_t out_st, cudaStream_t s) {
    launch_backward<DT, CAP>(x, ids, lse, entropy, grad_logp, grad_entropy, threshold, out, out_sb, out_st, f, s);
  }
};

void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, Truncation tr,
                      const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                      float* threshold_out, float* sum_pi_sq, uintptr_t stream) {
  if (x.N == 0) return;
  launch<Forward>(x, f, ids, with_entropy, tr, threshold_in, with_sum_pi_sq, logp, entropy, lse, threshold_out,
                  sum_pi_sq, as_stream(stream));
  check(cudaGetLastError(), "grpo_kernels logprobs_forward launch");
}

void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                       int64_t out_sb, int64_t out_st, LogitTransform f, uintptr_t stream) {
  if (x.N == 0) return;
  launch<Backward>(x, f, ids, lse, entropy, grad_logp, grad_entropy, threshold, out, out_sb, out_st,
                   as_stream(stream));
  check(cudaGetLastError(), "grpo_kernels logprobs_backward launch");
}

}  // namespace cuda
}  // namespace gk
