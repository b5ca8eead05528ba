"""Argument checks: every message names the argument and what was expected.

Checks that need a value from the device (ids in range, −inf targets, NaN) cost one host
sync each; they are skipped while torch.compile traces, where data-dependent checks would
break the graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def tracing() -> bool:
    return torch.compiler.is_compiling()


def require_tensor(name: str, x, *, dtypes: Sequence[torch.dtype], kind: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({kind}), got {type(x).__name__}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {kind}, got dtype {x.dtype}")
    return x


def require_shape(name: str, x: torch.Tensor, shape: Sequence[int], what: str) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({what}), got {tuple(x.shape)}")


def require_device(name: str, x: torch.Tensor, device: torch.device, anchor: str = "logits") -> None:
    """`anchor` names the input that fixes the device (logits, hidden, logps)."""
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {anchor} is on {device}; move it to {device}")


def check_ids(ids: torch.Tensor, vocab: int, mask: Optional[torch.Tensor]) -> None:
    if tracing() or ids.numel() == 0:
        return
    live = ids if mask is None else ids[mask]
    if live.numel() and (bool((live < 0).any()) or bool((live >= vocab).any())):
        raise ValueError(
            f"ids must lie in [0, V={vocab}); got values in [{int(live.min())}, {int(live.max())}]"
        )


# How the error messages name the logits: given, or computed from hidden and the lm_head weight.
LOGITS_GIVEN = "logits"
LOGITS_FROM_HIDDEN = "the logits hidden @ weight.T (+ bias)"


def check_logp_finite(logp: torch.Tensor, entropy: torch.Tensor, mask: Optional[torch.Tensor],
                      logits: str = LOGITS_GIVEN) -> None:
    """A −inf target logit or NaN logits would otherwise poison the loss silently."""
    if tracing() or logp.numel() == 0:
        return
    # Elementwise with the mask, like check_finite: boolean indexing would cost a nonzero() pass.
    def live(bad: torch.Tensor) -> torch.Tensor:
        return bad if mask is None else bad & mask

    if bool(live(torch.isnan(logp)).any()) or bool(live(torch.isnan(entropy)).any()):
        hint = "; check hidden and weight for NaN/inf" if logits == LOGITS_FROM_HIDDEN else ""
        raise ValueError(f"{logits} contain NaN in rows that are not masked out (log-probs came out NaN){hint}")
    if bool(live(torch.isinf(logp)).any()):
        raise ValueError(
            f"{logits}: the target logit of some unmasked token is -inf (logp = -inf); the sampled token was "
            "masked by top-k/top-p in these logits, or ids do not match them"
        )


def check_finite(name: str, x: Optional[torch.Tensor], mask: Optional[torch.Tensor] = None) -> None:
    if x is None or tracing() or x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if mask is not None and x.shape == mask.shape:
        finite = finite | ~mask  # elementwise, not x[mask]: boolean indexing costs a nonzero() pass
    if not bool(finite.all()):
        raise ValueError(f"{name} contains NaN or inf in unmasked positions")
