"""Fused-linear GRPO: from the last hidden state and the lm_head to the loss, logits never whole.

For a 150k vocabulary the logits are the largest tensor of a GRPO step. Here they exist one
chunk at a time. For each chunk of whole sequences:
    logits = hidden @ weight.T (+ bias)            one GEMM, the chunk only
    logp, H, lse  <- one sweep of the fused kernel
    dL/dlogp, dL/dH <- the per-token objective, with batch-wide normalisers
    dlogits       <- one sweep, written over the chunk's logits (in place)
    d_hidden = dlogits @ weight;  d_weight += dlogits.T @ hidden;  d_bias += Σ dlogits
That is 6·N·H·V FLOPs, the GEMM floor of forward + backward. A sequence whose logits exceed the
chunk budget is split into row blocks: forward over its blocks, then each block's logits are
recomputed for the backward (8·H·V FLOPs per token instead of 6, memory still bounded). With
`top_entropy_quantile < 1`, one extra forward GEMM pass finds the batch-wide entropy quantile first.
Gradients are computed during the forward call and scaled by the upstream gradient in backward.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import reference
from .config import resolve_config
from .functional import (
    check_ids_and_mask, check_num_items, check_objective_inputs, objective_from_logprobs, sequence_or_token_weights,
    token_layout, weights_per_sequence,
)
from .layout import TokenLayout
from .ops.dispatch import backend_module, resolve_backend, stats_dtype
from .ops.objective import has_fused_objective
from .outputs import GRPOLossOutput
from .transform import LogitTransform
from .validation import (
    FLOAT_DTYPES, LOGITS_FROM_HIDDEN, check_ids, check_logp_finite, require_device, require_tensor,
)

# Logits of one chunk at most this many bytes (in the hidden dtype) for chunk_size="auto". On CPU,
# chunks of ~1000 rows keep the d_weight GEMM (K = rows) efficient: at N=2048, H=512, V=32000,
# 256-row chunks took 1.84 s, 1024-row chunks 1.30 s, eager materialised logits 1.37 s (2 cores).
AUTO_CHUNK_BYTES = {"cuda": 256 * 1024 * 1024, "cpu": 128 * 1024 * 1024}


def _check_linear_inputs(hidden, weight, bias, cu_seqlens):
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, kind="a float tensor of last hidden states")
    require_tensor("weight", weight, dtypes=FLOAT_DTYPES, kind="the float (V, H) lm_head weight")
    expected = 2 if cu_seqlens is not None else 3
    if hidden.dim() != expected:
        layout = "packed (N, H) with cu_seqlens" if cu_seqlens is not None else "padded (B, T, H)"
        raise ValueError(f"hidden must be {layout}, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    require_device("weight", weight, hidden.device, "hidden")
    if bias is not None:
        require_tensor("bias", bias, dtypes=FLOAT_DTYPES, kind="a float (V,) tensor")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},) (one per vocabulary entry), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        require_device("bias", bias, hidden.device, "hidden")


def _chunk_rows(chunk_size, vocab: int, hidden: torch.Tensor) -> int:
    if chunk_size == "auto":
        budget = AUTO_CHUNK_BYTES["cuda" if hidden.is_cuda else "cpu"]
        return max(1, budget // (vocab * hidden.element_size()))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto' or a positive int (rows of logits per chunk), got {chunk_size!r}")
    return chunk_size


def row_blocks(r0: int, r1: int, rows: int):
    """[r0, r1) cut into blocks of at most `rows` rows: the logits that may exist at once."""
    return [(s, min(r1, s + rows)) for s in range(r0, r1, rows)]


def sequence_chunks(layout: TokenLayout, cu_seqlens, rows_per_chunk: int) -> List[Tuple[int, int, int, int]]:
    """(first sequence, end sequence, first row, end row) of chunks that hold whole sequences.

    A chunk takes as many whole sequences as fit in `rows_per_chunk` rows, and at least one,
    so a sequence longer than the budget makes a chunk of its own.
    """
    if not layout.packed:
        per = max(1, rows_per_chunk // max(layout.length, 1))
        return [(b0, min(b0 + per, layout.batch), b0 * layout.length, min(b0 + per, layout.batch) * layout.length)
                for b0 in range(0, layout.batch, per)]
    offsets = cu_seqlens.tolist()
    chunks, b0 = [], 0
    while b0 < layout.batch:
        b1 = b0 + 1
        while b1 < layout.batch and offsets[b1 + 1] - offsets[b0] <= rows_per_chunk:
            b1 += 1
        chunks.append((b0, b1, offsets[b0], offsets[b1]))
        b0 = b1
    return chunks


class _Plan:
    """Everything one fused-linear call needs besides the differentiable tensors."""

    def __init__(self, ids, mask, advantages, old, ref, sampling, is_weights, num_items, cu_seqlens, cfg, backend,
                 rows, layout, accumulate_fp32):
        self.ids, self.mask, self.advantages = ids, mask, advantages
        self.old, self.ref, self.sampling, self.is_weights = old, ref, sampling, is_weights
        self.num_items = num_items
        self.cu_seqlens, self.cfg, self.backend, self.layout = cu_seqlens, cfg, backend, layout
        self.rows = rows
        self.chunks = sequence_chunks(layout, cu_seqlens, rows)
        self.accumulate_fp32 = accumulate_fp32
        self.output: Optional[GRPOLossOutput] = None

    def chunk_layout(self, b0, b1, r0, r1) -> TokenLayout:
        device = self.ids.device
        if self.layout.packed:
            return TokenLayout((r1 - r0,), device, self.cu_seqlens[b0:b1 + 1] - self.cu_seqlens[b0])
        return TokenLayout((b1 - b0, self.layout.length), device)

    def token_slice(self, x, b0, b1, r0, r1):
        if x is None:
            return None
        return x.reshape(-1)[r0:r1] if self.layout.packed else x[b0:b1]

    def chunk_advantages(self, b0, b1, r0, r1):
        adv = self.advantages
        return adv[b0:b1] if adv.shape == (self.layout.batch,) else self.token_slice(adv, b0, b1, r0, r1)


def _logits(h, weight, bias):
    return torch.nn.functional.linear(h, weight, bias)


def grad_accumulator_dtype(weight: torch.Tensor, accumulate_fp32: bool) -> torch.dtype:
    """d_weight/d_bias accumulate in at least the weight's precision (fp32 by default, fp64 for fp64)."""
    return torch.promote_types(torch.float32, weight.dtype) if accumulate_fp32 else weight.dtype


# Rows of the vocabulary per d_weight update when the accumulator's dtype differs from the
# inputs': the temporary product is then at most this many rows of (V, H), not all of it.
WEIGHT_GRAD_BLOCK = 8192


def accumulate_weight_grad(d_weight: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> None:
    """d_weight += dlogits.T @ h without a (V, H) temporary."""
    if d_weight.dtype == dlogits.dtype:
        d_weight.addmm_(dlogits.t(), h)
        return
    for v0 in range(0, d_weight.shape[0], WEIGHT_GRAD_BLOCK):
        v1 = min(d_weight.shape[0], v0 + WEIGHT_GRAD_BLOCK)
        d_weight[v0:v1] += (dlogits[:, v0:v1].t() @ h).to(d_weight.dtype)


def accumulate_input_grads(dlogits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, d_hidden_rows,
                           d_weight, d_bias) -> None:
    """The lm_head's chain rule for one block of rows (each target None when not needed):
    d_hidden rows = dlogits @ W, d_weight += dlogits.T @ h, d_bias += the column sums of dlogits."""
    if d_hidden_rows is not None:
        torch.mm(dlogits, weight, out=d_hidden_rows)
    if d_weight is not None:
        accumulate_weight_grad(d_weight, dlogits, h)
    if d_bias is not None:
        d_bias.add_(dlogits.sum(0, dtype=d_bias.dtype))


def _objective_gradients(plan: _Plan, chunk, logp, entropy, totals):
    """dL/dlogp and dL/dH of the chunk's rows, with batch-wide normalisers."""
    b0, b1, r0, r1 = chunk
    layout = plan.chunk_layout(*chunk)
    pad = layout.to_padded
    mask = layout.per_token_mask(plan.token_slice(plan.mask, *chunk))
    dtype = logp.dtype
    adv = plan.chunk_advantages(*chunk).to(dtype)
    adv = adv if adv.shape == (b1 - b0,) else pad(adv.reshape(-1))
    as_stat = lambda x: None if x is None else pad(plan.token_slice(x, *chunk).reshape(-1).to(dtype))  # noqa: E731
    weights = plan.is_weights
    if weights is not None:  # one per sequence: the chunk's sequences; per token: the chunk's tokens
        weights = (weights.reshape(-1)[b0:b1] if weights_per_sequence(weights, plan.layout)
                   else plan.token_slice(weights, *chunk))
    weights = sequence_or_token_weights(weights, layout, dtype)
    keep = None
    if totals.entropy_keep is not None:
        keep = totals.entropy_keep[b0:b1, :layout.length]
    chunk_totals = reference.ObjectiveTotals(totals.normalizer, keep, totals.entropy_normalizer)
    inputs = dict(old_logp=as_stat(plan.old), ref_logp=as_stat(plan.ref), sampling_logp=as_stat(plan.sampling),
                  is_weights=weights, totals=chunk_totals)
    if has_fused_objective(plan.backend):
        _, _, g_logp, g_ent, _ = backend_module(plan.backend).grpo_objective(
            pad(logp), pad(entropy), mask, adv, plan.cfg, **inputs)
    else:
        with torch.enable_grad():
            logp_leaf = pad(logp).requires_grad_(True)
            ent_leaf = pad(entropy).requires_grad_(True)
            loss = reference.policy_objective(logp_leaf, ent_leaf, adv, mask, plan.cfg, **inputs).loss
            g_logp, g_ent = torch.autograd.grad(loss, (logp_leaf, ent_leaf), allow_unused=True)
        g_logp = torch.zeros_like(logp_leaf) if g_logp is None else g_logp
        g_ent = torch.zeros_like(ent_leaf) if g_ent is None else g_ent
    return layout.from_padded(g_logp).reshape(-1).contiguous(), layout.from_padded(g_ent).reshape(-1).contiguous()


class _FusedLinearGRPO(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: _Plan):
        kernels = backend_module(plan.backend)
        cfg, tau = plan.cfg, plan.cfg.logit_transform
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        ids = plan.ids.reshape(-1)
        n = ids.numel()
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        # Zeros, not empty: rows not yet computed must be finite when a row block of a long
        # sequence takes its gradients (token-level objectives; see the chunk loop).
        logp_all = torch.zeros(n, dtype=stats_dtype(hidden), device=hidden.device)
        ent_all = torch.empty_like(logp_all) if cfg.top_entropy_quantile < 1.0 else torch.zeros_like(logp_all)
        padded_mask = plan.layout.per_token_mask(plan.mask)

        if cfg.top_entropy_quantile < 1.0:  # the quantile is batch-wide: one forward pass first
            for s0, s1 in row_blocks(0, n, plan.rows):
                _, ent_all[s0:s1], _ = kernels.logprobs_forward(_logits(h_rows[s0:s1], weight, bias), ids[s0:s1], tau)
        totals = reference.batch_totals(plan.layout.to_padded(ent_all), padded_mask, cfg, plan.num_items)

        d_hidden = torch.empty_like(h_rows) if need_h else None
        acc_dtype = grad_accumulator_dtype(weight, plan.accumulate_fp32)
        d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        bias_dtype = grad_accumulator_dtype(weight, True)
        d_bias = torch.zeros(weight.shape[0], dtype=bias_dtype, device=weight.device) if need_b else None
        need_grad = need_h or need_w or need_b

        def backward_rows(logits, s0, s1, lse, g_logp, g_ent):
            dlogits = kernels.logprobs_backward(logits, ids[s0:s1], lse, ent_all[s0:s1], g_logp, g_ent, tau, logits)
            accumulate_input_grads(dlogits, h_rows[s0:s1], weight, None if d_hidden is None else d_hidden[s0:s1],
                                   d_weight, d_bias)

        for chunk in plan.chunks:
            _, _, r0, r1 = chunk
            blocks = row_blocks(r0, r1, plan.rows)
            if len(blocks) == 1:  # the chunk's logits fit the budget: one pass, logits kept in between
                logits = _logits(h_rows[r0:r1], weight, bias)
                logp, ent, lse = kernels.logprobs_forward(logits, ids[r0:r1], tau)
                logp_all[r0:r1], ent_all[r0:r1] = logp, ent
                if need_grad:
                    g_logp, g_ent = _objective_gradients(plan, chunk, logp, ent, totals)
                    backward_rows(logits, r0, r1, lse, g_logp, g_ent)
                continue
            if need_grad and not cfg.couples_tokens:
                # A sequence longer than the budget, token-level objective: a token's gradient needs
                # only its own log-prob (and batch-wide normalisers), so each row block goes forward
                # and backward at once, at 6·N·H·V. The chunk's other rows stand at 0 (rows not yet
                # computed) while a block's gradients are taken; they do not enter them.
                for s0, s1 in blocks:
                    logits = _logits(h_rows[s0:s1], weight, bias)
                    logp_all[s0:s1], ent_all[s0:s1], lse = kernels.logprobs_forward(logits, ids[s0:s1], tau)
                    g_logp, g_ent = _objective_gradients(plan, chunk, logp_all[r0:r1], ent_all[r0:r1], totals)
                    backward_rows(logits, s0, s1, lse, g_logp[s0 - r0:s1 - r0], g_ent[s0 - r0:s1 - r0])
                continue
            # A sequence longer than the budget whose tokens are coupled (GSPO, VESPO, the off-policy
            # mask): forward its row blocks, then recompute each block's logits for the backward
            # (one extra forward GEMM, 8·N·H·V for this sequence; memory stays bounded).
            lse_rows = torch.empty(r1 - r0, dtype=logp_all.dtype, device=hidden.device)
            for s0, s1 in blocks:
                logp_all[s0:s1], ent_all[s0:s1], lse_rows[s0 - r0:s1 - r0] = kernels.logprobs_forward(
                    _logits(h_rows[s0:s1], weight, bias), ids[s0:s1], tau)
            if not need_grad:
                continue
            g_logp, g_ent = _objective_gradients(plan, chunk, logp_all[r0:r1], ent_all[r0:r1], totals)
            for s0, s1 in blocks:
                backward_rows(_logits(h_rows[s0:s1], weight, bias), s0, s1, lse_rows[s0 - r0:s1 - r0],
                              g_logp[s0 - r0:s1 - r0], g_ent[s0 - r0:s1 - r0])

        flat_mask = None if plan.mask is None else plan.mask.reshape(-1)
        check_logp_finite(logp_all, ent_all, flat_mask, LOGITS_FROM_HIDDEN)
        with torch.no_grad():
            plan.output = objective_from_logprobs(
                logp_all, ent_all, plan.layout, plan.mask, plan.advantages, cfg, plan.backend,
                old_logps=plan.old, ref_logps=plan.ref, sampling_logps=plan.sampling, is_weights=plan.is_weights,
                num_items_in_batch=plan.num_items)
        ctx.grads = (
            None if d_hidden is None else d_hidden.view(hidden.shape),
            None if d_weight is None else d_weight,
            None if d_bias is None else d_bias,
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return plan.output.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads = []
        for g, dtype in zip(ctx.grads, ctx.dtypes):
            if g is not None:
                g = g.to(dtype) if g.dtype != dtype else g
                g = g if torch.equal(grad_loss, torch.ones_like(grad_loss)) else g * grad_loss.to(g.dtype)
            grads.append(g)
        ctx.grads = None
        return grads[0], grads[1], grads[2], None


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    old_logps: Optional[torch.Tensor] = None,
    ref_logps: Optional[torch.Tensor] = None,
    sampling_logps: Optional[torch.Tensor] = None,
    is_weights: Optional[torch.Tensor] = None,
    num_items_in_batch=None,
    cu_seqlens: Optional[torch.Tensor] = None,
    config=None,
    chunk_size="auto",
    backend: str = "auto",
    accumulate_weight_grad_fp32: bool = True,
    **overrides,
) -> GRPOLossOutput:
    """The GRPO loss from hidden states and the lm_head, never materialising the whole logits.

    Shapes (padded): hidden (B, T, H); ids, mask, old/ref/sampling_logps, is_weights (B, T); advantages
    (B,) or (B, T). Packed: hidden (N, H), per-token tensors (N,), cu_seqlens (B+1,).
    weight (V, H) and bias (V,) are the lm_head (tied embeddings work: pass the embedding).
    Same options and numbers as `grpo_loss` on logits = hidden @ weight.T + bias.
    `chunk_size`: rows of logits alive at once, or "auto" (<= 256 MiB on CUDA, 128 MiB on CPU, in
    the hidden dtype). Chunks hold whole sequences; a longer sequence is processed in row blocks
    with its logits recomputed for the backward.
    `accumulate_weight_grad_fp32`: accumulate d_weight in fp32 (default) or in weight's dtype
    (saves V·H·2 bytes for a bf16 lm_head). Only the gradients that are needed are computed
    (a frozen weight costs no d_weight GEMM).
    """
    cfg = resolve_config(config, overrides)
    _check_linear_inputs(hidden, weight, bias, cu_seqlens)
    token_shape = tuple(hidden.shape[:-1])
    layout = token_layout(token_shape, hidden.device, cu_seqlens, "hidden")
    mask = check_ids_and_mask(ids, mask, token_shape, hidden.device, "hidden")
    check_objective_inputs(layout, advantages, old_logps, ref_logps, sampling_logps, mask, cfg, hidden.device,
                           is_weights, anchor="hidden")
    num_items_in_batch = check_num_items(num_items_in_batch)
    vocab = weight.shape[0]
    check_ids(ids, vocab, mask)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    plan = _Plan(ids, mask, advantages, old_logps, ref_logps, sampling_logps, is_weights, num_items_in_batch,
                 cu_seqlens, cfg, name, _chunk_rows(chunk_size, vocab, hidden), layout, accumulate_weight_grad_fp32)
    loss = _FusedLinearGRPO.apply(hidden, weight, bias, plan)
    out = plan.output
    return GRPOLossOutput(loss=loss, logps=out.logps, entropy=out.entropy, per_token_loss=out.per_token_loss,
                          metrics=out.metrics)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Chunked logp/entropy; the backward recomputes each chunk's logits (nothing of size V is kept)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, transform, rows, backend):
        kernels = backend_module(backend)
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        n = ids.numel()
        logp = torch.empty(n, dtype=stats_dtype(hidden), device=hidden.device)
        ent, lse = torch.empty_like(logp), torch.empty_like(logp)
        for r0, r1 in row_blocks(0, n, rows):
            logp[r0:r1], ent[r0:r1], lse[r0:r1] = kernels.logprobs_forward(
                _logits(h_rows[r0:r1], weight, bias), ids[r0:r1], transform)
        ctx.save_for_backward(hidden, weight, bias, ids, lse, ent)
        ctx.transform, ctx.rows, ctx.backend = transform, rows, backend
        ctx.mark_non_differentiable(lse)
        return logp, ent, lse

    @staticmethod
    def backward(ctx, g_logp, g_ent, _):
        hidden, weight, bias, ids, lse, ent = ctx.saved_tensors
        kernels = backend_module(ctx.backend)
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(h_rows) if need_h else None
        acc_dtype = grad_accumulator_dtype(weight, True)
        d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype).contiguous()
        g_ent = None if g_ent is None else g_ent.to(lse.dtype).contiguous()
        for r0, r1 in row_blocks(0, ids.numel(), ctx.rows):
            h = h_rows[r0:r1]
            logits = _logits(h, weight, bias)
            dlogits = kernels.logprobs_backward(logits, ids[r0:r1], lse[r0:r1], ent[r0:r1], g_logp[r0:r1],
                                                None if g_ent is None else g_ent[r0:r1], ctx.transform, logits)
            accumulate_input_grads(dlogits, h, weight, None if d_hidden is None else d_hidden[r0:r1], d_weight,
                                   d_bias)
        return (None if d_hidden is None else d_hidden.view(hidden.shape),
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None, None)


def fused_linear_selective_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: Optional[float] = None,
    return_entropy: bool = False,
    mask: Optional[torch.Tensor] = None,
    chunk_size="auto",
    backend: str = "auto",
):
    """Per-token log-probs (and entropy) of `ids` under softmax(z'), z' the transformed logits
    c·tanh(s·(hidden @ weight.T + bias)/c)/τ (s = logit_scale, c = final_logit_softcapping; without
    a softcap s·logits/τ), as `selective_logprobs`.

    hidden (..., H), ids (...) -> fp32 (...) (fp64 for fp64 hidden/weight). The logits exist one chunk at a time; under
    torch.no_grad() this is how old/reference log-probs are computed without the full logits.
    Differentiable w.r.t. hidden, weight and bias (the backward recomputes each chunk).
    Rows where `mask` is False return 0 and are not checked.
    """
    _check_linear_inputs(hidden, weight, bias, None if hidden.dim() == 3 else torch.zeros(2))
    transform = LogitTransform(temperature, logit_scale, final_logit_softcapping)
    mask = check_ids_and_mask(ids, mask, tuple(hidden.shape[:-1]), hidden.device, "hidden")
    check_ids(ids, weight.shape[0], mask)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    rows = _chunk_rows(chunk_size, weight.shape[0], hidden)
    logp, ent, _ = _FusedLinearLogprobs.apply(hidden, weight, bias, ids.reshape(-1), transform, rows, name)
    flat_mask = None if mask is None else mask.reshape(-1)
    check_logp_finite(logp, ent, flat_mask, LOGITS_FROM_HIDDEN)
    if flat_mask is not None:
        logp, ent = torch.where(flat_mask, logp, 0.0), torch.where(flat_mask, ent, 0.0)
    logp, ent = logp.reshape(ids.shape), ent.reshape(ids.shape)
    return (logp, ent) if return_entropy else logp
