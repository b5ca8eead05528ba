// CUDA GRPO objective: one thread block per sequence of the pass. Its threads stride over the
// sequence's rows (thread t takes rows lo + t, lo + t + blockDim, ...: neighbouring threads read
// neighbouring rows, so the loads coalesce) and merge their fp64 sums by block tree reductions, so
// that a few long sequences still fill the GPU. The passes are grpo_math.h's objective_sequence_by,
// the same code the CPU build runs as a team of one: pass 1 (sequence sums) and its reduction,
// pass 2 (tokens) and its reduction (the ratio's max a max-reduction), GSPO's pass 3 after it.
// It reads and writes O(rows) floats, nothing of size V.
#include "../kernels.h"
#include "common.cuh"

namespace gk {
namespace cuda {
namespace {

// The thread block as objective_sequence_by's team (grpo_math.h). Each reduction ends with every
// thread holding the merged value (block_reduce's __syncthreads make the block's earlier global
// writes visible to it too, which pass 3 does not need: each thread revisits its own rows).
struct BlockTeam {
  template <typename F, typename Merge>
  __device__ __forceinline__ auto reduce(F f, Merge merge) const -> decltype(f(0, 1)) {
    using T = decltype(f(0, 1));
    return block_reduce(f(threadIdx.x, blockDim.x), T{}, merge);
  }
  template <typename F>
  __device__ __forceinline__ void for_each(F f) const {
    f(threadIdx.x, blockDim.x);
  }
  __device__ __forceinline__ bool leader() const { return threadIdx.x == 0; }
};

__global__ void objective_kernel(ObjectiveArgs args, int64_t seq_lo) {
  objective_sequence_by(args, seq_lo + static_cast<int64_t>(blockIdx.x), BlockTeam{});
}

// Threads per block: enough for the average sequence of the pass to give each thread a few rows,
// a multiple of the warp (block_reduce), at most kMaxThreads (its reductions' shared memory and
// registers stay small; 256 threads already cover a 16k-token sequence in 64 strides).
constexpr int kMaxThreads = 256;

int threads_for(int64_t rows, int64_t num_sequences) {
  const int64_t per_sequence = (rows + num_sequences - 1) / num_sequences;
  int threads = kWarp;
  while (threads < kMaxThreads && threads < per_sequence) threads *= 2;
  return threads;
}

}  // namespace

void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi, uintptr_t stream) {
  const int64_t num_sequences = seq_hi - seq_lo;
  if (num_sequences <= 0) return;
  if (num_sequences > 0x7FFFFFFF) throw std::invalid_argument("grpo_kernels objective: over 2^31 sequences in a pass");
  const int threads = threads_for(args.row_hi - args.row_lo, num_sequences);
  objective_kernel<<<static_cast<unsigned>(num_sequences), threads, 0, as_stream(stream)>>>(args, seq_lo);
  check(cudaGetLastError(), "grpo_kernels objective launch");
}

}  // namespace cuda
}  // namespace gk
