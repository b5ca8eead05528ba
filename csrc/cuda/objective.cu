// CUDA GRPO objective: one thread per sequence runs gk::objective_sequence (grpo_math.h), the
// same code as the CPU build. It reads O(B·T) floats, nothing of size V.
#include "../kernels.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

__global__ void objective_kernel(ObjectiveArgs args, int64_t num_sequences) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b < num_sequences) objective_sequence(args, b);
}

}  // namespace

void objective(const ObjectiveArgs& args, int64_t num_sequences, uintptr_t stream) {
  if (num_sequences == 0) return;
  const int threads = 64;
  const unsigned blocks = static_cast<unsigned>((num_sequences + threads - 1) / threads);
  objective_kernel<<<blocks, threads, 0, as_stream(stream)>>>(args, num_sequences);
  check(cudaGetLastError(), "grpo_kernels objective launch");
}

}  // namespace cuda
}  // namespace gk
