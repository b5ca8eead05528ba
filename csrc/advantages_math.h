// Group-relative advantages: the single C++ source of their formulas, used by the CPU build
// (csrc/cpu/advantages.cpp) and by one CUDA thread block (csrc/cuda/advantages.cu).
// mode: an AdvantageMode of options.h (ADV_GDPO: the batch z-score of normalize_then_sum, no centring).
// Rows are visited through `order` (a stable sort by group) and `offsets` (group boundaries).
#pragma once

#include "grpo_math.h"

namespace gk {

// Mean of `count` values from their sum (0 for none).
GK_HD float mean_of(float sum, float count) { return sum / fmaxf(count, 1.f); }

// Bessel-corrected std from the sum of squared deviations sq of `count` values (0 below 2).
GK_HD float bessel_std(float sq, float count) { return count > 1.f ? sqrtf(sq / fmaxf(count - 1.f, 1.f)) : 0.f; }

struct SegmentStats {
  float count, mean, std;
  bool constant;
};

// Statistics of one group, rows order[start..end), NaN totals skipped.
GK_HD SegmentStats segment_stats(const float* total, const int64_t* order, int64_t start, int64_t end) {
  float count = 0.f, acc = 0.f, lo = INFINITY, hi = -INFINITY;
  for (int64_t i = start; i < end; ++i) {
    float v = total[order[i]];
    if (v != v) continue;
    count += 1.f;
    acc += v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  float mean = mean_of(acc, count), sq = 0.f;
  for (int64_t i = start; i < end; ++i) {
    float v = total[order[i]];
    if (v == v) sq += (v - mean) * (v - mean);
  }
  return {count, mean, bessel_std(sq, count), count < 2.f || lo == hi};
}

// Mean and Bessel std over all rows, for the modes that scale by batch statistics (1, 4, 5;
// 0, 0 for the others): of the totals, or for reinforce++ (4) of the totals minus their group's
// mean. NaN values are skipped. The caller visits rows first, first + step, ... and sum(x) adds x
// over all callers: (0, 1, the identity) on the CPU, (threadIdx.x, blockDim.x, a block sum) for
// the threads of a CUDA block, so the loops are written once. mode is the same for all callers,
// so they all return early or all reach sum.
template <typename Sum>
GK_HD void batch_stats(const float* total, const int64_t* group, const float* mean, int64_t n, int mode,
                       int64_t first, int64_t step, Sum sum, float* out_mean, float* out_std) {
  *out_mean = 0.f;
  *out_std = 0.f;
  if (mode != ADV_BATCH && mode != ADV_REINFORCE_PP && mode != ADV_GDPO) return;
  const bool centred = mode == ADV_REINFORCE_PP;
  auto value = [&](int64_t i) { return total[i] - (centred ? mean[group[i]] : 0.f); };
  float count = 0.f, acc = 0.f;
  for (int64_t i = first; i < n; i += step) {
    const float v = value(i);
    if (v != v) continue;
    count += 1.f;
    acc += v;
  }
  count = sum(count);
  const float m = mean_of(sum(acc), count);
  float sq = 0.f;
  for (int64_t i = first; i < n; i += step) {
    const float v = value(i);
    if (v == v) sq += (v - m) * (v - m);
  }
  *out_mean = m;
  *out_std = bessel_std(sum(sq), count);
}

GK_HD float advantage_of(float v, float g_mean, float g_std, float g_count, bool constant, float b_mean,
                         float b_std, float eps, int mode) {
  float centred = v - g_mean, adv;
  switch (mode) {
    case ADV_GROUP: adv = centred / (g_std + eps); break;
    case ADV_BATCH: adv = centred / (b_std + eps); break;
    case ADV_RLOO: adv = centred * g_count / fmaxf(g_count - 1.f, 1.f); break;
    case ADV_REINFORCE_PP: adv = (centred - b_mean) / (b_std + eps); break;
    case ADV_GDPO: adv = (v - b_mean) / (b_std + eps); break;
    default: adv = centred;
  }
  return (constant || adv != adv) ? 0.f : adv;
}

}  // namespace gk
