"""The log-prob/entropy op over the vocabulary: dispatcher ops (ops/library.py) and their autograd.

Forward: one sweep over each row of logits gives logp, entropy, lse and Σp² (fp32), over the kept
set of a truncated sampler (top-k, top-p, min-p) when one is given; its per-row threshold is an output.
Backward: one sweep writes dlogits from the upstream (g_logp, g_H) and the saved
per-row statistics; the in-place variant writes it over the logits buffer.
The logit transform travels as the two floats every kernel takes (transform.KernelTransform).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..transform import KernelTransform
from ..truncation import NO_TRUNCATION, Truncation
from .dispatch import backend_module, stats_dtype
from .library import define


class RowStats(NamedTuple):
    """The log-prob op's per-row outputs, each (N,) fp32 (fp64 for fp64 logits): logp, entropy
    (zeros unless asked), lse (over the kept set), threshold (raw-logit units, −inf: every entry
    kept), sum_pi_sq (Σ_K p², zeros unless asked)."""

    logp: Tensor
    entropy: Tensor
    lse: Tensor
    threshold: Tensor
    sum_pi_sq: Tensor


def _fake_forward(logits, ids, scale, cap, backend, with_entropy, top_k, top_p, min_p, threshold, with_sum_pi_sq):
    n = ids.numel()
    return tuple(logits.new_empty(n, dtype=stats_dtype(logits)) for _ in range(len(RowStats._fields)))


@define("logprobs_fwd(Tensor logits, Tensor ids, float scale, float cap, str backend, bool with_entropy, int top_k, "
        "float top_p, float min_p, Tensor? threshold, bool with_sum_pi_sq) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
        _fake_forward)
def _logprobs_fwd(logits, ids, scale, cap, backend, with_entropy, top_k, top_p, min_p, threshold, with_sum_pi_sq):
    return tuple(backend_module(backend).logprobs_forward(
        logits, ids, KernelTransform(scale, cap), with_entropy, truncation=Truncation(top_k, top_p, min_p),
        threshold=threshold, with_sum_pi_sq=with_sum_pi_sq))


@define("logprobs_bwd(Tensor logits, Tensor ids, Tensor lse, Tensor entropy, Tensor grad_logp, Tensor? grad_entropy, "
        "float scale, float cap, str backend, Tensor? threshold) -> Tensor",
        lambda logits, *_: torch.empty_like(logits))
def _logprobs_bwd(logits, ids, lse, entropy, grad_logp, grad_entropy, scale, cap, backend, threshold):
    out = torch.empty_like(logits)
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              KernelTransform(scale, cap), out, threshold=threshold)
    return out


@define("logprobs_bwd_inplace(Tensor(a!) logits, Tensor ids, Tensor lse, Tensor entropy, Tensor grad_logp, "
        "Tensor? grad_entropy, float scale, float cap, str backend, Tensor? threshold) -> ()", lambda *_: None)
def _logprobs_bwd_inplace(logits, ids, lse, entropy, grad_logp, grad_entropy, scale, cap, backend, threshold):
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              KernelTransform(scale, cap), logits, threshold=threshold)


class LogprobsBackward(torch.autograd.Function):
    """The backward shared by the log-prob Functions (this file's and the vocabulary-parallel one):
    one sweep over the saved logits from the saved per-row statistics (and the truncation
    threshold, when the kept set is not the whole vocabulary)."""

    @staticmethod
    def save(ctx, logits, grad_ids, stats: RowStats, transform: KernelTransform, backend: str, inplace: bool,
             with_entropy: bool, truncated: bool) -> None:
        """What the backward needs; grad_ids are the ids the gradient kernel takes (−1: another rank's)."""
        ctx.set_materialize_grads(False)  # an unused output (entropy, lse) sends None, not zeros
        ctx.save_for_backward(logits, grad_ids, stats.lse, stats.entropy, stats.threshold if truncated else None)
        ctx.transform, ctx.backend, ctx.inplace, ctx.with_entropy = transform, backend, inplace, with_entropy
        ctx.mark_non_differentiable(stats.lse, stats.threshold, stats.sum_pi_sq)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse, _grad_threshold, _grad_sum_pi_sq):
        logits, ids, lse, entropy, threshold = ctx.saved_tensors
        grad_logits = logits_grad(logits, ids, lse, entropy, grad_logp, grad_entropy if ctx.with_entropy else None,
                                  ctx.transform, ctx.backend, ctx.inplace, threshold)
        return (grad_logits,) + (None,) * (len(ctx.needs_input_grad) - 1)


class _Logprobs(LogprobsBackward):
    """RowStats of the logits' rows; the backward sweeps the logits once."""

    @staticmethod
    def forward(ctx, logits, ids, scale: float, cap: float, backend: str, inplace: bool, with_entropy: bool,
                truncation: Truncation, with_sum_pi_sq: bool):
        stats = RowStats(*_logprobs_fwd(logits, ids, scale, cap, backend, with_entropy, *truncation, None,
                                        with_sum_pi_sq))
        LogprobsBackward.save(ctx, logits, ids, stats, KernelTransform(scale, cap), backend, inplace, with_entropy,
                              truncation.active)
        return tuple(stats)


def logits_grad(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Optional[Tensor],
                grad_entropy: Optional[Tensor], transform: KernelTransform, backend: str, inplace: bool,
                threshold: Optional[Tensor] = None) -> Tensor:
    """dL/dlogits from the upstream (grad_logp, grad_entropy) and the saved per-row statistics.

    `ids` outside [0, V) mean the row's target is not among these logits (another rank's
    vocabulary slice): the gradient then has no one-hot term. grad_entropy None: the entropy was
    not computed or not used. `threshold` (N,): the kept set's bound of a truncated softmax (the
    gradient is 0 outside it); None: the whole vocabulary. With `inplace` the gradient is written
    over `logits` (returned).
    """
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    args = (ids, lse, entropy, grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            transform.scale, transform.cap, backend, threshold)
    if inplace:
        _logprobs_bwd_inplace(logits, *args)
        return logits
    return _logprobs_bwd(logits, *args)


def logprobs_with_entropy(logits: Tensor, ids: Tensor, transform: KernelTransform, backend: str,
                          inplace_backward: bool = False, with_entropy: bool = True,
                          truncation: Truncation = NO_TRUNCATION, with_sum_pi_sq: bool = False) -> RowStats:
    """logits (N, V) or (B, T, V) (any row strides, unit vocabulary stride), ids (N,) -> RowStats,
    each (N,) fp32 (fp64 for fp64 logits); logp and entropy differentiable w.r.t. logits.
    `transform` maps the logits to z' before the softmax; `truncation` restricts the softmax to
    the kept set of docs/math.md "Truncated sampling" (found per row by the backend).

    With inplace_backward=True the backward overwrites `logits` with its gradient: use it
    only when nothing else needs the logits after the loss (it saves one (N, V) buffer).
    Without `with_entropy` (`with_sum_pi_sq`) that output is zeros.
    """
    return RowStats(*_Logprobs.apply(logits, safe_ids(ids, logits.shape[-1]), transform.scale, transform.cap, backend,
                                     inplace_backward, with_entropy, truncation, with_sum_pi_sq))


def logprobs_rows(logits: Tensor, ids: Tensor, transform: KernelTransform, backend: str, with_entropy: bool = True,
                  truncation: Truncation = NO_TRUNCATION, threshold: Optional[Tensor] = None,
                  with_sum_pi_sq: bool = False) -> RowStats:
    """The forward op outside autograd (the fused-linear and vocabulary-parallel paths) on (N, V)
    rows: ids in [0, V), or outside it for another rank's target; a given `threshold` is used as
    is (the vocabulary-parallel search), else the backend finds it when `truncation` is active."""
    return RowStats(*_logprobs_fwd(logits, ids, transform.scale, transform.cap, backend, with_entropy, *truncation,
                                   threshold, with_sum_pi_sq))


def safe_ids(ids: Tensor, vocab: int) -> Tensor:
    """ids clamped into [0, V): the kernels never read outside a row, whatever the caller passed
    (masked rows may hold -100; bad unmasked ids raise in the deferred checks, or, with
    validate=False, give wrong numbers rather than a crash)."""
    return ids.clamp(0, vocab - 1)
