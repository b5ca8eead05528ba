"""The per-token objective as torch.library custom ops, the same for every backend.

Each backend's `objective_pass` computes the per-token loss together with dL/dlogp and dL/dH;
`grpo_objective` returns the loss and hands those two gradients, scaled by the upstream
gradient, to the log-prob op's backward, which then sweeps the logits once. Tokens are packed
(N,) with cu_seqlens: padded batches are the special case cu_seqlens = arange(B+1)·T.
The parameters travel as the two halves of options.LossParams (int[] and float[]): plain
constants to torch.compile, rebuilt into the record by one tuple construction.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..options import METRICS, LossParams
from . import objective_inputs as io
from .dispatch import backend_module


@torch.library.custom_op("grpo_kernels::objective_pass", mutates_args=("outputs",))
def _objective_pass(inputs: List[Optional[Tensor]], outputs: List[Tensor], ranges: List[int], ints: List[int],
                    floats: List[float], backend: str) -> None:
    """inputs + outputs: the PreparedObjective buffers (options.OBJECTIVE_BUFFERS order, the last four
    written); ranges: (row_lo, row_hi, seq_lo, seq_hi, adv_per_token, weights_per_seq)."""
    row_lo, row_hi, seq_lo, seq_hi, adv_per_token, weights_per_seq = ranges
    prep = io.PreparedObjective.from_buffers(list(inputs) + list(outputs), bool(adv_per_token), bool(weights_per_seq))
    backend_module(backend).objective_pass(prep, LossParams.from_parts(ints, floats), (row_lo, row_hi),
                                           (seq_lo, seq_hi))


@_objective_pass.register_fake
def _(inputs, outputs, ranges, ints, floats, backend):
    return None


_NUM_OUTPUTS = 4  # per_token_loss, g_logp, g_entropy, partials


def objective_pass(prep: io.PreparedObjective, params: LossParams, backend: str, rows, seqs) -> None:
    """One pass of `backend`'s objective over rows [rows) of sequences [seqs), as a custom op:
    opaque to torch.compile, shape-only under FakeTensorMode."""
    buffers = prep.buffers()
    _objective_pass(buffers[:-_NUM_OUTPUTS], buffers[-_NUM_OUTPUTS:],
                    [*rows, *seqs, int(prep.adv_per_token), int(prep.weights_per_seq)], params.ints, params.floats,
                    backend)


@torch.library.custom_op("grpo_kernels::grpo_objective", mutates_args=())
def _grpo_objective(logp: Tensor, entropy: Tensor, others: List[Optional[Tensor]], layout: List[int],
                    ints: List[int], floats: List[float], backend: str
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """others: (mask, advantages, cu_seqlens, old, ref, sampling, is_weights, num_items);
    layout: (adv_per_token, weights_per_seq)."""
    mask, advantages, cu_seqlens, old, ref, sampling, is_weights, num_items = others
    params = LossParams.from_parts(ints, floats)
    prep = io.prepare(logp, entropy, mask, advantages, cu_seqlens, params, old_logp=old, ref_logp=ref,
                      sampling_logp=sampling, is_weights=is_weights, num_items_in_batch=num_items,
                      adv_per_token=bool(layout[0]), weights_per_seq=bool(layout[1]))
    backend_module(backend).objective_pass(prep, params, (0, prep.logp.numel()), (0, prep.num_sequences))
    loss, vector = io.finish(prep)
    return loss.clone(), prep.per_token_loss, prep.g_logp, prep.g_entropy, vector


@_grpo_objective.register_fake
def _(logp, entropy, others, layout, ints, floats, backend):
    per_token = lambda: torch.empty_like(logp)  # noqa: E731
    return logp.new_empty(()), per_token(), per_token(), per_token(), logp.new_empty(len(METRICS))


def _setup_context(ctx, inputs, output):
    _, _, g_logp, g_ent, _ = output
    ctx.save_for_backward(g_logp, g_ent)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    g_logp, g_ent = ctx.saved_tensors
    return g_logp * grad_loss, g_ent * grad_loss, None, None, None, None, None


_grpo_objective.register_autograd(_backward, setup_context=_setup_context)


def fused_objective(logp, entropy, mask, advantages, cu_seqlens, params: LossParams, backend, *, adv_per_token,
                    weights_per_seq, old_logp=None, ref_logp=None, sampling_logp=None, is_weights=None,
                    num_items_in_batch=None):
    """Packed (N,) logp, entropy, mask (bool) and per-token inputs, cu_seqlens (B+1,), advantages (B,)
    or (N,), is_weights (N,) or (B,) -> (loss, per_token_loss (N,), metrics dict); the loss is
    differentiable w.r.t. logp and entropy, its gradient computed by the backend's objective op."""
    num_items = None
    if num_items_in_batch is not None:
        num_items = torch.as_tensor(num_items_in_batch, dtype=logp.dtype, device=logp.device).reshape(())
    loss, per_token, _, _, vector = _grpo_objective(
        logp, entropy, [mask, advantages, cu_seqlens, old_logp, ref_logp, sampling_logp, is_weights, num_items],
        [int(adv_per_token), int(weights_per_seq)], params.ints, params.floats, backend)
    return loss, per_token, io.metrics_from_vector(vector, params)
