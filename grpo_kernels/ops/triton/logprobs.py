"""Triton kernels: per-token log-prob + entropy over the vocabulary, and its backward.

Roofline: both kernels are memory bound. The forward reads each logit once (N·V·s bytes for
s-byte logits) and writes 3 floats per row; the backward reads the logits once and writes
dlogits once. Forward + backward therefore moves 3·N·V·s bytes, and the benchmark reports
time against that count at the device's measured copy bandwidth.

z' is the transformed logit (grpo_kernels/transform.py): scale·z, or cap·tanh(scale·z) with a
softcap; −inf stays −inf.
Forward, one program per row, one sweep over V tiles with an online log-sum-exp:
    m   running max of z'
    s   Σ exp(z' − m)
    t   Σ exp(z' − m) · (z' − m)    (so H = log s − t/s, no second pass; relative to the max,
                                     so no cancellation when the logits are large)
Backward, one program per row, one sweep:
    dz = [g_logp (1[v=y] − p) − g_H p (z' − E_p[z'])] · dz'/dz,  p = exp(z' − lse)
Rows whose upstream gradients are both 0 (masked tokens) write zeros without reading logits.
Logits are (B, T, V) with any batch and time strides (a `logits[:, :-1]` slice is read in
place, never copied); row r is (r // T, r % T). Packed (N, V) logits are (1, N, V).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...transform import KernelTransform

MAX_BLOCK_V = 4096


def _block_v(vocab: int) -> int:
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


@triton.jit
def _transform(z, scale, cap, HAS_CAP: tl.constexpr):
    """z' = scale·z, or cap·tanh(scale·z) (tanh as 2σ(2x) − 1, as TRL's kernel), −inf kept."""
    if HAS_CAP:
        # |2x| <= 40 already saturates tanh in fp32; the clamp keeps exp(-2x) from overflowing.
        x2 = tl.minimum(tl.maximum(2.0 * scale * z, -40.0), 40.0)
        return tl.where(z == float("-inf"), z, cap * (2.0 * tl.sigmoid(x2) - 1.0))
    return z * scale


@triton.jit
def _transform_grad(z_prime, scale, cap, HAS_CAP: tl.constexpr):
    """dz'/dz from z' itself."""
    if HAS_CAP:
        t = z_prime / cap
        return tl.where(z_prime == float("-inf"), 0.0, cap * scale * (1.0 - t * t))
    return scale


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, ids_ptr, logp_ptr, entropy_ptr, lse_ptr,
    stride_b, stride_t, T, V, scale, cap,
    WITH_ENTROPY: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // T) * stride_b + (row % T) * stride_t
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        z = _transform(tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32), scale, cap, HAS_CAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all −inf so far: avoid −inf − −inf
        d = z - m_ref
        e = tl.exp(d)
        rescale = tl.exp(m - m_ref)
        if WITH_ENTROPY:
            # Operands are masked before multiplying (never 0·inf): no NaN is formed, even in dead lanes.
            m_safe = tl.where(s > 0, m, m_ref)
            t = tl.where(s > 0, rescale * (t + s * (m_safe - m_ref)), 0.0) + tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
        s = s * rescale + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    target = tl.load(ids_ptr + row).to(tl.int64)
    z_target = _transform(tl.load(base + target).to(tl.float32), scale, cap, HAS_CAP)
    tl.store(logp_ptr + row, z_target - lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, tl.log(s) - tl.where(s > 0, t / s, 0.0))
    else:  # the contract (ops/contract.py): zeros when the entropy is not computed
        tl.store(entropy_ptr + row, 0.0)
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, ids_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, out_ptr,
    stride_b, stride_t, out_stride_b, out_stride_t, T, V, scale, cap,
    HAS_GRAD_ENTROPY: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    base = logits_ptr + b * stride_b + t * stride_t
    out = out_ptr + b * out_stride_b + t * out_stride_t
    cols = tl.arange(0, BLOCK_V)
    g_logp = tl.load(grad_logp_ptr + row).to(tl.float32)
    g_ent = tl.zeros((), tl.float32)
    if HAS_GRAD_ENTROPY:
        g_ent = tl.load(grad_entropy_ptr + row).to(tl.float32)
    if (g_logp == 0.0) & (g_ent == 0.0):
        zero = tl.zeros((BLOCK_V,), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            tl.store(out + offs, zero.to(out_ptr.dtype.element_ty), mask=offs < V)
    else:
        lse = tl.load(lse_ptr + row)
        h = tl.load(entropy_ptr + row)  # z' − E[z'] = (z' − lse) + H: no cancellation with large logits
        target = tl.load(ids_ptr + row).to(tl.int64)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            z = _transform(tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32), scale, cap, HAS_CAP)
            d = z - lse
            p = tl.exp(d)
            grad = tl.where(offs == target, g_logp, 0.0) - g_logp * p
            if HAS_GRAD_ENTROPY:
                grad -= g_ent * p * tl.where(p > 0, d + h, 0.0)
            grad = grad * _transform_grad(z, scale, cap, HAS_CAP)
            tl.store(out + offs, grad.to(out_ptr.dtype.element_ty), mask=offs < V)


def _as_3d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 2 else x


def logprobs_forward(logits: torch.Tensor, ids: torch.Tensor, transform: KernelTransform, with_entropy: bool = True):
    """logits (B, T, V) or (N, V) with unit vocabulary stride, ids (N,) -> logp, entropy, lse, each (N,) fp32.

    Without `with_entropy` the entropy sum is skipped and its output is zeros.
    """
    logits = _as_3d(logits)
    _, t, vocab = logits.shape
    n = ids.numel()
    logp = torch.empty(n, dtype=torch.float32, device=logits.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    block = _block_v(vocab)
    scale, cap = transform
    _logprobs_fwd_kernel[(n,)](
        logits, ids, logp, entropy, lse, logits.stride(0), logits.stride(1), t, vocab, scale, cap,
        WITH_ENTROPY=with_entropy, HAS_CAP=cap != 0.0, BLOCK_V=block, num_warps=_num_warps(block),
    )
    return logp, entropy, lse


def logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, transform: KernelTransform, out):
    """Write dL/dlogits into `out` (logits' shape; may be `logits` itself for the in-place variant)."""
    logits, out3 = _as_3d(logits), _as_3d(out)
    _, t, vocab = logits.shape
    n = ids.numel()
    if n == 0:
        return out
    block = _block_v(vocab)
    has_grad_entropy = grad_entropy is not None
    scale, cap = transform
    _logprobs_bwd_kernel[(n,)](
        logits, ids, lse, entropy, grad_logp, grad_entropy if has_grad_entropy else grad_logp, out3,
        logits.stride(0), logits.stride(1), out3.stride(0), out3.stride(1), t, vocab, scale, cap,
        HAS_GRAD_ENTROPY=has_grad_entropy, HAS_CAP=cap != 0.0, BLOCK_V=block, num_warps=_num_warps(block),
    )
    return out
