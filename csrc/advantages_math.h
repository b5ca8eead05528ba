// Group-relative advantages, shared by the CPU build and a single CUDA thread block.
// mode: 0 group, 1 batch, 2 none, 3 rloo, 4 reinforce++, 5 gdpo (batch z-score, no centring).
// Rows are visited through `order` (a stable sort by group) and `offsets` (group boundaries).
#pragma once

#include "grpo_math.h"

namespace gk {

struct SegmentStats {
  float count, mean, std;
  bool constant;
};

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
  float mean = acc / fmaxf(count, 1.f), sq = 0.f;
  for (int64_t i = start; i < end; ++i) {
    float v = total[order[i]];
    if (v == v) sq += (v - mean) * (v - mean);
  }
  float std = count > 1.f ? sqrtf(sq / fmaxf(count - 1.f, 1.f)) : 0.f;
  return {count, mean, std, count < 2.f || lo == hi};
}

// Mean and Bessel std over all rows of total, or of total minus its group's mean.
GK_HD void batch_stats(const float* total, const int64_t* group, const float* mean, int64_t n, bool centred,
                       float* out_mean, float* out_std) {
  float count = 0.f, acc = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = total[i] - (centred ? mean[group[i]] : 0.f);
    if (v != v) continue;
    count += 1.f;
    acc += v;
  }
  float m = acc / fmaxf(count, 1.f), sq = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float v = total[i] - (centred ? mean[group[i]] : 0.f);
    if (v == v) sq += (v - m) * (v - m);
  }
  *out_mean = m;
  *out_std = count > 1.f ? sqrtf(sq / fmaxf(count - 1.f, 1.f)) : 0.f;
}

GK_HD float advantage_of(float v, float g_mean, float g_std, float g_count, bool constant, float b_mean,
                         float b_std, float eps, int mode) {
  float centred = v - g_mean, adv;
  switch (mode) {
    case 0: adv = centred / (g_std + eps); break;
    case 1: adv = centred / (b_std + eps); break;
    case 3: adv = centred * g_count / fmaxf(g_count - 1.f, 1.f); break;
    case 4: adv = (centred - b_mean) / (b_std + eps); break;
    case 5: adv = (v - b_mean) / (b_std + eps); break;
    default: adv = centred;
  }
  return (constant || adv != adv) ? 0.f : adv;
}

}  // namespace gk
