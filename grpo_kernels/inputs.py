"""Argument handling shared by the public functions (losses.py, fused_linear.py): where the
sequences lie among the caller's tokens, the checks of the per-token inputs, and the assembly of
the outputs in the caller's token shape. Every message names the argument and what was expected.

Empty batches (no sequences, or no tokens: B = 0, T = 0, N = 0) are valid input everywhere and
never raise: outputs come back empty in the caller's shape, the loss and every metric are 0, and
the gradients are zeros; every public docstring says so (tests/test_api_shapes.py).
"""
from __future__ import annotations

import math

import torch

from .outputs import GRPOLossOutput
from .validation import (
    FLOAT_DTYPES, INT_DTYPES, LOGITS_GIVEN, DeferredChecks, check_cu_seqlens, check_finite, check_logp_finite,
    require_device, require_shape, require_tensor,
)


# How the layout errors show the main input's shape, by its name.
_LAYOUT_SHAPES = {"logits": ("(B, T, V)", "(N, V)"), "hidden": ("(B, T, H)", "(N, H)"), "logps": ("(B, T)", "(N,)")}
# What every layout error says about packed inputs.
PACKED_HINT = ("pass cu_seqlens, the (B+1,) int32 offsets of the sequences (sequence i is rows "
               "cu_seqlens[i]:cu_seqlens[i+1]), with every per-token input packed (N,)")

def require_layout(name: str, x: torch.Tensor, packed: bool) -> None:
    """The main input `name` (logits, hidden) is padded (B, T, last) or, with cu_seqlens, packed
    (N, last); a wrong one is told how to pass the other layout."""
    padded_shape, packed_shape = _LAYOUT_SHAPES[name]
    if x.dim() == (2 if packed else 3):
        return
    if packed:
        hint = f"; drop cu_seqlens for padded {padded_shape} {name}" if x.dim() == 3 else ""
        raise ValueError(f"{name} must be packed {packed_shape} with cu_seqlens, got shape {tuple(x.shape)}{hint}")
    hint = f"; for packed {packed_shape} {name}, {PACKED_HINT}" if x.dim() == 2 else ""
    raise ValueError(f"{name} must be padded {padded_shape}, got shape {tuple(x.shape)}{hint}")


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
                f"per-token inputs must be padded (B, T) ({anchor} {padded}), got token shape {tuple(token_shape)}"
                + (f"; for packed {packed} {anchor}, {PACKED_HINT}" if len(token_shape) == 1 else "")
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
    if tuple(advantages.shape) not in ((bsz,), (bsz, 1), shape):
        raise ValueError(
            f"advantages must have shape ({bsz},) or ({bsz}, 1) (one per sequence) or {shape} (one per token), "
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
    """advantages hold one value per token, not one per sequence ((B,) or (B, 1)). Padded with
    T = 1, (B, 1) is both, with the same numbers; packed with N = B, (B,) is one per sequence."""
    return tuple(advantages.shape) not in ((tokens.num_sequences,), (tokens.num_sequences, 1))


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
                    logits: str = LOGITS_GIVEN, sum_pi_sq=None):
    """The end of the log-prob calls: the finiteness checks, the call's one host read, 0 where
    masked, the caller's token shape. `sum_pi_sq` (N,) or None: appended last when given."""
    flat_mask = flat(mask)
    check_logp_finite(logp, entropy, flat_mask, checks, logits)
    checks.raise_first()
    outputs = [logp] + ([entropy] if return_entropy else []) + ([sum_pi_sq] if sum_pi_sq is not None else [])
    if flat_mask is not None:
        outputs = [torch.where(flat_mask, x, 0.0) for x in outputs]
    outputs = [x.reshape(shape) for x in outputs]
    return outputs[0] if len(outputs) == 1 else tuple(outputs)
