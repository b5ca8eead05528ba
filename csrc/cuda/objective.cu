// CUDA GRPO objective: one thread per sequence of the pass runs gk::objective_sequence (grpo_math.h), the
// same code as the CPU build. It reads O(B·T) floats, nothing of size V.
#include "../kernels.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

__global__ void objective_kernel(ObjectiveArgs args, int64_t seq_lo, int64_t seq_hi) {
  const int64_t b = seq_lo + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < seq_hi) objective_sequence(args, b);
}

}  // namespace

void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi, uintptr_t stream) {
  const int64_t num_sequences = seq_hi - seq_lo;
  if (num_sequences <= 0) return;
  const int threads = 64;
  const unsigned blocks = static_cast<unsigned>((num_sequences + threads - 1) / threads);
  objective_kernel<<<blocks, threads, 0, as_stream(stream)>>>(args, seq_lo, seq_hi);
  check(cudaGetLastError(), "grpo_kernels objective launch");
}

}  // namespace cuda
}  // namespace gk
