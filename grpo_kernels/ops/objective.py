"""The per-token objective as dispatcher ops (ops/library.py), the same for every backend.

Each backend's `objective_pass` computes the per-token loss together with dL/dlogp and dL/dH;
`grpo_objective` returns the loss and hands those two gradients, scaled by the upstream
gradient, to the log-prob op's backward, which then sweeps the logits once. Tokens are packed
(N,) with cu_seqlens: padded batches are the special case cu_seqlens = arange(B+1)·T.
The parameters travel as the two halves of options.LossParams (int[] and float[]): plain
constants to torch.compile, rebuilt into the record by one tuple construction.
"""
from __future__ import annotations

import torch

from ..options import METRICS, LossParams
from . import objective_inputs as io
from .dispatch import backend_module
from .library import define
from .normalizers import scalar_tensor


@define("objective_pass(Tensor?[] inputs, Tensor(a!)[] outputs, int[] ranges, int[] ints, float[] floats, "
        "str backend) -> ()", lambda *_: None)
def _objective_pass(inputs, outputs, ranges, ints, floats, backend):
    """inputs + outputs: the PreparedObjective buffers (options.OBJECTIVE_BUFFERS order, the last four
    written); ranges: (row_lo, row_hi, seq_lo, seq_hi, adv_per_token, weights_per_seq)."""
    row_lo, row_hi, seq_lo, seq_hi, adv_per_token, weights_per_seq = ranges
    prep = io.PreparedObjective.from_buffers(list(inputs) + list(outputs), bool(adv_per_token), bool(weights_per_seq))
    backend_module(backend).objective_pass(prep, LossParams.from_parts(ints, floats), (row_lo, row_hi),
                                           (seq_lo, seq_hi))


_NUM_OUTPUTS = 4  # per_token_loss, g_logp, g_entropy, partials


def objective_pass(prep: io.PreparedObjective, params: LossParams, backend: str, rows, seqs) -> None:
    """One pass of `backend`'s objective over rows [rows) of sequences [seqs), as a dispatcher op:
    opaque to torch.compile, shape-only under FakeTensorMode."""
    buffers = prep.buffers()
    _objective_pass(buffers[:-_NUM_OUTPUTS], buffers[-_NUM_OUTPUTS:],
                    [*rows, *seqs, int(prep.adv_per_token), int(prep.weights_per_seq)], params.ints, params.floats,
                    backend)


def _fake_objective(logp, entropy, others, layout, ints, floats, backend):
    per_token = lambda: torch.empty_like(logp)  # noqa: E731
    return logp.new_empty(()), per_token(), per_token(), per_token(), logp.new_empty(len(METRICS))


@define("grpo_objective(Tensor logp, Tensor entropy, Tensor?[] others, int[] layout, int[] ints, float[] floats, "
        "str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_objective)
def _grpo_objective(logp, entropy, others, layout, ints, floats, backend):
    """others: (mask, advantages, cu_seqlens, old, ref, sampling, is_weights, num_items);
    layout: (adv_per_token, weights_per_seq). Returns (loss, per-token loss, dL/dlogp, dL/dH, metrics)."""
    mask, advantages, cu_seqlens, old, ref, sampling, is_weights, num_items = others
    params = LossParams.from_parts(ints, floats)
    prep = io.prepare(logp, entropy, mask, advantages, cu_seqlens, params, old_logp=old, ref_logp=ref,
                      sampling_logp=sampling, is_weights=is_weights, num_items_in_batch=num_items,
                      adv_per_token=bool(layout[0]), weights_per_seq=bool(layout[1]))
    backend_module(backend).objective_pass(prep, params, (0, prep.logp.numel()), (0, prep.num_sequences))
    loss, vector = io.finish(prep, params)
    return loss.clone(), prep.per_token_loss, prep.g_logp, prep.g_entropy, vector  # the loss: not a view


class _Objective(torch.autograd.Function):
    """The loss from (logp, entropy); the op computed its gradients, the backward scales them."""

    @staticmethod
    def forward(ctx, logp, entropy, others, layout, params: LossParams, backend: str):
        ctx.set_materialize_grads(False)  # the per-token loss and metrics take no gradient: no zeros made
        loss, per_token, g_logp, g_ent, vector = _grpo_objective(logp, entropy, others, layout, params.ints,
                                                                 params.floats, backend)
        ctx.save_for_backward(g_logp, g_ent)
        ctx.mark_non_differentiable(per_token, vector)
        return loss, per_token, vector

    @staticmethod
    def backward(ctx, grad_loss, *_):
        g_logp, g_ent = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None, None
        return g_logp * grad_loss, g_ent * grad_loss, None, None, None, None


def fused_objective(logp, entropy, mask, advantages, cu_seqlens, params: LossParams, backend, *, adv_per_token,
                    weights_per_seq, old_logp=None, ref_logp=None, sampling_logp=None, is_weights=None,
                    num_items_in_batch=None):
    """Packed (N,) logp, entropy, mask (bool) and per-token inputs, cu_seqlens (B+1,), advantages (B,)
    or (N,), is_weights (N,) or (B,) -> (loss, per_token_loss (N,), metrics dict); the loss is
    differentiable w.r.t. logp and entropy, its gradient computed by the backend's objective op."""
    num_items = None
    if num_items_in_batch is not None:
        num_items = scalar_tensor(num_items_in_batch, logp.dtype, logp.device)
    loss, per_token, vector = _Objective.apply(
        logp, entropy, [mask, advantages, cu_seqlens, old_logp, ref_logp, sampling_logp, is_weights, num_items],
        [int(adv_per_token), int(weights_per_seq)], params, backend)
    return loss, per_token, io.metrics_from_vector(vector, params)
