// Helpers shared by the CUDA kernels: launch checks, vector loads and block reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../grpo_math.h"

namespace gk {
namespace cuda {

inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

constexpr int kWarp = 32;

// Online softmax state of a set of values z: m = max z, s = Σ exp(z − m), t = Σ exp(z − m)·(z − m).
// t is kept relative to the max so that the entropy log s − t/s has no cancellation for large z.
struct Online {
  float m, s, t;
};

__device__ __forceinline__ Online online_merge(Online a, Online b) {
  float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f, 0.f};
  float ca = a.m == -INFINITY ? 0.f : expf(a.m - m);
  float cb = b.m == -INFINITY ? 0.f : expf(b.m - m);
  float ta = a.s > 0.f ? ca * (a.t + a.s * (a.m - m)) : 0.f;
  float tb = b.s > 0.f ? cb * (b.t + b.s * (b.m - m)) : 0.f;
  return {m, a.s * ca + b.s * cb, ta + tb};
}

__device__ __forceinline__ void online_add(Online& o, float z) {
  if (z == -INFINITY) return;
  if (z > o.m) {
    float c = o.m == -INFINITY ? 0.f : expf(o.m - z);
    o.t = o.s > 0.f ? c * (o.t + o.s * (o.m - z)) : 0.f;  // the new element adds e·(z − m) = 0
    o.s = o.s * c + 1.f;
    o.m = z;
  } else {
    float d = z - o.m;
    float e = expf(d);
    o.s += e;
    o.t += e * d;
  }
}

// Every thread gets the merged state of the block (blockDim.x a multiple of 32, <= 1024).
static __device__ Online block_merge(Online o) {
  __shared__ Online partial[32];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Online other{__shfl_xor_sync(0xffffffffu, o.m, offset), __shfl_xor_sync(0xffffffffu, o.s, offset),
                 __shfl_xor_sync(0xffffffffu, o.t, offset)};
    o = online_merge(o, other);
  }
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) partial[warp] = o;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  o = lane < warps ? partial[lane] : Online{-INFINITY, 0.f, 0.f};
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    Online other{__shfl_xor_sync(0xffffffffu, o.m, offset), __shfl_xor_sync(0xffffffffu, o.s, offset),
                 __shfl_xor_sync(0xffffffffu, o.t, offset)};
    o = online_merge(o, other);
  }
  return o;
}

// Sum over the block, every thread gets it (fixed reduction order: deterministic).
static __device__ float block_sum(float v) {
  __shared__ float partial[32];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : 0.f;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace gk
