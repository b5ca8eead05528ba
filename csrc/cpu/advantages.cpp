// CPU group advantages (see advantages_math.h): groups in parallel, then one pass over rows.
#include "../advantages_math.h"
#include "../kernels.h"

namespace gk {
namespace cpu {

// Below this many rows the call runs on one thread (an OpenMP region would cost more than the work).
constexpr int64_t kParallelRows = int64_t{1} << 14;

void group_advantages(const float* total, const int64_t* order, const int64_t* offsets, const int64_t* group,
                      float* adv, float* mean, float* std, float* count, int8_t* constant, int64_t n,
                      int64_t num_groups, float eps, int mode) {
#pragma omp parallel for schedule(static) if (n >= kParallelRows)
  for (int64_t g = 0; g < num_groups; ++g) {
    SegmentStats s = segment_stats(total, order, offsets[g], offsets[g + 1]);
    mean[g] = s.mean;
    std[g] = s.std;
    count[g] = s.count;
    constant[g] = s.constant ? 1 : 0;
  }
  float b_mean, b_std;  // one serial pass: every row, nothing to combine
  batch_stats(total, group, mean, n, mode, 0, 1, [](float x) { return x; }, &b_mean, &b_std);
#pragma omp parallel for schedule(static) if (n >= kParallelRows)
  for (int64_t i = 0; i < n; ++i) {
    int64_t g = group[i];
    adv[i] = advantage_of(total[i], mean[g], std[g], count[g], constant[g] != 0, b_mean, b_std, eps, mode);
  }
}

}  // namespace cpu
}  // namespace gk
