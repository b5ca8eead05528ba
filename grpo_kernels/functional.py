"""Public functional API: selective_logprobs, grpo_loss, group_advantages.

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
from .ops import logprobs_with_entropy, resolve_backend
from .ops.advantages import group_advantages as advantages_op
from .ops.dispatch import backend_module, stats_dtype
from .ops.objective import fused_objective
from .outputs import AdvantageOutput, GRPOLossOutput
from .transform import LogitTransform
from .vocab_parallel import VocabShard, vocab_parallel_logprobs, vocab_shard
from .validation import (
    FLOAT_DTYPES, INT_DTYPES, LOGITS_GIVEN, DeferredChecks, check_cu_seqlens, check_finite, check_ids,
    check_logp_finite, require_device, require_shape, require_tensor,
)

SCALE_REWARDS = ("group", "batch", "none", "rloo", "reinforce++")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


# ----------------------------------------------------------------------------------------
# Shared argument handling (also used by the fused-linear path)
# ----------------------------------------------------------------------------------------

# How the layout errors show the main input's shape, by its name.
_LAYOUT_SHAPES = {"logits": ("(B, T, V)", "(N, V)"), "hidden": ("(B, T, H)", "(N, H)"), "logps": ("(B, T)", "(N,)")}


class Tokens:
    """Where the sequences lie among the caller's tokens, in the one layout every kernel takes:
    token_shape (B, T) padded or (N,) packed; cu_seqlens (B+1,) int64 on the device (padded is
    arange(B+1)·T); num_sequences B. Per-token tensors are used flat, never padded or unpadded."""

    def __init__(self, token_shape, cu_seqlens: torch.Tensor, num_sequences: int):
        self.token_shape, self.cu_seqlens, self.num_sequences = tuple(token_shape), cu_seqlens, num_sequences

    @property
    def num_tokens(self) -> int:
        return math.prod(self.token_shape)


def token_layout(token_shape, device, cu_seqlens, checks: DeferredChecks, anchor="logits") -> Tokens:
    """Tokens for padded (B, T) per-token inputs, or packed (N,) ones with cu_seqlens (no host read)."""
    padded, packed = _LAYOUT_SHAPES[anchor]
    if cu_seqlens is None:
        if len(token_shape) != 2:
            raise ValueError(
                f"per-token inputs must be padded (B, T) ({anchor} {padded}), got token shape {tuple(token_shape)}; "
                "pass cu_seqlens for the packed (N,) layout"
            )
        bsz, length = token_shape
        return Tokens(token_shape, torch.arange(bsz + 1, device=device) * length, bsz)
    if len(token_shape) != 1:
        raise ValueError(f"with cu_seqlens, tokens must be packed (N,) ({anchor} {packed}), "
                         f"got {tuple(token_shape)}")
    cu = check_cu_seqlens(cu_seqlens, token_shape[0], device, checks, anchor)
    return Tokens(token_shape, cu, cu.numel() - 1)


def check_ids_and_mask(ids, mask, token_shape, device, checks: DeferredChecks, anchor="logits"):
    """`anchor` names the input whose rows the ids label: "logits" or "hidden"."""
    require_tensor("ids", ids, dtypes=INT_DTYPES, kind="an integer tensor of token ids")
    require_shape("ids", ids, token_shape, f"one target token per {anchor} row")
    require_device("ids", ids, device, anchor)
    return check_mask(mask, token_shape, device, checks, anchor)


def check_mask(mask, token_shape, device, checks: DeferredChecks, anchor="logits"):
    """None, or the mask as bool after checking its shape, device and (deferred) 0/1 values."""
    if mask is None:
        return None
    require_tensor("mask", mask, dtypes=(torch.bool,) + INT_DTYPES + FLOAT_DTYPES, kind="bool or 0/1 numbers")
    require_shape("mask", mask, token_shape, "one entry per token")
    require_device("mask", mask, device, anchor)
    if mask.dtype != torch.bool:
        if checks.enabled and mask.numel():
            raw, bad = mask, (mask != 0) & (mask != 1)

            def error():
                count, first = int(bad.sum()), raw[bad][0].item()
                return ValueError(f"mask must hold only 0 and 1 (or be bool); found {first!r} "
                                  f"({count} entr{'y' if count == 1 else 'ies'} not 0 or 1)")

            checks.require(~bad.any(), error)
        mask = mask != 0
    return mask


def check_objective_inputs(tokens: Tokens, advantages, old_logps, ref_logps, sampling_logps, mask, cfg, device,
                           checks: DeferredChecks, is_weights=None, anchor="logits"):
    shape, bsz = tokens.token_shape, tokens.num_sequences
    require_tensor("advantages", advantages, dtypes=FLOAT_DTYPES, kind="a float tensor")
    require_device("advantages", advantages, device, anchor)
    if tuple(advantages.shape) not in ((bsz,), shape):
        raise ValueError(
            f"advantages must have shape ({bsz},) (one per sequence) or {shape} (one per token), "
            f"got {tuple(advantages.shape)}"
        )
    check_finite("advantages", advantages, None, checks)
    for name, x in (("old_logps", old_logps), ("ref_logps", ref_logps), ("sampling_logps", sampling_logps)):
        if x is not None:
            require_tensor(name, x, dtypes=FLOAT_DTYPES, kind="a float tensor of per-token log-probs")
            require_shape(name, x, shape, "one log-prob per token")
            require_device(name, x, device, anchor)
    if is_weights is not None:
        require_tensor("is_weights", is_weights, dtypes=FLOAT_DTYPES, kind="a float tensor of importance weights")
        if tuple(is_weights.shape) not in (shape, (bsz,), (bsz, 1)):
            raise ValueError(
                f"is_weights must have shape {shape} (one weight per token), ({bsz},) or ({bsz}, 1) "
                f"(one per sequence), got {tuple(is_weights.shape)}"
            )
        require_device("is_weights", is_weights, device, anchor)
        check_finite("is_weights", is_weights, mask if tuple(is_weights.shape) == shape else None, checks)
        if checks.enabled:
            checks.require(~(is_weights < 0).any(),
                           lambda: ValueError("is_weights must be >= 0 (importance-sampling weights)"))
    check_finite("old_logps", old_logps, mask, checks)
    check_finite("ref_logps", ref_logps, mask, checks)
    if cfg.beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0 (beta={cfg.beta}): the KL term needs them")
    if cfg.is_correction is not None and sampling_logps is None:
        raise ValueError(f"sampling_logps is required when is_correction={cfg.is_correction!r}")


def check_num_items(num_items_in_batch):
    if num_items_in_batch is None:
        return None
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(f"num_items_in_batch must be a scalar, got shape {tuple(num_items_in_batch.shape)}")
        return num_items_in_batch
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)) or not math.isfinite(
        num_items_in_batch
    ) or num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be a non-negative number, got {num_items_in_batch!r}")
    return num_items_in_batch


def weights_per_sequence(is_weights, tokens: Tokens) -> bool:
    """is_weights holds one weight per sequence ((B,) or (B, 1)), not one per token."""
    return is_weights.numel() == tokens.num_sequences and tuple(is_weights.shape) != tokens.token_shape


def advantages_per_token(advantages, tokens: Tokens) -> bool:
    return tuple(advantages.shape) != (tokens.num_sequences,)


def flat(x):
    """A per-token (or per-sequence) tensor as the kernels take it: flat, or None."""
    return None if x is None else x.reshape(-1)


def token_mask(mask, tokens: Tokens, device) -> torch.Tensor:
    """The (N,) bool mask of the caller's tokens: theirs, flattened, or all True."""
    return torch.ones(tokens.num_tokens, dtype=torch.bool, device=device) if mask is None else mask.reshape(-1)


def loss_output(loss, logp, entropy, per_token_loss, metrics, mask: torch.Tensor, shape,
                checks: DeferredChecks) -> GRPOLossOutput:
    """The call's GRPOLossOutput from flat (N,) results, in the caller's token shape: log-probs and
    entropy detached and 0 where masked. Adds the deferred check that the loss came out finite."""
    if checks.enabled:
        checks.require(torch.isfinite(loss.detach()), lambda: ValueError(
            f"the loss came out non-finite ({float(loss)}) although every input passed its checks"))
    return GRPOLossOutput(
        loss=loss,
        logps=torch.where(mask, logp.detach().reshape(-1), 0.0).reshape(shape),
        entropy=torch.where(mask, entropy.detach().reshape(-1), 0.0).reshape(shape),
        per_token_loss=per_token_loss.reshape(shape),
        metrics=metrics,
    )


def masked_logprobs(logp, entropy, mask, shape, return_entropy: bool, checks: DeferredChecks,
                    logits: str = LOGITS_GIVEN):
    """The end of the log-prob calls: the finiteness checks, the call's one host read, 0 where
    masked, the caller's token shape."""
    flat_mask = flat(mask)
    check_logp_finite(logp, entropy, flat_mask, checks, logits)
    checks.raise_first()
    if flat_mask is not None:
        logp, entropy = torch.where(flat_mask, logp, 0.0), torch.where(flat_mask, entropy, 0.0)
    logp = logp.reshape(shape)
    return (logp, entropy.reshape(shape)) if return_entropy else logp


def objective_from_logprobs(
    logp_rows, entropy_rows, tokens: Tokens, mask, advantages, cfg, backend: str, checks: DeferredChecks, *,
    old_logps=None, ref_logps=None, sampling_logps=None, is_weights=None, num_items_in_batch=None,
) -> GRPOLossOutput:
    """Apply the per-token objective to flat (N,) logp/entropy (differentiable) in the backend's
    objective op, on the caller's tokens as they are (packed, or padded read as B sequences of T)."""
    flat_mask = token_mask(mask, tokens, logp_rows.device)
    # Without an entropy bonus the loss does not depend on H: detached, the log-prob backward then
    # takes its cheaper path without the entropy term (the entropy mask is detached anyway).
    entropy_in = entropy_rows if cfg.entropy_coef != 0.0 else entropy_rows.detach()
    loss, per_token_loss, metrics = fused_objective(
        flat(logp_rows), flat(entropy_in), flat_mask, flat(advantages), tokens.cu_seqlens, cfg,
        backend, adv_per_token=advantages_per_token(advantages, tokens),
        weights_per_seq=is_weights is not None and weights_per_sequence(is_weights, tokens),
        old_logp=flat(old_logps), ref_logp=flat(ref_logps), sampling_logp=flat(sampling_logps),
        is_weights=flat(is_weights), num_items_in_batch=num_items_in_batch)
    return loss_output(loss, logp_rows, entropy_rows, per_token_loss, metrics, flat_mask, tokens.token_shape,
                       checks)


def _check_logits(logits, cu_seqlens):
    require_tensor("logits", logits, dtypes=FLOAT_DTYPES, kind="a float tensor (fp32, bf16, fp16 or fp64)")
    expected = 2 if cu_seqlens is not None else 3
    if logits.dim() != expected:
        layout = "packed (N, V) with cu_seqlens" if cu_seqlens is not None else "padded (B, T, V)"
        raise ValueError(f"logits must be {layout}, got shape {tuple(logits.shape)}")
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


def _logprobs(logits, ids, transform, backend, inplace_backward, with_entropy, shard: Optional[VocabShard]):
    """(logp, entropy, lse) (N,) over the whole vocabulary, from the whole logits or this rank's slice."""
    rows, flat_ids = _rows(logits), ids.reshape(-1)
    if shard is None:
        return logprobs_with_entropy(rows, flat_ids, transform, backend, inplace_backward, with_entropy=with_entropy)
    return vocab_parallel_logprobs(rows, flat_ids, shard, transform, backend, inplace_backward, with_entropy)


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
    """
    checks = DeferredChecks(validate)
    require_tensor("logits", logits, dtypes=FLOAT_DTYPES, kind="a float tensor (fp32, bf16, fp16 or fp64)")
    if cu_seqlens is not None:
        token_layout(tuple(logits.shape[:-1]), logits.device, cu_seqlens, checks)
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., V), got shape {tuple(logits.shape)}")
    transform = LogitTransform(temperature, logit_scale, final_logit_softcapping)
    mask = check_ids_and_mask(ids, mask, tuple(logits.shape[:-1]), logits.device, checks)
    name = resolve_backend(backend, logits.device, logits.dtype)
    shard = logits_shard(logits, process_group, vocab_start, validate)
    check_ids(ids, logits.shape[-1] if shard is None else shard.total, mask, checks)
    logp, entropy, _ = _logprobs(logits, ids, transform, name, inplace_backward, return_entropy, shard)
    return masked_logprobs(logp, entropy, mask, ids.shape, return_entropy, checks)


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
    and is_weights (B,) or (B, T). Packed: logits (N, V), per-token tensors (N,),
    cu_seqlens (B+1,) int32, advantages and is_weights (B,) or (N,). is_weights may also be (B, 1).
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
    logp, entropy, _ = _logprobs(logits, ids, cfg.logit_transform, name, inplace_backward, True, shard)
    check_logp_finite(logp, entropy, None if mask is None else mask.reshape(-1), checks)
    out = objective_from_logprobs(
        logp, entropy, tokens, mask, advantages, cfg, name, checks, old_logps=old_logps, ref_logps=ref_logps,
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
    packed with cu_seqlens (B+1,); advantages (B,) or per token. `entropy` is needed only by
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
        logps.to(dtype).reshape(-1), entropy.to(dtype).reshape(-1), tokens, mask, advantages, cfg, name, checks,
        old_logps=old_logps, ref_logps=ref_logps, sampling_logps=sampling_logps, is_weights=is_weights,
        num_items_in_batch=check_num_items(num_items_in_batch),
    )
    checks.raise_first()
    return out


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: Optional[int] = None,
    group_ids: Optional[torch.Tensor] = None,
    scale_rewards: str = "group",
    eps: float = 1e-4,
    reward_weights=None,
    reward_aggregation: str = "sum_then_normalize",
    backend: str = "auto",
    validate: bool = True,
) -> AdvantageOutput:
    """Group-relative advantages from rewards (docs/math.md, "Group advantages").

    rewards: (N,) or (N, F) for F reward functions, NaN where a reward is missing.
    Groups: `group_size` consecutive rows (N divisible by it) or `group_ids` (N,) ints.
    scale_rewards: "group" | "batch" | "none" | "rloo" | "reinforce++".
    reward_weights: (F,) weights (default ones). reward_aggregation: "sum_then_normalize"
    or "normalize_then_sum" (GDPO: z-score per function within groups, sum, normalise
    over the batch; scale_rewards is not used then).
    validate=True checks the values (no inf, finite weights, groups of >= 2) with one host sync;
    validate=False checks none. With group_size the call never synchronises; group_ids needs one
    read to count the groups (torch.unique).
    """
    checks = DeferredChecks(validate)
    rewards, weights, group_index, num_groups = _check_rewards(
        rewards, group_size, group_ids, scale_rewards, eps, reward_weights, reward_aggregation, checks
    )
    name = resolve_backend(backend, rewards.device, rewards.dtype)
    r = rewards.float() if rewards.dtype != torch.float64 else rewards
    w = weights.to(r.dtype)
    if reward_aggregation == "normalize_then_sum":
        r = backend_module("torch").zscore_within_groups(r, group_index, num_groups, eps, group_size)
        scale = "gdpo"
    else:
        scale = scale_rewards
    unscorable = torch.isnan(rewards).all(dim=1)
    total = torch.where(unscorable, float("nan"), torch.nansum(r * w, dim=1))
    adv, mean, std, constant = advantages_op(total, group_index, num_groups, scale, eps, group_size, name)
    checks.raise_first()
    return AdvantageOutput(
        advantages=adv.to(r.dtype), group_mean=mean.to(r.dtype), group_std=std.to(r.dtype),
        frac_zero_std=constant.to(r.dtype).mean(), group_index=group_index,
    )


def _check_rewards(rewards, group_size, group_ids, scale_rewards, eps, reward_weights, reward_aggregation,
                   checks: DeferredChecks):
    require_tensor("rewards", rewards, dtypes=FLOAT_DTYPES, kind="a float tensor (NaN for missing rewards)")
    if rewards.dim() not in (1, 2) or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be (N,) or (N, F) with N >= 1, got shape {tuple(rewards.shape)}")
    rewards = rewards if rewards.dim() == 2 else rewards.unsqueeze(-1)
    n, num_funcs = rewards.shape
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not valid; expected one of {list(SCALE_REWARDS)}")
    if reward_aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(
            f"reward_aggregation={reward_aggregation!r} is not valid; expected one of {list(REWARD_AGGREGATIONS)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if checks.enabled:
        checks.require(~torch.isinf(rewards).any(),
                       lambda: ValueError("rewards contain inf; use NaN for a missing reward"))
    if reward_weights is None:
        weights = torch.ones(num_funcs, dtype=rewards.dtype, device=rewards.device)
    else:
        weights = torch.as_tensor(reward_weights, dtype=rewards.dtype, device=rewards.device)
        if weights.shape != (num_funcs,):
            raise ValueError(f"reward_weights must have shape ({num_funcs},) (one per reward function), got "
                             f"{tuple(weights.shape)}")
        if checks.enabled:
            checks.require(torch.isfinite(weights).all(), lambda: ValueError("reward_weights must be finite"))

    if (group_size is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_size (consecutive groups) or group_ids (any grouping)")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {group_size!r}")
        if n % group_size:
            raise ValueError(f"group_size={group_size} does not divide the number of rewards N={n}")
        if group_size == 1:
            raise ValueError("group_size=1: a group-relative advantage needs at least 2 completions per group")
        group_index = torch.arange(n, device=rewards.device) // group_size
        num_groups = n // group_size
    else:
        require_tensor("group_ids", group_ids, dtypes=INT_DTYPES, kind="an integer tensor")
        require_shape("group_ids", group_ids, (n,), "one group id per reward row")
        require_device("group_ids", group_ids, rewards.device, "rewards")
        _, group_index = torch.unique(group_ids, return_inverse=True)
        counts = torch.bincount(group_index)
        num_groups = counts.numel()
        if checks.enabled:
            checks.require((counts >= 2).all(), lambda: ValueError(
                f"group_ids has groups of size 1 (ids {torch.unique(group_ids)[counts < 2][:5].tolist()}); "
                "a group-relative advantage needs >= 2"))
    return rewards, weights, group_index, num_groups
