"""The fused per-token objective as a torch.library custom op.

Backends that implement `grpo_objective` (Triton) compute the per-token loss together with
dL/dlogp and dL/dH; this op returns the loss and hands those two gradients, scaled by the
upstream gradient, to the log-prob op's backward, which then sweeps the logits once.
The config travels as a JSON string so the op stays opaque to torch.compile.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..config import GRPOLossConfig
from .dispatch import backend_module, trace_as_constant
from .objective_inputs import METRIC_ORDER, metric_names


@trace_as_constant
def config_json(cfg: GRPOLossConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


@functools.lru_cache(maxsize=64)
def _config(text: str) -> GRPOLossConfig:
    return GRPOLossConfig(**json.loads(text))


@trace_as_constant
def has_fused_objective(backend: str) -> bool:
    return hasattr(backend_module(backend), "grpo_objective")


@torch.library.custom_op("grpo_kernels::grpo_objective", mutates_args=())
def _grpo_objective(
    logp: Tensor, entropy: Tensor, mask: Tensor, advantages: Tensor, old_logp: Optional[Tensor],
    ref_logp: Optional[Tensor], sampling_logp: Optional[Tensor], is_weights: Optional[Tensor],
    num_items: Optional[Tensor], config: str, backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss, per_token, g_logp, g_ent, metrics = backend_module(backend).grpo_objective(
        logp, entropy, mask, advantages, _config(config), old_logp=old_logp, ref_logp=ref_logp,
        sampling_logp=sampling_logp, is_weights=is_weights, num_items_in_batch=num_items,
    )
    zero = loss.new_zeros(())
    vector = torch.stack([metrics.get(k, zero) for k in METRIC_ORDER])
    return loss.clone(), per_token, g_logp, g_ent, vector


@_grpo_objective.register_fake
def _(logp, entropy, mask, advantages, old_logp, ref_logp, sampling_logp, is_weights, num_items, config, backend):
    f = lambda: torch.empty_like(logp, dtype=torch.float32)  # noqa: E731
    return logp.new_empty((), dtype=torch.float32), f(), f(), f(), logp.new_empty(len(METRIC_ORDER),
                                                                                   dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    _, _, g_logp, g_ent, _ = output
    ctx.save_for_backward(g_logp, g_ent)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_):
    g_logp, g_ent = ctx.saved_tensors
    return g_logp * grad_loss, g_ent * grad_loss, None, None, None, None, None, None, None, None, None


_grpo_objective.register_autograd(_backward, setup_context=_setup_context)


def fused_objective(logp, entropy, mask, advantages, cfg, backend, *, old_logp=None, ref_logp=None,
                    sampling_logp=None, is_weights=None, num_items_in_batch=None):
    """Padded (B, T) inputs -> (loss, per_token_loss, metrics dict), loss differentiable w.r.t. logp, entropy."""
    num_items = None
    if num_items_in_batch is not None:
        num_items = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=logp.device).reshape(())
    loss, per_token, _, _, vector = _grpo_objective(
        logp, entropy, mask, advantages, old_logp, ref_logp, sampling_logp, is_weights, num_items, config_json(cfg),
        backend)
    metrics = {k: vector[METRIC_ORDER.index(k)] for k in metric_names(cfg)}
    return loss, per_token, metrics
