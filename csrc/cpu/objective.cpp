// CPU GRPO objective: gk::objective_sequence (grpo_math.h) for every sequence, in parallel.
#include "../kernels.h"

namespace gk {
namespace cpu {

void objective(const ObjectiveArgs& args, int64_t num_sequences) {
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < num_sequences; ++b) objective_sequence(args, b);
}

}  // namespace cpu
}  // namespace gk
