// CPU GRPO objective: gk::objective_sequence (grpo_math.h) for every sequence, in parallel.
#include "../kernels.h"

namespace gk {
namespace cpu {

// Below this many rows a pass runs on one thread (an OpenMP region would cost more than the work).
constexpr int64_t kParallelRows = int64_t{1} << 14;

void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi) {
#pragma omp parallel for schedule(static) if (args.row_hi - args.row_lo >= kParallelRows)
  for (int64_t b = seq_lo; b < seq_hi; ++b) objective_sequence(args, b);
}

}  // namespace cpu
}  // namespace gk
