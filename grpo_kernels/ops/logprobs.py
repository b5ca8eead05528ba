"""The log-prob/entropy op over the vocabulary, as torch.library custom ops.

Forward: one sweep over each row of logits gives logp, entropy and lse (fp32).
Backward: one sweep writes dlogits from the upstream (g_logp, g_H) and the saved
per-row statistics; the in-place variant writes it over the logits buffer.
Registered with fake implementations and autograd so torch.compile traces through.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..transform import LogitTransform
from .dispatch import backend_module, stats_dtype


def _transform(temperature: float, logit_scale: float, softcap: float) -> LogitTransform:
    """Custom ops take plain floats; softcap 0 stands for None."""
    return LogitTransform(temperature, logit_scale, softcap or None)


@torch.library.custom_op("grpo_kernels::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, ids: Tensor, temperature: float, logit_scale: float, softcap: float, backend: str,
    inplace_backward: bool, with_entropy: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_module(backend).logprobs_forward(logits, ids, _transform(temperature, logit_scale, softcap),
                                                    with_entropy)


@_logprobs_fwd.register_fake
def _(logits, ids, temperature, logit_scale, softcap, backend, inplace_backward, with_entropy):
    n = ids.numel()
    return tuple(logits.new_empty(n, dtype=stats_dtype(logits)) for _ in range(3))


@torch.library.custom_op("grpo_kernels::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, logit_scale: float, softcap: float, backend: str,
) -> Tensor:
    out = torch.empty_like(logits)
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              _transform(temperature, logit_scale, softcap), out)
    return out


@_logprobs_bwd.register_fake
def _(logits, ids, lse, entropy, grad_logp, grad_entropy, temperature, logit_scale, softcap, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("grpo_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, logit_scale: float, softcap: float, backend: str,
) -> None:
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy,
                                              _transform(temperature, logit_scale, softcap), logits)


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, logit_scale, softcap, backend, inplace_backward, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, ids, lse, entropy)
    ctx.transform, ctx.backend, ctx.inplace = (temperature, logit_scale, softcap), backend, inplace_backward
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, ids, lse, entropy = ctx.saved_tensors
    grad_logits = logits_grad(logits, ids, lse, entropy, grad_logp, grad_entropy if ctx.with_entropy else None,
                              ctx.transform, ctx.backend, ctx.inplace)
    return grad_logits, None, None, None, None, None, None, None


def logits_grad(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Optional[Tensor],
                grad_entropy: Optional[Tensor], floats, backend: str, inplace: bool) -> Tensor:
    """dL/dlogits from the upstream (grad_logp, grad_entropy) and the saved per-row statistics.

    `ids` outside [0, V) mean the row's target is not among these logits (another rank's
    vocabulary slice): the gradient then has no one-hot term. grad_entropy None: the entropy was
    not computed or not used. `floats`: transform_floats(transform). With `inplace` the gradient
    is written over `logits`.
    """
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    args = (ids, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(), *floats, backend)
    if inplace:
        _logprobs_bwd_inplace(logits, *args)
        return logits
    return _logprobs_bwd(logits, *args)


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def logprobs_with_entropy(logits: Tensor, ids: Tensor, transform: LogitTransform, backend: str,
                          inplace_backward: bool = False, with_entropy: bool = True):
    """logits (N, V) or (B, T, V) (any row strides, unit vocabulary stride), ids (N,) ->
    (logp, entropy, lse), each (N,) fp32 (fp64 for fp64 logits), differentiable w.r.t. logits.
    `transform` (temperature, logit scale, softcap) maps the logits to z' before the softmax.

    With inplace_backward=True the backward overwrites `logits` with its gradient: use it
    only when nothing else needs the logits after the loss (it saves one (N, V) buffer).
    Without `with_entropy` the entropy is skipped and its output is zeros.
    """
    ids = safe_ids(ids, logits.shape[-1])
    return _logprobs_fwd(logits, ids, *transform_floats(transform), backend, bool(inplace_backward), bool(with_entropy))


def safe_ids(ids: Tensor, vocab: int) -> Tensor:
    """ids clamped into [0, V): the kernels never read outside a row, whatever the caller passed
    (masked rows may hold -100; bad unmasked ids raise in the deferred checks, or, with
    validate=False, give wrong numbers rather than a crash)."""
    return ids.clamp(0, vocab - 1)


def transform_floats(transform: LogitTransform):
    """The transform as the custom ops take it: (temperature, logit_scale, softcap or 0)."""
    return float(transform.temperature), float(transform.logit_scale), float(transform.softcap or 0.0)


def logprobs_rows(logits: Tensor, ids: Tensor, transform: LogitTransform, backend: str, with_entropy: bool = True):
    """The forward op outside autograd (for the fused-linear path): (logp, entropy, lse) of (N, V) rows."""
    return _logprobs_fwd(logits, ids, *transform_floats(transform), backend, False, bool(with_entropy))


def logits_grad_inplace(logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
                        grad_entropy: Optional[Tensor], transform: LogitTransform, backend: str) -> Tensor:
    """Overwrite (N, V) `logits` with dL/dlogits for the upstream per-row gradients; returns it."""
    return logits_grad(logits, ids, lse, entropy, grad_logp, grad_entropy, transform_floats(transform), backend, True)
