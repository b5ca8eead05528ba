// Declarations of the CPU and CUDA entry points that bindings.cpp exposes to Python.
// Every function takes raw pointers, sizes, strides and a dtype code (gk::DType); nothing here
// includes or links libtorch, so one build serves every torch version.
#pragma once

#include <cstdint>

#include "logprob_math.h"

namespace gk {

// Log-probs over rows of logits laid out as (B, T, V) with strides (stride_b, stride_t, 1);
// row r is (r / T, r % T). Packed (N, V) logits are (1, N, V).
struct RowsView {
  const void* logits;
  int dtype;
  int64_t stride_b, stride_t, T, N, V;
};

namespace cpu {
// Log-probs over the kept set K = {z >= threshold} ∪ {target} of each row (grpo_kernels/ops/contract.py):
// threshold_in (N,) given, or nullptr: searched per row when tr.active(), else −inf (every entry).
// Writes logp, entropy (0 without with_entropy), lse, threshold_out (as used) and sum_pi_sq
// (Σ_K p², 0 without with_sum_pi_sq), each (N,) fp32.
void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, Truncation tr,
                      const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                      float* threshold_out, float* sum_pi_sq);
// dL/dlogits; threshold (N,) or nullptr (every entry kept): p = 0, so the gradient is 0, outside K.
void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                       int64_t out_stride_b, int64_t out_stride_t, LogitTransform f);
void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi);
// Tests only: the CUDA objective's block algorithm (a block of `threads` threads per sequence,
// its reductions in the block's order) run on the CPU, to check the decomposition without a GPU.
void objective_block_emulation(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi, int threads);
// Tests only: rows whose top-k search histogrammed the whole row because the sample misplaced the
// boundary (csrc/cpu/logprobs.cpp, search_threshold), since the module was loaded.
int64_t whole_row_fallbacks();
void group_advantages(const float* total, const int64_t* order, const int64_t* offsets, const int64_t* group,
                      float* adv, float* mean, float* std, float* count, int8_t* constant, int64_t n,
                      int64_t num_groups, float eps, int mode);
}  // namespace cpu

namespace cuda {
void logprobs_forward(const RowsView& x, const int64_t* ids, LogitTransform f, bool with_entropy, Truncation tr,
                      const float* threshold_in, bool with_sum_pi_sq, float* logp, float* entropy, float* lse,
                      float* threshold_out, float* sum_pi_sq, uintptr_t stream);
void logprobs_backward(const RowsView& x, const int64_t* ids, const float* lse, const float* entropy,
                       const float* grad_logp, const float* grad_entropy, const float* threshold, void* out,
                       int64_t out_stride_b, int64_t out_stride_t, LogitTransform f, uintptr_t stream);
void objective(const ObjectiveArgs& args, int64_t seq_lo, int64_t seq_hi, uintptr_t stream);
void group_advantages(const float* total, const int64_t* order, const int64_t* offsets, const int64_t* group,
                      float* adv, float* mean, float* std, float* count, int8_t* constant, int64_t n,
                      int64_t num_groups, float eps, int mode, uintptr_t stream);
}  // namespace cuda

}  // namespace gk
