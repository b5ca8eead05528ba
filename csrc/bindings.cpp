// pybind11 module over the CPU (and, with GK_WITH_CUDA, CUDA) kernels.
// Functions take raw pointers (Python ints from tensor.data_ptr()), sizes, strides, a dtype code
// (0 fp32, 1 bf16, 2 fp16) and, for CUDA, the stream handle. Nothing includes or links libtorch,
// so one build serves every torch version. Compiled twice by setup.py: as grpo_kernels._C (CPU)
// and as grpo_kernels._C_cuda (CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

#ifndef GK_MODULE_NAME
#define GK_MODULE_NAME _C
#endif

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

gk::RowsView rows(uintptr_t logits, int dtype, int64_t stride_b, int64_t stride_t, int64_t T, int64_t N, int64_t V) {
  if (dtype < 0 || dtype > 2) throw std::invalid_argument("dtype code must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  return gk::RowsView{reinterpret_cast<const void*>(logits), dtype, stride_b, stride_t, T, N, V};
}

// The objective's arguments from the Python side's lists: the buffer addresses in
// options.OBJECTIVE_BUFFERS order (0 for an absent optional buffer) and options.LossParams as its
// integer and float halves. The struct layouts are generated (options.h), so nothing is named here.
gk::ObjectiveArgs objective_args(const std::vector<uintptr_t>& buffers, const std::vector<int64_t>& ints,
                                 const std::vector<double>& floats, int64_t row_lo, int64_t row_hi,
                                 bool adv_per_token, bool weights_per_seq) {
  if (buffers.size() != gk::NUM_OBJECTIVE_BUFFERS || ints.size() != gk::NUM_LOSS_INT_FIELDS ||
      floats.size() != gk::NUM_LOSS_FLOAT_FIELDS)
    throw std::invalid_argument("objective: buffer or parameter count does not match options.h (rebuild)");
  gk::ObjectiveArgs a{};
  static_cast<gk::ObjectiveBuffers&>(a) = gk::objective_buffers_from(buffers.data());
  a.p = gk::loss_params_from(ints.data(), floats.data());
  a.row_lo = row_lo;
  a.row_hi = row_hi;
  a.adv_per_token = adv_per_token ? 1 : 0;
  a.weights_per_seq = weights_per_seq ? 1 : 0;
  return a;
}

}  // namespace

PYBIND11_MODULE(GK_MODULE_NAME, m) {
  m.doc() = "grpo_kernels native kernels (raw pointers, no libtorch)";
#ifdef GK_WITH_CUDA
  namespace impl = gk::cuda;
  m.attr("device") = "cuda";
#define GK_STREAM , stream
#define GK_STREAM_ARG , uintptr_t stream
#else
  namespace impl = gk::cpu;
  m.attr("device") = "cpu";
#define GK_STREAM
#define GK_STREAM_ARG , uintptr_t /*stream*/
#endif
  // threshold_in 0: no given threshold (searched when truncation is on); top_k 0, top_p 1 and
  // log_min_p −inf mean off.
  m.def("logprobs_forward",
        [](uintptr_t logits, int dtype, int64_t sb, int64_t st, int64_t T, int64_t N, int64_t V, uintptr_t ids,
           float scale, float cap, bool with_entropy, int64_t top_k, float top_p, float log_min_p,
           uintptr_t threshold_in, bool with_sum_pi_sq, uintptr_t logp, uintptr_t entropy, uintptr_t lse,
           uintptr_t threshold_out, uintptr_t sum_pi_sq GK_STREAM_ARG) {
          py::gil_scoped_release release;
          impl::logprobs_forward(rows(logits, dtype, sb, st, T, N, V), ptr<const int64_t>(ids),
                                 gk::LogitTransform{scale, cap}, with_entropy, gk::Truncation{top_k, top_p, log_min_p},
                                 threshold_in ? ptr<const float>(threshold_in) : nullptr, with_sum_pi_sq,
                                 ptr<float>(logp), ptr<float>(entropy), ptr<float>(lse), ptr<float>(threshold_out),
                                 ptr<float>(sum_pi_sq) GK_STREAM);
        });
  m.def("logprobs_backward",
        [](uintptr_t logits, int dtype, int64_t sb, int64_t st, int64_t T, int64_t N, int64_t V, uintptr_t ids,
           uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t threshold,
           uintptr_t out, int64_t out_sb, int64_t out_st, float scale, float cap GK_STREAM_ARG) {
          py::gil_scoped_release release;
          impl::logprobs_backward(rows(logits, dtype, sb, st, T, N, V), ptr<const int64_t>(ids),
                                  ptr<const float>(lse), ptr<const float>(entropy), ptr<const float>(grad_logp),
                                  grad_entropy ? ptr<const float>(grad_entropy) : nullptr,
                                  threshold ? ptr<const float>(threshold) : nullptr, reinterpret_cast<void*>(out),
                                  out_sb, out_st, gk::LogitTransform{scale, cap} GK_STREAM);
        });
  m.def("objective",
        [](const std::vector<uintptr_t>& buffers, const std::vector<int64_t>& ints, const std::vector<double>& floats,
           int64_t row_lo, int64_t row_hi, int64_t seq_lo, int64_t seq_hi, bool adv_per_token,
           bool weights_per_seq GK_STREAM_ARG) {
          gk::ObjectiveArgs args =
              objective_args(buffers, ints, floats, row_lo, row_hi, adv_per_token, weights_per_seq);
          py::gil_scoped_release release;
          impl::objective(args, seq_lo, seq_hi GK_STREAM);
        });
#ifndef GK_WITH_CUDA
  m.def("objective_block_emulation",
        [](const std::vector<uintptr_t>& buffers, const std::vector<int64_t>& ints, const std::vector<double>& floats,
           int64_t row_lo, int64_t row_hi, int64_t seq_lo, int64_t seq_hi, bool adv_per_token, bool weights_per_seq,
           int threads) {
          gk::ObjectiveArgs args =
              objective_args(buffers, ints, floats, row_lo, row_hi, adv_per_token, weights_per_seq);
          py::gil_scoped_release release;
          gk::cpu::objective_block_emulation(args, seq_lo, seq_hi, threads);
        },
        "Tests only: the CUDA objective's block algorithm emulated on the CPU (see csrc/cpu/objective.cpp).");
  m.def("whole_row_fallbacks", &gk::cpu::whole_row_fallbacks,
        "Tests only: rows whose top-k search re-histogrammed the whole row (the sample misplaced the boundary).");
#endif
  m.def("group_advantages",
        [](uintptr_t total, uintptr_t order, uintptr_t offsets, uintptr_t group, uintptr_t adv, uintptr_t mean,
           uintptr_t std, uintptr_t count, uintptr_t constant, int64_t n, int64_t num_groups, float eps,
           int mode GK_STREAM_ARG) {
          py::gil_scoped_release release;
          impl::group_advantages(ptr<const float>(total), ptr<const int64_t>(order), ptr<const int64_t>(offsets),
                                 ptr<const int64_t>(group), ptr<float>(adv), ptr<float>(mean), ptr<float>(std),
                                 ptr<float>(count), ptr<int8_t>(constant), n, num_groups, eps, mode GK_STREAM);
        });
}
