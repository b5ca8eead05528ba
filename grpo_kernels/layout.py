"""Token layouts: padded (B, T) or packed (N,) with cu_seqlens, and the map between them.

Kernels see logits as rows (N, V) in either case; the per-token objective works on padded
(B, T) tensors. Packed per-token vectors are scattered into (B, T_max) (N elements, never
N·V), so a packed batch gives the same numbers as the padded one.
"""
from __future__ import annotations

from typing import Optional

import torch

from .validation import INT_DTYPES, require_device, require_tensor, tracing


class TokenLayout:
    """Maps per-token tensors in the caller's layout to padded (B, T) and back."""

    def __init__(self, token_shape, device, cu_seqlens: Optional[torch.Tensor] = None):
        self.token_shape = tuple(token_shape)
        self.packed = cu_seqlens is not None
        self.device = device
        if not self.packed:
            self.batch, self.length = self.token_shape
            return
        n = self.token_shape[0]
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        self.batch = lengths.numel()
        self.length = max(1, int(lengths.max())) if self.batch else 1
        self.seq = torch.repeat_interleave(torch.arange(self.batch, device=device), lengths.long(), output_size=n)
        self.pos = torch.arange(n, device=device) - cu_seqlens.long()[self.seq]

    def to_padded(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """(N,) -> (B, T_max), `fill` where there is no token; differentiable."""
        if not self.packed:
            return x.reshape(self.batch, self.length)
        out = torch.full((self.batch, self.length), fill, dtype=x.dtype, device=x.device)
        return out.index_put((self.seq, self.pos), x)

    def from_padded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return x.reshape(self.token_shape)
        return x[self.seq, self.pos]

    def per_token_mask(self, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Padded bool mask: the caller's mask where given, and False on packing padding."""
        if mask is None:
            mask = torch.ones(self.token_shape, dtype=torch.bool, device=self.device)
        return self.to_padded(mask.bool(), fill=False)


def check_cu_seqlens(cu_seqlens, n_tokens: int, device, anchor: str = "logits") -> torch.Tensor:
    require_tensor("cu_seqlens", cu_seqlens, dtypes=INT_DTYPES, kind="an int32/int64 (B+1,) offset tensor")
    require_device("cu_seqlens", cu_seqlens, device, anchor)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with B+1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
    if not tracing():
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != n_tokens:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at N={n_tokens} (the number of packed tokens), "
                f"got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}"
            )
        if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
    return cu_seqlens
