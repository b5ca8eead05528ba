// Helpers shared by the CUDA kernels: launch checks and block reductions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
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

// __shfl_xor_sync of a value made of 32-bit words (a float, or a struct of floats such as
// logprob_math.h's RowStats<float>), word by word; the copies stay in registers.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int offset) {
  static_assert(sizeof(T) % sizeof(uint32_t) == 0, "shfl_xor moves 32-bit words");
  constexpr int kWords = sizeof(T) / sizeof(uint32_t);
  uint32_t w[kWords];
  memcpy(w, &v, sizeof(T));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(0xffffffffu, w[i], offset);
  memcpy(&v, w, sizeof(T));
  return v;
}

// op-reduction over the block (an xor butterfly in each warp, then over the warps' results);
// every thread gets the result. A fixed reduction order: deterministic. identity is op's neutral
// element; blockDim.x a multiple of 32, <= 1024. T must be trivially constructible (__shared__).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, T identity, Op op) {
  __shared__ T partial[32];
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  __syncthreads();  // a previous call's reads of partial are done
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : identity;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

// Sum over the block, every thread gets it.
static __device__ float block_sum(float v) {
  return block_reduce(v, 0.f, [](float a, float b) { return a + b; });
}

}  // namespace cuda
}  // namespace gk
