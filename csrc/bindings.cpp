// pybind11 module over the CPU (and, with GK_WITH_CUDA, CUDA) kernels.
// Functions take raw pointers (Python ints from tensor.data_ptr()), sizes, strides, a dtype code
// (0 fp32, 1 bf16, 2 fp16) and, for CUDA, the stream handle. Nothing includes or links libtorch,
// so one build serves every torch version. Compiled twice by setup.py: as grpo_kernels._C (CPU)
// and as grpo_kernels._C_cuda (CUDA).
#include <pybind11/pybind11.h>

#include <string>

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

template <typename T>
T get(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("loss parameter missing: ") + key);
  return d[key].cast<T>();
}

gk::ObjectiveArgs objective_args(const py::dict& ptrs, const py::dict& params, int64_t row_lo, int64_t row_hi,
                                 bool adv_per_token, bool weights_per_seq) {
  auto opt_f = [&](const char* k) { return ptrs[k].is_none() ? nullptr : ptr<const float>(ptrs[k].cast<uintptr_t>()); };
  gk::ObjectiveArgs a{};
  a.logp = ptr<const float>(get<uintptr_t>(ptrs, "logp"));
  a.entropy = ptr<const float>(get<uintptr_t>(ptrs, "entropy"));
  a.mask = ptr<const uint8_t>(get<uintptr_t>(ptrs, "mask"));
  a.cu_seqlens = ptr<const int64_t>(get<uintptr_t>(ptrs, "cu_seqlens"));
  a.counts = ptr<const float>(get<uintptr_t>(ptrs, "counts"));
  a.adv = ptr<const float>(get<uintptr_t>(ptrs, "advantages"));
  a.old = opt_f("old");
  a.ref = opt_f("ref");
  a.sampling = opt_f("sampling");
  a.token_weights = opt_f("token_weights");
  a.keep_entropy = ptrs["keep_entropy"].is_none() ? nullptr : ptr<const uint8_t>(ptrs["keep_entropy"].cast<uintptr_t>());
  a.norm = ptr<const float>(get<uintptr_t>(ptrs, "norm"));
  a.ent_norm = ptr<const float>(get<uintptr_t>(ptrs, "ent_norm"));
  a.per_token_loss = ptr<float>(get<uintptr_t>(ptrs, "per_token_loss"));
  a.g_logp = ptr<float>(get<uintptr_t>(ptrs, "g_logp"));
  a.g_entropy = ptr<float>(get<uintptr_t>(ptrs, "g_entropy"));
  a.partials = ptr<float>(get<uintptr_t>(ptrs, "partials"));
  a.row_lo = row_lo;
  a.row_hi = row_hi;
  a.adv_per_token = adv_per_token ? 1 : 0;
  a.weights_per_seq = weights_per_seq ? 1 : 0;
  gk::LossParams& p = a.p;
  p.pg = get<int>(params, "pg");
  p.level = get<int>(params, "level");
  p.kl = get<int>(params, "kl");
  p.is_mode = get<int>(params, "is_mode");
  p.agg = get<int>(params, "agg");
  p.eps_low = get<float>(params, "eps_low");
  p.eps_high = get<float>(params, "eps_high");
  p.has_delta = get<int>(params, "has_delta");
  p.delta = get<float>(params, "delta");
  p.has_dual = get<int>(params, "has_dual");
  p.dual_clip = get<float>(params, "dual_clip");
  p.sapo_pos = get<float>(params, "sapo_pos");
  p.sapo_neg = get<float>(params, "sapo_neg");
  p.beta = get<float>(params, "beta");
  p.has_kl_clamp = get<int>(params, "has_kl_clamp");
  p.kl_clamp = get<float>(params, "kl_clamp");
  p.bias_corr = get<int>(params, "bias_corr");
  p.has_off_policy = get<int>(params, "has_off_policy");
  p.off_thresh = get<float>(params, "off_thresh");
  p.is_lo = get<float>(params, "is_lo");
  p.is_hi = get<float>(params, "is_hi");
  p.entropy_coef = get<float>(params, "entropy_coef");
  p.log_ratio_lo = get<float>(params, "log_ratio_lo");
  p.log_ratio_hi = get<float>(params, "log_ratio_hi");
  p.cispo_lo = get<float>(params, "cispo_lo");
  p.vespo_k_pos = get<float>(params, "vespo_k_pos");
  p.vespo_lambda_pos = get<float>(params, "vespo_lambda_pos");
  p.vespo_k_neg = get<float>(params, "vespo_k_neg");
  p.vespo_lambda_neg = get<float>(params, "vespo_lambda_neg");
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
  m.def("logprobs_forward",
        [](uintptr_t logits, int dtype, int64_t sb, int64_t st, int64_t T, int64_t N, int64_t V, uintptr_t ids,
           float scale, float cap, bool with_entropy, uintptr_t logp, uintptr_t entropy, uintptr_t lse GK_STREAM_ARG) {
          py::gil_scoped_release release;
          impl::logprobs_forward(rows(logits, dtype, sb, st, T, N, V), ptr<const int64_t>(ids), gk::LogitTransform{scale, cap},
                                 with_entropy, ptr<float>(logp), ptr<float>(entropy), ptr<float>(lse) GK_STREAM);
        });
  m.def("logprobs_backward",
        [](uintptr_t logits, int dtype, int64_t sb, int64_t st, int64_t T, int64_t N, int64_t V, uintptr_t ids,
           uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp, uintptr_t grad_entropy, uintptr_t out,
           int64_t out_sb, int64_t out_st, float scale, float cap GK_STREAM_ARG) {
          py::gil_scoped_release release;
          impl::logprobs_backward(rows(logits, dtype, sb, st, T, N, V), ptr<const int64_t>(ids),
                                  ptr<const float>(lse), ptr<const float>(entropy), ptr<const float>(grad_logp),
                                  grad_entropy ? ptr<const float>(grad_entropy) : nullptr,
                                  reinterpret_cast<void*>(out), out_sb, out_st, gk::LogitTransform{scale, cap} GK_STREAM);
        });
  m.def("objective",
        [](py::dict ptrs, py::dict params, int64_t row_lo, int64_t row_hi, int64_t seq_lo, int64_t seq_hi,
           bool adv_per_token, bool weights_per_seq GK_STREAM_ARG) {
          gk::ObjectiveArgs args = objective_args(ptrs, params, row_lo, row_hi, adv_per_token, weights_per_seq);
          py::gil_scoped_release release;
          impl::objective(args, seq_lo, seq_hi GK_STREAM);
        });
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
