"""The log-prob/entropy op over the vocabulary: dispatcher ops (ops/library.py) and their autograd.

Forward: one sweep over each row of logits gives logp, entropy and lse (fp32).
Backward: one sweep writes dlogits from the upstream (g_logp, g_H) and the saved
per-row statistics; the in-place variant writes it over the logits buffer.
The logit transform travels as the two floats every kernel takes (transform.KernelTransform).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..transform import KernelTransform
from .dispatch import backend_module, stats_dtype
from .library import define


def _fake_forward(logits, ids, scale, cap, backend, with_entropy):
    n = ids.numel()
    return tuple(logits.new_empty(n, dtype=stats_dtype(logits)) for _ in range(3))


@define("logprobs_fwd(Tensor logits, Tensor ids, float scale, float cap, str backend, bool with_entropy) "
        "-> (Tensor, Tensor, Tensor)", _fake_forward)
def _logprobs_fwd(logits, ids, scale, cap, backend, with_entropy):
    return backend_module(backend).logprobs_forward(logits, ids, KernelTransform(scale, cap), with_entropy)


@define("logprobs_bwd(Tensor logits, Tensor ids, Tensor lse, Tensor entropy, Tensor grad_logp, Tensor? grad_entropy, "
        "float scale, float cap, str backend) -> Tensor", lambda logits, *_: torch.empty_like(logits))
def _logprobs_bwd(logits, ids, lse, entropy, grad_logp, grad_entropy, scale, cap, backend):
    out = torch.empty_like(logits)
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              KernelTransform(scale, cap), out)
    return out


@define("logprobs_bwd_inplace(Tensor(a!) logits, Tensor ids, Tensor lse, Tensor entropy, Tensor grad_logp, "
        "Tensor? grad_entropy, float scale, float cap, str backend) -> ()", lambda *_: None)
def _logprobs_bwd_inplace(logits, ids, lse, entropy, grad_logp, grad_entropy, scale, cap, backend):
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              KernelTransform(scale, cap), logits)


class LogprobsBackward(torch.autograd.Function):
    """The backward shared by the log-prob Functions (this file's and the vocabulary-parallel one):
    one sweep over the saved logits from the saved per-row statistics."""

    @staticmethod
    def save(ctx, logits, grad_ids, lse, entropy, transform: KernelTransform, backend: str, inplace: bool,
             with_entropy: bool) -> None:
        """What the backward needs; grad_ids are the ids the gradient kernel takes (−1: another rank's)."""
        ctx.set_materialize_grads(False)  # an unused output (entropy, lse) sends None, not zeros
        ctx.save_for_backward(logits, grad_ids, lse, entropy)
        ctx.transform, ctx.backend, ctx.inplace, ctx.with_entropy = transform, backend, inplace, with_entropy
        ctx.mark_non_differentiable(lse)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, _grad_lse):
        logits, ids, lse, entropy = ctx.saved_tensors
        grad_logits = logits_grad(logits, ids, lse, entropy, grad_logp, grad_entropy if ctx.with_entropy else None,
                                  ctx.transform, ctx.backend, ctx.inplace)
        return grad_logits, None, None, None, None, None, None


class _Logprobs(LogprobsBackward):
    """(logp, entropy, lse) of the logits' rows; the backward sweeps the logits once."""

    @staticmethod
    def forward(ctx, logits, ids, scale: float, cap: float, backend: str, inplace: bool, with_entropy: bool):
        logp, entropy, lse = _logprobs_fwd(logits, ids, scale, cap, backend, with_entropy)
        LogprobsBackward.save(ctx, logits, ids, lse, entropy, KernelTransform(scale, cap), backend, inplace,
                              with_entropy)
        return logp, entropy, lse


def logits_grad(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Optional[Tensor],
                grad_entropy: Optional[Tensor], transform: KernelTransform, backend: str, inplace: bool) -> Tensor:
    """dL/dlogits from the upstream (grad_logp, grad_entropy) and the saved per-row statistics.

    `ids` outside [0, V) mean the row's target is not among these logits (another rank's
    vocabulary slice): the gradient then has no one-hot term. grad_entropy None: the entropy was
    not computed or not used. With `inplace` the gradient is written over `logits` (returned).
    """
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    args = (ids, lse, entropy, grad_logp.contiguous(), None if grad_entropy is None else grad_entropy.contiguous(),
            transform.scale, transform.cap, backend)
    if inplace:
        _logprobs_bwd_inplace(logits, *args)
        return logits
    return _logprobs_bwd(logits, *args)


def logprobs_with_entropy(logits: Tensor, ids: Tensor, transform: KernelTransform, backend: str,
                          inplace_backward: bool = False, with_entropy: bool = True):
    """logits (N, V) or (B, T, V) (any row strides, unit vocabulary stride), ids (N,) ->
    (logp, entropy, lse), each (N,) fp32 (fp64 for fp64 logits), differentiable w.r.t. logits.
    `transform` maps the logits to z' before the softmax.

    With inplace_backward=True the backward overwrites `logits` with its gradient: use it
    only when nothing else needs the logits after the loss (it saves one (N, V) buffer).
    Without `with_entropy` the entropy is skipped and its output is zeros.
    """
    return _Logprobs.apply(logits, safe_ids(ids, logits.shape[-1]), transform.scale, transform.cap, backend,
                           inplace_backward, with_entropy)


def logprobs_rows(logits: Tensor, ids: Tensor, transform: KernelTransform, backend: str, with_entropy: bool = True):
    """The forward op outside autograd (the fused-linear and vocabulary-parallel paths), on ids
    already in [0, V): (logp, entropy, lse) of (N, V) rows."""
    return _logprobs_fwd(logits, ids, transform.scale, transform.cap, backend, with_entropy)


def safe_ids(ids: Tensor, vocab: int) -> Tensor:
    """ids clamped into [0, V): the kernels never read outside a row, whatever the caller passed
    (masked rows may hold -100; bad unmasked ids raise in the deferred checks, or, with
    validate=False, give wrong numbers rather than a crash)."""
    return ids.clamp(0, vocab - 1)
