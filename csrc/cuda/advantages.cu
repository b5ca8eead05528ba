// CUDA group advantages in one launch of one block: groups in parallel over threads, batch
// statistics with block reductions (fixed order, deterministic), then one pass over rows. The
// formulas, and the loops of the batch statistics, are advantages_math.h's.
#include "../advantages_math.h"
#include "../kernels.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

constexpr int kThreads = 512;

__global__ void __launch_bounds__(kThreads) advantages_kernel(const float* total, const int64_t* order,
                                                              const int64_t* offsets, const int64_t* group,
                                                              float* adv, float* mean, float* std, float* count,
                                                              int8_t* constant, int64_t n, int64_t num_groups,
                                                              float eps, int mode) {
  for (int64_t g = threadIdx.x; g < num_groups; g += blockDim.x) {
    SegmentStats s = segment_stats(total, order, offsets[g], offsets[g + 1]);
    mean[g] = s.mean;
    std[g] = s.std;
    count[g] = s.count;
    constant[g] = s.constant ? 1 : 0;
  }
  __syncthreads();
  float b_mean, b_std;  // each thread takes every blockDim.x-th row, block_sum combines them
  batch_stats(total, group, mean, n, mode, threadIdx.x, blockDim.x, [](float x) { return block_sum(x); }, &b_mean,
              &b_std);
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    int64_t g = group[i];
    adv[i] = advantage_of(total[i], mean[g], std[g], count[g], constant[g] != 0, b_mean, b_std, eps, mode);
  }
}

}  // namespace

void group_advantages(const float* total, const int64_t* order, const int64_t* offsets, const int64_t* group,
                      float* adv, float* mean, float* std, float* count, int8_t* constant, int64_t n,
                      int64_t num_groups, float eps, int mode, uintptr_t stream) {
  advantages_kernel<<<1, kThreads, 0, as_stream(stream)>>>(total, order, offsets, group, adv, mean, std, count,
                                                           constant, n, num_groups, eps, mode);
  check(cudaGetLastError(), "grpo_kernels group_advantages launch");
}

}  // namespace cuda
}  // namespace gk
