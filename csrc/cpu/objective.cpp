// CPU GRPO objective: gk::objective_sequence (grpo_math.h) for every sequence, in parallel.
#include "../kernels.h"

namespace gk {
namespace cpu {

void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi) {
#pragma omp parallel for schedule(static)
  for (int64_t b = seq_lo; b < seq_hi; ++b) objective_sequence(args, b);
}

}  // namespace cpu
}  // namespace gk
