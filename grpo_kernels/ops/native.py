"""The compiled csrc/ extensions as a backend: tensors in, raw pointers, sizes and strides out.

`NativeKernels(module)` wraps grpo_kernels._C (CPU, backend="cpp") or grpo_kernels._C_cuda
(CUDA, backend="cuda") with the same interface as the torch and Triton backends. The extension
does not link libtorch; this file is the only place that turns tensors into pointers.
"""
from __future__ import annotations

import torch

from ..options import AdvantageMode, LossParams
from ..truncation import NO_TRUNCATION
from . import objective_inputs as io

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


class NativeKernels:
    def __init__(self, module):
        self.module = module
        self.on_cuda = module.device == "cuda"

    def _stream(self, t: torch.Tensor):
        return (torch.cuda.current_stream(t.device).cuda_stream,) if self.on_cuda else (0,)

    def _rows(self, logits: torch.Tensor):
        x = _as_3d(logits)
        return x, (x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), x.stride(1), x.shape[1], x.shape[0] * x.shape[1],
                   x.shape[2])

    def logprobs_forward(self, logits, ids, transform, with_entropy=True, truncation=NO_TRUNCATION, threshold=None,
                         with_sum_pi_sq=False):
        """(logp, entropy, lse, threshold, sum_pi_sq), each (N,) fp32: ops/contract.py. The threshold
        (raw logit units) is `threshold` when given, searched per row when truncation.active, else −inf."""
        x, view = self._rows(logits)
        n = view[5]
        logp = torch.empty(n, dtype=torch.float32, device=x.device)
        entropy, lse, threshold_out, sum_pi_sq = (torch.empty_like(logp) for _ in range(4))
        ids = ids.reshape(-1).long().contiguous()
        given = None if threshold is None else threshold.reshape(-1).float().contiguous()
        self.module.logprobs_forward(*view, ids.data_ptr(), *transform, bool(with_entropy), int(truncation.top_k),
                                     float(truncation.top_p), float(truncation.log_min_p),
                                     0 if given is None else given.data_ptr(), bool(with_sum_pi_sq), logp.data_ptr(),
                                     entropy.data_ptr(), lse.data_ptr(), threshold_out.data_ptr(),
                                     sum_pi_sq.data_ptr(), *self._stream(x))
        return logp, entropy, lse, threshold_out, sum_pi_sq

    def logprobs_backward(self, logits, ids, lse, entropy, grad_logp, grad_entropy, transform, out, threshold=None):
        x, view = self._rows(logits)
        target = _as_3d(out)
        work = target if target.dtype == x.dtype and target.stride(-1) == 1 else torch.empty_like(x)
        ids = ids.reshape(-1).long().contiguous()
        lse, entropy, g, gh, thr = [None if t is None else t.reshape(-1).float().contiguous()
                                    for t in (lse, entropy, grad_logp, grad_entropy, threshold)]
        self.module.logprobs_backward(*view, ids.data_ptr(), lse.data_ptr(), entropy.data_ptr(), g.data_ptr(),
                                      0 if gh is None else gh.data_ptr(), 0 if thr is None else thr.data_ptr(),
                                      work.data_ptr(), work.stride(0), work.stride(1), *transform,
                                      *self._stream(x))
        if work is not target:
            target.copy_(work)
        return out

    def objective_pass(self, prep: io.PreparedObjective, params: LossParams, rows, seqs):
        """Fill prep's outputs for rows [rows) of sequences [seqs) (see objective_inputs)."""
        buffers = [0 if t is None else t.data_ptr() for t in prep.buffers()]
        self.module.objective(buffers, params.ints, params.floats, *rows, *seqs, prep.adv_per_token,
                              prep.weights_per_seq, *self._stream(prep.logp))

    def group_advantages(self, total, group_index, num_groups, scale_rewards, eps, group_size=None):
        total = total.float().contiguous()
        n = total.numel()
        order, offsets = io.group_layout(group_index, num_groups, group_size, n, total.device)
        group_index = group_index.long().contiguous()
        adv = torch.empty_like(total)
        mean = torch.empty(num_groups, dtype=torch.float32, device=total.device)
        std, count = torch.empty_like(mean), torch.empty_like(mean)
        constant = torch.empty(num_groups, dtype=torch.int8, device=total.device)
        self.module.group_advantages(total.data_ptr(), order.data_ptr(), offsets.data_ptr(), group_index.data_ptr(),
                                     adv.data_ptr(), mean.data_ptr(), std.data_ptr(), count.data_ptr(),
                                     constant.data_ptr(), n, num_groups, float(eps),
                                     AdvantageMode.parse(scale_rewards), *self._stream(total))
        return adv, mean, std, constant.bool()
