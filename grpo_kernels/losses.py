"""The public loss and log-prob functions over given logits: selective_logprobs, grpo_loss,
grpo_loss_from_logprobs.

Each call checks its arguments (metadata at once, values on the device with one host sync at
the end, or none with validate=False), runs the vocabulary-sized work in the chosen backend's
fused op, and the per-token objective in the same backend's objective op, on the tokens as the
caller laid them out. Statistics are fp32, or fp64 for fp64 inputs (the torch backend; see
ops/dispatch.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import GRPOLossConfig, resolve_config
from .inputs import (
    Tokens, advantages_per_token, check_ids_and_mask, check_mask, check_num_items, check_objective_inputs,
    loss_output, masked_logprobs, require_layout, token_layout, token_mask, weights_per_sequence,
)
from .ops import logprobs_with_entropy, resolve_backend
from .ops.dispatch import stats_dtype
from .ops.logprobs import RowStats
from .ops.objective import fused_objective
from .outputs import GRPOLossOutput
from .options import LossParams
from .transform import KernelTransform, LogitTransform
from .truncation import NO_TRUNCATION, Truncation, make_truncation
from .vocab_parallel import VocabShard, vocab_parallel_logprobs, vocab_shard
from .validation import FLOAT_DTYPES, DeferredChecks, check_finite, check_ids, check_logp_finite, require_device, \
    require_shape, require_tensor


def objective_from_logprobs(
    logp_rows, entropy_rows, tokens: Tokens, mask, advantages, params: LossParams, backend: str,
    checks: DeferredChecks, *,
    old_logps=None, ref_logps=None, sampling_logps=None, is_weights=None, num_items_in_batch=None,
) -> GRPOLossOutput:
    """Apply the per-token objective to flat (N,) logp/entropy (differentiable) in the backend's
    objective op, on the caller's tokens as they are (packed, or padded read as B sequences of T)."""
    flat_mask = token_mask(mask, tokens, logp_rows.device)
    # Without an entropy bonus the loss does not depend on H: detached, the log-prob backward then
    # takes its cheaper path without the entropy term (the entropy mask is detached anyway).
    entropy_in = entropy_rows if params.entropy_coef != 0.0 else entropy_rows.detach()
    # The objective op takes the per-token tensors in any shape: it reads them flat.
    loss, per_token_loss, metrics = fused_objective(
        logp_rows, entropy_in, flat_mask, advantages, tokens.cu_seqlens, params,
        backend, adv_per_token=advantages_per_token(advantages, tokens),
        weights_per_seq=is_weights is not None and weights_per_sequence(is_weights, tokens),
        old_logp=old_logps, ref_logp=ref_logps, sampling_logp=sampling_logps, is_weights=is_weights,
        num_items_in_batch=num_items_in_batch)
    return loss_output(loss, logp_rows, entropy_rows, per_token_loss, metrics, flat_mask, tokens.token_shape,
                       checks)


def _check_logits(logits, cu_seqlens):
    require_tensor("logits", logits, dtypes=FLOAT_DTYPES, kind="a float tensor (fp32, bf16, fp16 or fp64)")
    require_layout("logits", logits, cu_seqlens is not None)
    if logits.shape[-1] < 1:
        raise ValueError("logits must have a vocabulary dimension V >= 1")


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """(N, V) or (B, T, V) as the kernels take them: any row strides (a `logits[:, :-1]` slice is
    not copied), unit vocabulary stride. Other layouts are made contiguous."""
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def logits_shard(logits, process_group, vocab_start, validate: bool) -> Optional[VocabShard]:
    """This rank's vocabulary slice of `logits` (None without a process group); see vocab_parallel.py."""
    rows = math.prod(logits.shape[:-1])
    return vocab_shard(process_group, vocab_start, logits.shape[-1], rows, 0, logits.device, validate)


def _logprobs(logits, ids, transform, backend, inplace_backward, with_entropy, shard: Optional[VocabShard],
              truncation: Truncation = NO_TRUNCATION, with_sum_pi_sq: bool = False) -> RowStats:
    """RowStats (N,) over the whole vocabulary (its kept set when truncated), from the whole
    logits or this rank's slice."""
    rows, flat_ids = _rows(logits), ids.reshape(-1)
    if shard is None:
        return logprobs_with_entropy(rows, flat_ids, transform, backend, inplace_backward, with_entropy, truncation,
                                     with_sum_pi_sq)
    return vocab_parallel_logprobs(rows, flat_ids, shard, transform, backend, inplace_backward, with_entropy,
                                   truncation, with_sum_pi_sq)

# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------

def selective_logprobs(
    logits: torch.Tensor,
    ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    return_entropy: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    process_group=None,
    vocab_start: Optional[int] = None,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    return_sum_pi_squared: bool = False,
):
    """Log-probability of `ids` under softmax(z'), optionally with the entropy.

    z' = c·tanh(s·logits/c)/temperature with s = logit_scale and c = final_logit_softcapping
    (s·logits/temperature without a softcap), as the model computes its logits (Cohere, Gemma 2/3).
    Shapes: logits (B, T, V) and ids (B, T), or packed logits (N, V), ids (N,) with
    cu_seqlens (B+1,). Returns fp32 logp of ids' shape (fp64 for fp64 logits), and entropy of
    the same shape, differentiable w.r.t. logits. Rows where `mask` is False return 0 and are not
    checked. Use under torch.no_grad() for old/reference log-probs. With inplace_backward=True
    the backward overwrites `logits` with its gradient (saves an (N, V) buffer).
    validate=True (default) runs every data-dependent check with one host sync at the end of the
    call; validate=False runs none and never synchronises (bad ids then give wrong numbers, not a crash).
    Vocabulary-parallel: with `process_group`, `logits` are this rank's slice (..., V_local) of
    the vocabulary, ids [vocab_start, vocab_start + V_local) (default rank · V_local); ids stay
    global. Every rank gets the full-vocabulary logp and entropy, and the gradient of its slice.
    An empty batch (no rows) is not an error: empty logp (and entropy) of ids' shape, zero gradients.
    Truncated sampling (docs/math.md "Truncated sampling", vLLM V1's order): `min_p`, then `top_k`,
    then `top_p` (None, 0 and 1 mean off) restrict the softmax to the tokens the sampler could
    draw (the target always kept): logp, entropy and the gradient are those of that renormalised
    distribution, the gradient 0 outside it. return_sum_pi_squared=True appends Σ_v p_v² per token
    (ids' shape, fp32, detached, 0 where masked; over the kept set when truncated) from the same pass.
    Returns logp, or (logp, entropy) with return_entropy, with sum_pi_squared last when asked.
    """
    checks = DeferredChecks(validate)
    truncation = make_truncation(top_k, top_p, min_p)
    require_tensor("logits", logits, dtypes=FLOAT_DTYPES, kind="a float tensor (fp32, bf16, fp16 or fp64)")
    if cu_seqlens is not None:
        token_layout(tuple(logits.shape[:-1]), logits.device, cu_seqlens, checks)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    transform = LogitTransform(temperature, logit_scale, final_logit_softcapping).kernel
    mask = check_ids_and_mask(ids, mask, tuple(logits.shape[:-1]), logits.device, checks)
    name = resolve_backend(backend, logits.device, logits.dtype)
    shard = logits_shard(logits, process_group, vocab_start, validate)
    check_ids(ids, logits.shape[-1] if shard is None else shard.total, mask, checks)
    stats = _logprobs(logits, ids, transform, name, inplace_backward, return_entropy, shard, truncation,
                      bool(return_sum_pi_squared))
    return masked_logprobs(stats.logp, stats.entropy, mask, ids.shape, return_entropy, checks,
                           sum_pi_sq=stats.sum_pi_sq if return_sum_pi_squared else None)


def grpo_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Optional[GRPOLossConfig] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    validate: bool = True,
    process_group=None,
    vocab_start: Optional[int] = None,
    **overrides,
) -> GRPOLossOutput:
    """The GRPO loss from logits (docs/math.md), fused over the vocabulary.

    Shapes (padded): logits (B, T, V); ids, mask, old/ref/sampling_logps (B, T); advantages
    and is_weights (B,) or (B, 1) (one per sequence) or (B, T). Packed: logits (N, V), per-token
    tensors (N,), cu_seqlens (B+1,) int32, advantages and is_weights (B,), (B, 1) or (N,).
    An empty batch (B = 0, T = 0, or N = 0 packed; cu_seqlens [0] for no sequences) is not an
    error: the loss and every metric are 0, the per-token outputs empty, the gradient zeros.
    Statistics, loss and metrics are fp32, or fp64 for fp64 logits (backend "torch" or "auto").
    `config` (GRPOLossConfig) and/or keyword overrides of its fields select the loss.
    old_logps defaults to on-policy (logps.detach(), ratio exactly 1). `is_weights`:
    precomputed rollout importance-sampling weights (>= 0, detached) on the policy term.
    Returns GRPOLossOutput; `.loss` is differentiable w.r.t. logits. With
    inplace_backward=True, backward writes the gradient over `logits` (no extra (N, V)).
    validate=True (default): every data-dependent check, read with one host sync at the end;
    validate=False: none, and no host sync at all (CUDA graphs, torch.compile without breaks).
    Vocabulary-parallel with `process_group` / `vocab_start` as in `selective_logprobs`: every
    rank gets the same loss and metrics, and the gradient of its own slice of the logits.
    """
    cfg = resolve_config(config, overrides)
    checks = DeferredChecks(validate)
    _check_logits(logits, cu_seqlens)
    token_shape = tuple(logits.shape[:-1])
    tokens = token_layout(token_shape, logits.device, cu_seqlens, checks)
    mask = check_ids_and_mask(ids, mask, token_shape, logits.device, checks)
    check_objective_inputs(tokens, advantages, old_logps, ref_logps, sampling_logps, mask, cfg, logits.device,
                           checks, is_weights)
    num_items_in_batch = check_num_items(num_items_in_batch)
    name = resolve_backend(backend, logits.device, logits.dtype)
    shard = logits_shard(logits, process_group, vocab_start, validate)
    check_ids(ids, logits.shape[-1] if shard is None else shard.total, mask, checks)
    params = cfg.params
    transform = KernelTransform(params.transform_scale, params.transform_cap)
    logp, entropy = _logprobs(logits, ids, transform, name, inplace_backward, True, shard, cfg.truncation)[:2]
    check_logp_finite(logp, entropy, None if mask is None else mask.reshape(-1), checks)
    out = objective_from_logprobs(
        logp, entropy, tokens, mask, advantages, params, name, checks, old_logps=old_logps, ref_logps=ref_logps,
        sampling_logps=sampling_logps, is_weights=is_weights, num_items_in_batch=num_items_in_batch,
    )
    checks.raise_first()
    return out


def grpo_loss_from_logprobs(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config: Optional[GRPOLossConfig] = None,
    backend: str = "auto",
    validate: bool = True,
    **overrides,
) -> GRPOLossOutput:
    """The GRPO objective from per-token log-probs the caller already has (docs/math.md after the
    vocabulary sweep), for trainers that compute log-probs their own way (verl, OpenRLHF).

    Shapes: logps, entropy, mask, old/ref/sampling_logps, is_weights (B, T) padded, or (N,)
    packed with cu_seqlens (B+1,); advantages (B,) or (B, 1) (one per sequence) or per token. An
    empty batch is not an error: loss and metrics 0, empty outputs, zero gradients (as `grpo_loss`).
    `entropy` is needed only by
    the entropy bonus and the entropy mask. The loss is differentiable w.r.t. logps (and
    entropy); each backend's objective op computes its gradient. `validate` as in `grpo_loss`.
    """
    cfg = resolve_config(config, overrides)
    checks = DeferredChecks(validate)
    require_tensor("logps", logps, dtypes=FLOAT_DTYPES, kind="a float tensor of per-token log-probs")
    token_shape = tuple(logps.shape)
    tokens = token_layout(token_shape, logps.device, cu_seqlens, checks, "logps")
    mask = check_mask(mask, token_shape, logps.device, checks, "logps")
    check_objective_inputs(tokens, advantages, old_logps, ref_logps, sampling_logps, mask, cfg, logps.device,
                           checks, is_weights, anchor="logps")
    check_finite("logps", logps, mask, checks)
    dtype = stats_dtype(logps)
    if entropy is None:
        if cfg.entropy_coef != 0.0 or cfg.top_entropy_quantile < 1.0:
            raise ValueError(
                "entropy is required by entropy_coef != 0 and top_entropy_quantile < 1 "
                f"(got entropy_coef={cfg.entropy_coef}, top_entropy_quantile={cfg.top_entropy_quantile})"
            )
        entropy = torch.zeros_like(logps, dtype=dtype)
    else:
        require_tensor("entropy", entropy, dtypes=FLOAT_DTYPES, kind="a float tensor of per-token entropies")
        require_shape("entropy", entropy, token_shape, "one entropy per token")
        require_device("entropy", entropy, logps.device, "logps")
        check_finite("entropy", entropy, mask, checks)
    name = resolve_backend(backend, logps.device, logps.dtype)
    out = objective_from_logprobs(
        logps.to(dtype).reshape(-1), entropy.to(dtype).reshape(-1), tokens, mask, advantages, cfg.params, name, checks,
        old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps, is_weights=is_weights,
        num_items_in_batch=check_num_items(num_items_in_batch),
    )
    checks.raise_first()
    return out

