"""Argument checks: every message names the argument and what was expected.

Checks of types, shapes and devices run at once (metadata only). Checks that need values from
the device (ids in range, −inf targets, NaN, mask values, cu_seqlens offsets) are collected in
a `DeferredChecks` and read with one host sync at the end of the call (`validate=True`), or not
run at all (`validate=False`, and while torch.compile traces: they would break the graph).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

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


class DeferredChecks:
    """The data-dependent checks of one call, reduced on the device and read with one host sync.

    Each check adds a 0-d bool (True: passed) and a function that builds its error; `raise_first`
    reads every flag at once and raises the first failed check's error, in the order they were
    added, so the errors are the same as checking one by one. Building an error may read more
    from the device (the offending values): that costs only on the failing path. Disabled
    (validate=False, or while torch.compile traces) it records nothing and reads nothing.
    """

    def __init__(self, enabled: bool = True):
        if not isinstance(enabled, bool):
            raise TypeError(f"validate must be True or False, got {enabled!r}")
        self.enabled = enabled and not tracing()
        self._flags: list = []
        self._errors: list = []

    def require(self, ok: torch.Tensor, error: Callable[[], Exception]) -> None:
        if self.enabled:
            self._flags.append(ok.reshape(()))
            self._errors.append(error)

    def raise_first(self) -> None:
        """The call's one host sync: every flag read together."""
        if not self._flags:
            return
        flags, errors = self._flags, self._errors
        self._flags, self._errors = [], []
        for passed, error in zip(torch.stack([f.to(flags[0].device) for f in flags]).tolist(), errors):
            if not passed:
                raise error()


def check_ids(ids: torch.Tensor, vocab: int, mask: Optional[torch.Tensor], checks: DeferredChecks) -> None:
    if not checks.enabled or ids.numel() == 0:
        return
    bad = (ids < 0) | (ids >= vocab)
    if mask is not None:
        bad = bad & mask

    def error():
        live = ids if mask is None else ids[mask]
        return ValueError(f"ids must lie in [0, V={vocab}); got values in [{int(live.min())}, {int(live.max())}]")

    checks.require(~bad.any(), error)


# How the error messages name the logits: given, or computed from hidden and the lm_head weight.
LOGITS_GIVEN = "logits"
LOGITS_FROM_HIDDEN = "the logits hidden @ weight.T (+ bias)"


def check_logp_finite(logp: torch.Tensor, entropy: torch.Tensor, mask: Optional[torch.Tensor], checks: DeferredChecks,
                      logits: str = LOGITS_GIVEN) -> None:
    """A −inf target logit or NaN logits would otherwise poison the loss silently."""
    if not checks.enabled or logp.numel() == 0:
        return

    # Elementwise with the mask, like check_finite: boolean indexing would cost a nonzero() pass.
    def live(bad: torch.Tensor) -> torch.Tensor:
        return bad if mask is None else bad & mask

    hint = "; check hidden and weight for NaN/inf" if logits == LOGITS_FROM_HIDDEN else ""
    nan = live(torch.isnan(logp)) | live(torch.isnan(entropy))
    checks.require(~nan.any(), lambda: ValueError(
        f"{logits} contain NaN in rows that are not masked out (log-probs came out NaN){hint}"))
    checks.require(~live(torch.isinf(logp)).any(), lambda: ValueError(
        f"{logits}: the target logit of some unmasked token is -inf (logp = -inf); the sampled token was "
        "masked by top-k/top-p in these logits, or ids do not match them"))


def check_finite(name: str, x: Optional[torch.Tensor], mask: Optional[torch.Tensor], checks: DeferredChecks) -> None:
    if x is None or not checks.enabled or x.numel() == 0:
        return
    finite = torch.isfinite(x)
    if mask is not None and x.shape == mask.shape:
        finite = finite | ~mask  # elementwise, not x[mask]: boolean indexing costs a nonzero() pass
    checks.require(finite.all(), lambda: ValueError(f"{name} contains NaN or inf in unmasked positions"))


def check_cu_seqlens(cu_seqlens, n_tokens: int, device, checks: DeferredChecks, anchor: str = "logits"):
    """Type, device and shape now; the offsets (0 first, N last, non-decreasing) among the deferred checks.
    Returns the offsets as int64 (the kernels clamp them to [0, N], so bad ones never index out of bounds)."""
    require_tensor("cu_seqlens", cu_seqlens, dtypes=INT_DTYPES, kind="an int32/int64 (B+1,) offset tensor")
    require_device("cu_seqlens", cu_seqlens, device, anchor)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D with B+1 offsets (a batch of no sequences is [0]), got shape "
                         f"{tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.long()
    if checks.enabled:
        checks.require((cu[0] == 0) & (cu[-1] == n_tokens), lambda: ValueError(
            f"cu_seqlens must start at 0 and end at N={n_tokens} (the number of packed tokens), "
            f"got {int(cu[0])} .. {int(cu[-1])}"))
        checks.require((cu[1:] >= cu[:-1]).all(), lambda: ValueError("cu_seqlens must be non-decreasing"))
    return cu
