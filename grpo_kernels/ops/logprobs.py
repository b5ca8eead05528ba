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

from .dispatch import backend_module


@torch.library.custom_op("grpo_kernels::logprobs_fwd", mutates_args=())
def _logprobs_fwd(
    logits: Tensor, ids: Tensor, temperature: float, backend: str, inplace_backward: bool, with_entropy: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    return backend_module(backend).logprobs_forward(logits, ids, temperature, with_entropy)


@_logprobs_fwd.register_fake
def _(logits, ids, temperature, backend, inplace_backward, with_entropy):
    n = ids.numel()
    return tuple(logits.new_empty(n, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("grpo_kernels::logprobs_bwd", mutates_args=())
def _logprobs_bwd(
    logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, backend: str,
) -> Tensor:
    out = torch.empty_like(logits)
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, temperature, out)
    return out


@_logprobs_bwd.register_fake
def _(logits, ids, lse, entropy, grad_logp, grad_entropy, temperature, backend):
    return torch.empty_like(logits)


@torch.library.custom_op("grpo_kernels::logprobs_bwd_inplace", mutates_args=("logits",))
def _logprobs_bwd_inplace(
    logits: Tensor, ids: Tensor, lse: Tensor, entropy: Tensor, grad_logp: Tensor,
    grad_entropy: Optional[Tensor], temperature: float, backend: str,
) -> None:
    backend_module(backend).logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, temperature, logits)


def _setup_context(ctx, inputs, output):
    logits, ids, temperature, backend, inplace_backward, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, ids, lse, entropy)
    ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace_backward
    ctx.with_entropy = with_entropy
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, ids, lse, entropy = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    if not ctx.with_entropy:
        grad_entropy = None  # the entropy was not computed, so nothing downstream used it
    args = (ids, lse, entropy, grad_logp.contiguous(),
            None if grad_entropy is None else grad_entropy.contiguous(), ctx.temperature, ctx.backend)
    if ctx.inplace:
        _logprobs_bwd_inplace(logits, *args)
        grad_logits = logits
    else:
        grad_logits = _logprobs_bwd(logits, *args)
    return grad_logits, None, None, None, None, None


_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def logprobs_with_entropy(logits: Tensor, ids: Tensor, temperature: float, backend: str, inplace_backward: bool = False,
                          with_entropy: bool = True):
    """logits (N, V) or (B, T, V) (any row strides, unit vocabulary stride), ids (N,) ->
    (logp, entropy, lse), each (N,) fp32, differentiable w.r.t. logits.

    With inplace_backward=True the backward overwrites `logits` with its gradient: use it
    only when nothing else needs the logits after the loss (it saves one (N, V) buffer).
    Without `with_entropy` the entropy is skipped and its output is zeros.
    """
    return _logprobs_fwd(logits, ids, float(temperature), backend, bool(inplace_backward), bool(with_entropy))
