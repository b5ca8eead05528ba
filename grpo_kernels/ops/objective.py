"""The per-token objective as a torch.library custom op, the same for every backend.

Each backend's `objective_pass` computes the per-token loss together with dL/dlogp and dL/dH;
this op returns the loss and hands those two gradients, scaled by the upstream gradient, to the
log-prob op's backward, which then sweeps the logits once. Tokens are packed (N,) with
cu_seqlens: padded batches are the special case cu_seqlens = arange(B+1)·T, never scattered.
The config travels as a JSON string so the op stays opaque to torch.compile.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config import config_from_json, config_json
from . import objective_inputs as io
from .dispatch import backend_module


def run_objective(prep: io.PreparedObjective, cfg, backend: str, rows=None, seqs=None) -> None:
    """One pass of `backend`'s objective over rows [rows) of sequences [seqs) (default: all)."""
    rows = (0, prep.logp.numel()) if rows is None else rows
    seqs = (0, prep.num_sequences) if seqs is None else seqs
    backend_module(backend).objective_pass(prep, cfg, rows, seqs)


# The tensors of a PreparedObjective in the order the pass op takes them; the last four are written.
_PASS_TENSORS = ("logp", "entropy", "mask", "cu_seqlens", "counts", "advantages", "old", "ref", "sampling",
                 "token_weights", "keep_entropy", "norm", "ent_norm", "per_token_loss", "g_logp", "g_entropy",
                 "partials")


@torch.library.custom_op("grpo_kernels::objective_pass",
                         mutates_args=("per_token_loss", "g_logp", "g_entropy", "partials"))
def _objective_pass(
    logp: Tensor, entropy: Tensor, mask: Tensor, cu_seqlens: Tensor, counts: Tensor, advantages: Tensor,
    old: Optional[Tensor], ref: Optional[Tensor], sampling: Optional[Tensor], token_weights: Optional[Tensor],
    keep_entropy: Optional[Tensor], norm: Tensor, ent_norm: Tensor, per_token_loss: Tensor, g_logp: Tensor,
    g_entropy: Tensor, partials: Tensor, row_lo: int, row_hi: int, seq_lo: int, seq_hi: int, config: str,
    backend: str, adv_per_token: bool, weights_per_seq: bool,
) -> None:
    tensors = dict(zip(_PASS_TENSORS, (logp, entropy, mask, cu_seqlens, counts, advantages, old, ref, sampling,
                                       token_weights, keep_entropy, norm, ent_norm, per_token_loss, g_logp, g_entropy,
                                       partials)))
    prep = io.PreparedObjective(**tensors, adv_per_token=adv_per_token, weights_per_seq=weights_per_seq)
    run_objective(prep, config_from_json(config), backend, (row_lo, row_hi), (seq_lo, seq_hi))


@_objective_pass.register_fake
def _(*args):
    return None


def objective_pass_op(prep: io.PreparedObjective, cfg, backend: str, rows, seqs) -> None:
    """`run_objective` as a custom op: opaque to torch.compile, shape-only under FakeTensorMode."""
    _objective_pass(*(getattr(prep, name) for name in _PASS_TENSORS), *rows, *seqs, config_json(cfg), backend,
                    prep.adv_per_token, prep.weights_per_seq)


@torch.library.custom_op("grpo_kernels::grpo_objective", mutates_args=())
def _grpo_objective(
    logp: Tensor, entropy: Tensor, mask: Tensor, advantages: Tensor, cu_seqlens: Tensor, old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor], sampling_logp: Optional[Tensor], is_weights: Optional[Tensor],
    num_items: Optional[Tensor], config: str, backend: str, adv_per_token: bool, weights_per_seq: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = config_from_json(config)
    prep = io.prepare(logp, entropy, mask, advantages, cu_seqlens, cfg, old_logp=old_logp, ref_logp=ref_logp,
                      sampling_logp=sampling_logp, is_weights=is_weights, num_items_in_batch=num_items,
                      adv_per_token=adv_per_token, weights_per_seq=weights_per_seq)
    run_objective(prep, cfg, backend)
    loss, vector = io.finish(prep)
    return loss.clone(), prep.per_token_loss, prep.g_logp, prep.g_entropy, vector


@_grpo_objective.register_fake
def _(logp, entropy, mask, advantages, cu_seqlens, old_logp, ref_logp, sampling_logp, is_weights, num_items, config,
      backend, adv_per_token, weights_per_seq):
    per_token = lambda: torch.empty_like(logp)  # noqa: E731
    return logp.new_empty(()), per_token(), per_token(), per_token(), logp.new_empty(len(io.METRIC_ORDER))


def _setup_context(ctx, inputs, output):
    _, _, g_logp, g_ent, _ = output
    ctx.save_for_backward(g_logp, g_ent)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    g_logp, g_ent = ctx.saved_tensors
    return (g_logp * grad_loss, g_ent * grad_loss) + (None,) * 12


_grpo_objective.register_autograd(_backward, setup_context=_setup_context)


def fused_objective(logp, entropy, mask, advantages, cu_seqlens, cfg, backend, *, adv_per_token, weights_per_seq,
                    old_logp=None, ref_logp=None, sampling_logp=None, is_weights=None, num_items_in_batch=None):
    """Packed (N,) logp, entropy, mask (bool) and per-token inputs, cu_seqlens (B+1,), advantages (B,)
    or (N,), is_weights (N,) or (B,) -> (loss, per_token_loss (N,), metrics dict); the loss is
    differentiable w.r.t. logp and entropy, its gradient computed by the backend's objective op."""
    num_items = None
    if num_items_in_batch is not None:
        num_items = torch.as_tensor(num_items_in_batch, dtype=logp.dtype, device=logp.device).reshape(())
    loss, per_token, _, _, vector = _grpo_objective(
        logp, entropy, mask, advantages, cu_seqlens, old_logp, ref_logp, sampling_logp, is_weights, num_items,
        config_json(cfg), backend, adv_per_token, weights_per_seq)
    return loss, per_token, io.metrics_from_vector(vector, cfg)
