"""Fused-linear GRPO: from the last hidden state and the lm_head to the loss, logits never whole.

For a 150k vocabulary the logits are the largest tensor of a GRPO step. Here they exist one
chunk at a time, in one preallocated buffer. For each chunk:
    logits = hidden @ weight.T (+ bias)            one GEMM, the chunk only
    logp, H, lse  <- one sweep of the fused kernel
    loss, dL/dlogp, dL/dH <- one pass of the objective op over the chunk's rows, with the
                     batch-wide normalisers (ops/normalizers.py); its partial sums add up to
                     the batch's loss and metrics, so each token's objective is evaluated once
    dlogits       <- one sweep, written over the chunk's logits (in place)
    d_hidden = dlogits @ weight;  d_weight += dlogits.T @ hidden;  d_bias += Σ dlogits
That is 6·N·H·V FLOPs, the GEMM floor of forward + backward. Token-level objectives chunk by
rows whatever the sequence lengths. Objectives that couple a sequence's tokens chunk by whole
sequences; a sequence whose logits exceed the budget is forwarded block by block, evaluated,
and each block's logits recomputed for the backward (8·H·V FLOPs per token, memory bounded).
With `top_entropy_quantile < 1`, one extra forward GEMM pass finds the batch-wide quantile first.
Gradients are computed during the forward call and scaled by the upstream gradient in backward;
the loss, log-probs, entropy, per-token loss and metrics leave as the Function's outputs.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Tuple

import torch

from .config import resolve_config
from .inputs import (
    Tokens, advantages_per_token, check_ids_and_mask, check_num_items, check_objective_inputs, flat, loss_output,
    masked_logprobs, require_layout, token_layout, token_mask, weights_per_sequence,
)
from .ops import objective_inputs as io
from .ops.dispatch import resolve_backend, stats_dtype
from .ops.logprobs import RowStats, logits_grad, safe_ids
from .ops.normalizers import batch_totals
from .ops.objective import objective_pass
from .outputs import GRPOLossOutput
from .options import LossParams
from .transform import KernelTransform, LogitTransform
from .truncation import Truncation, make_truncation
from .validation import (
    FLOAT_DTYPES, LOGITS_FROM_HIDDEN, DeferredChecks, check_ids, check_logp_finite, require_device, require_tensor,
)
from .vocab_parallel import VocabShard, gradient_ids, rows_stats, vocab_shard

# Logits of one chunk at most this many bytes (in the hidden dtype) for chunk_size="auto". On CPU,
# chunks of ~1000 rows keep the d_weight GEMM (K = rows) efficient: at N=2048, H=512, V=32000,
# 256-row chunks took 1.84 s, 1024-row chunks 1.30 s, eager materialised logits 1.37 s (2 cores).
AUTO_CHUNK_BYTES = {"cuda": 256 * 1024 * 1024, "cpu": 128 * 1024 * 1024}


def _check_linear_inputs(hidden, weight, bias, packed: Optional[bool]):
    """packed: hidden must be (N, H) (True), (B, T, H) (False), or any (..., H) (None)."""
    require_tensor("hidden", hidden, dtypes=FLOAT_DTYPES, kind="a float tensor of last hidden states")
    require_tensor("weight", weight, dtypes=FLOAT_DTYPES, kind="the float (V, H) lm_head weight")
    _refuse_sharded_parameter(weight)
    if packed is not None:
        require_layout("hidden", hidden, packed)
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


def _refuse_sharded_parameter(weight) -> None:
    """A DTensor lm_head (FSDP2's fully_shard, or a TP-sharded parameter) holds only this rank's
    piece: using its local rows as if they were the whole weight would give wrong log-probs silently."""
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            "weight is a DTensor (a sharded parameter, e.g. from FSDP2's fully_shard): compute the loss inside the "
            "sharded module's forward (FSDP2 then gathers the weight), or pass weight.full_tensor(); for a "
            "vocabulary-sharded lm_head pass its local rows (weight.to_local()) with process_group=")


def _sharded_vocab(hidden, weight, process_group, vocab_start, validate) -> Optional[VocabShard]:
    rows = hidden.numel() // max(hidden.shape[-1], 1)
    return vocab_shard(process_group, vocab_start, weight.shape[0], rows, hidden.shape[-1], hidden.device, validate,
                       what="the lm_head rows")


def _chunk_rows(chunk_size, vocab: int, hidden: torch.Tensor, shard: Optional[VocabShard] = None) -> int:
    """Rows of logits per chunk. Vocabulary-parallel ranks must cut the same chunks (each chunk
    is a collective): "auto" then sizes them for the widest slice, gathered by the layout check,
    or agreed with one all-reduce when it did not run (validate=False)."""
    if chunk_size == "auto":
        budget = AUTO_CHUNK_BYTES["cuda" if hidden.is_cuda else "cpu"]
        widest = vocab if shard is None or shard.widest is None else shard.widest
        rows = max(1, budget // (widest * hidden.element_size()))
        return shard.fewest(rows, hidden.device) if shard is not None and shard.widest is None else rows
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be 'auto' or a positive int (rows of logits per chunk), got {chunk_size!r}")
    return chunk_size


def row_blocks(r0: int, r1: int, rows: int):
    """[r0, r1) cut into blocks of at most `rows` rows: the logits that may exist at once."""
    return [(s, min(r1, s + rows)) for s in range(r0, r1, rows)]


def sequence_chunks(offsets: List[int], rows_per_chunk: int) -> List[Tuple[int, int, int, int]]:
    """(first sequence, end sequence, first row, end row) of chunks that hold whole sequences.

    `offsets` are cu_seqlens on the host. A chunk takes as many whole sequences as fit in
    `rows_per_chunk` rows, and at least one, so a longer sequence makes a chunk of its own.
    """
    chunks, b0, bsz = [], 0, len(offsets) - 1
    while b0 < bsz:
        b1 = b0 + 1
        while b1 < bsz and offsets[b1 + 1] - offsets[b0] <= rows_per_chunk:
            b1 += 1
        chunks.append((b0, b1, offsets[b0], offsets[b1]))
        b0 = b1
    return chunks


def _whole_sequence_chunks(tokens: Tokens, rows: int, packed: bool):
    """Chunks of whole sequences, for objectives that couple a sequence's tokens. Padded batches
    cut at multiples of T; packed ones read cu_seqlens on the host (the one sync of this path)."""
    if not packed:
        bsz, length = tokens.token_shape
        per = max(1, rows // max(length, 1))
        return [(b0, min(b0 + per, bsz), b0 * length, min(b0 + per, bsz) * length) for b0 in range(0, bsz, per)]
    offsets = tokens.cu_seqlens.tolist()
    if offsets[0] != 0 or offsets[-1] != tokens.num_tokens or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must start at 0, end at N={tokens.num_tokens} and be non-decreasing, "
                         f"got {offsets[:8]}{' ...' if len(offsets) > 8 else ''}")
    return sequence_chunks(offsets, rows)


class _LogitsBuffer:
    """One preallocated (rows, V) buffer that every block's logits reuse (the hidden dtype)."""

    def __init__(self, rows: int, weight: torch.Tensor, bias: Optional[torch.Tensor], h_rows: torch.Tensor):
        self.weight, self.bias, self.h_rows = weight, bias, h_rows
        self.storage = torch.empty(rows * weight.shape[0], dtype=h_rows.dtype, device=h_rows.device)

    def __call__(self, s0: int, s1: int) -> torch.Tensor:
        """hidden[s0:s1] @ weight.T (+ bias) into the buffer."""
        out = self.storage[:(s1 - s0) * self.weight.shape[0]].view(s1 - s0, self.weight.shape[0])
        h = self.h_rows[s0:s1]
        if self.bias is None:
            return torch.mm(h, self.weight.t(), out=out)
        return torch.addmm(self.bias, h, self.weight.t(), out=out)


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


class LossBatch(NamedTuple):
    """The per-token inputs of one fused-linear loss call, flat: ids, mask (N,); advantages and
    is_weights (B,) or (N,); old, ref, sampling (N,) or None; num_items a number or None;
    cu_seqlens (B+1,)."""

    ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old: Optional[torch.Tensor]
    ref: Optional[torch.Tensor]
    sampling: Optional[torch.Tensor]
    is_weights: Optional[torch.Tensor]
    num_items: object
    cu_seqlens: torch.Tensor


class LinearPlan(NamedTuple):
    """Everything but the tensors that steers one fused-linear loss call."""

    params: LossParams
    backend: str
    rows: int  # rows of logits per chunk
    accumulate_fp32: bool
    packed: bool
    token_shape: tuple
    adv_per_token: bool
    weights_per_seq: bool
    shard: Optional[VocabShard]  # this rank's slice of a vocabulary-parallel lm_head (vocab_parallel.py)
    reduce_hidden_grad: bool
    truncation: Truncation  # the sampler's top-k / top-p / min-p (the log-probs of its kept set)


class _FusedLinearGRPO(torch.autograd.Function):
    """Forward computes the loss, its outputs and every input gradient, chunk by chunk; backward
    scales the gradients by the upstream one. Each token's objective is evaluated once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, plan: "LinearPlan", *tensors):
        # The per-token tensors come as positional tensors (LossBatch order) so that torch.compile
        # sees each one; everything else that steers the call is in `plan`, plain values.
        ids, mask, advantages, old, ref, sampling, is_weights, num_items, cu_seqlens = tensors
        params, backend, rows, shard = plan.params, plan.backend, plan.rows, plan.shard
        tokens = Tokens(plan.token_shape, cu_seqlens, cu_seqlens.numel() - 1)
        tau = KernelTransform(params.transform_scale, params.transform_cap)
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        n, bsz = tokens.num_tokens, tokens.num_sequences
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        need_grad = need_h or need_w or need_b
        logits_of = _LogitsBuffer(min(rows, max(n, 1)), weight, bias, h_rows)
        logp_all = torch.zeros(n, dtype=stats_dtype(hidden), device=hidden.device)
        ent_all, lse_all = torch.zeros_like(logp_all), torch.zeros_like(logp_all)
        truncation = plan.truncation
        # Each chunk's rows are whole rows of the vocabulary (or of this rank's slice): the kernel
        # finds their thresholds from the chunk's logits; the backward takes them back.
        threshold_all = torch.full_like(logp_all, float("-inf")) if truncation.active else None

        if params.has_entropy_mask:  # the quantile is batch-wide: one forward pass first
            for s0, s1 in row_blocks(0, n, rows):
                ent_all[s0:s1] = rows_stats(logits_of(s0, s1), ids[s0:s1], tau, backend, shard,
                                            truncation=truncation).entropy
        totals = batch_totals(ent_all, mask, tokens.cu_seqlens, params, num_items)
        prep = io.prepare(logp_all, ent_all, mask, advantages, tokens.cu_seqlens, params, old_logp=old, ref_logp=ref,
                          sampling_logp=sampling, is_weights=is_weights, totals=totals,
                          adv_per_token=plan.adv_per_token, weights_per_seq=plan.weights_per_seq)
        logp_all, ent_all = prep.logp, prep.entropy  # the same buffers (already flat and contiguous)

        d_hidden = torch.empty_like(h_rows) if need_h else None
        d_weight = (torch.zeros(weight.shape, dtype=grad_accumulator_dtype(weight, plan.accumulate_fp32),
                                device=weight.device) if need_w else None)
        d_bias = (torch.zeros(weight.shape[0], dtype=grad_accumulator_dtype(weight, True), device=weight.device)
                  if need_b else None)

        def forward_rows(s0, s1):
            logits = logits_of(s0, s1)
            stats = rows_stats(logits, ids[s0:s1], tau, backend, shard, truncation=truncation)
            logp_all[s0:s1], ent_all[s0:s1], lse_all[s0:s1] = stats.logp, stats.entropy, stats.lse
            if threshold_all is not None:
                threshold_all[s0:s1] = stats.threshold
            return logits

        def backward_rows(logits, s0, s1):
            # Without an entropy bonus dL/dH is 0: the cheaper backward without the entropy term.
            g_ent = prep.g_entropy[s0:s1] if params.entropy_coef != 0.0 else None
            dlogits = logits_grad(logits, gradient_ids(ids[s0:s1], shard), lse_all[s0:s1], ent_all[s0:s1],
                                  prep.g_logp[s0:s1], g_ent, tau, backend, inplace=True,
                                  threshold=None if threshold_all is None else threshold_all[s0:s1])
            accumulate_input_grads(dlogits, h_rows[s0:s1], weight, None if d_hidden is None else d_hidden[s0:s1],
                                   d_weight, d_bias)

        if params.couples_tokens:
            chunks = _whole_sequence_chunks(tokens, rows, plan.packed)
        else:
            # A token's gradient needs only its own log-prob, its sequence's token count and the
            # batch-wide normalisers: row blocks whatever the sequences (each pass covering every
            # sequence's rows in the block), and no host read of cu_seqlens.
            chunks = [(0, bsz, s0, s1) for s0, s1 in row_blocks(0, n, rows)]
        for b0, b1, r0, r1 in chunks:
            blocks = row_blocks(r0, r1, rows)
            if len(blocks) == 1:  # the chunk's logits fit the budget: kept between the passes (6·N·H·V)
                logits = forward_rows(r0, r1)
                objective_pass(prep, params, backend, (r0, r1), (b0, b1))
                if need_grad:
                    backward_rows(logits, r0, r1)
                continue
            # One sequence longer than the budget whose tokens are coupled (GSPO, VESPO, the off-policy
            # mask, sequence IS): forward its row blocks, evaluate it whole, then recompute each
            # block's logits for the backward (8·H·V FLOPs per token instead of 6; memory bounded).
            for s0, s1 in blocks:
                forward_rows(s0, s1)
            objective_pass(prep, params, backend, (r0, r1), (b0, b1))
            if need_grad:
                for s0, s1 in blocks:
                    backward_rows(logits_of(s0, s1), s0, s1)

        if shard is not None and plan.reduce_hidden_grad and d_hidden is not None:
            shard.all_reduce(d_hidden)  # each slice's dlogits @ W_k is a partial sum over the vocabulary
        loss, vector = io.finish(prep, params)
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        ctx.input_shape = hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(logp_all, ent_all, prep.per_token_loss, vector)
        return loss.clone(), logp_all, ent_all, prep.per_token_loss, vector

    @staticmethod
    def backward(ctx, grad_loss, *_):
        grads = []
        for g, dtype in zip(ctx.saved_tensors, ctx.dtypes):
            if g is not None:  # scaled in place: the forward made these buffers for this backward only
                g = g.mul_(grad_loss.to(g.dtype)).to(dtype)
            grads.append(g)
        d_hidden = None if grads[0] is None else grads[0].view(ctx.input_shape)
        return (d_hidden, grads[1], grads[2], None) + (None,) * len(LossBatch._fields)


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
    validate: bool = True,
    process_group=None,
    vocab_start: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    **overrides,
) -> GRPOLossOutput:
    """The GRPO loss from hidden states and the lm_head, never materialising the whole logits.

    Shapes (padded): hidden (B, T, H); ids, mask, old/ref/sampling_logps (B, T); advantages and
    is_weights (B,) or (B, 1) (one per sequence) or (B, T). Packed: hidden (N, H), per-token tensors
    (N,), cu_seqlens (B+1,). An empty batch (B = 0, T = 0 or N = 0) is not an error: the loss and
    metrics are 0, the per-token outputs empty, the gradients zeros (as `grpo_loss`).
    weight (V, H) and bias (V,) are the lm_head (tied embeddings work: pass the embedding).
    Same options and numbers as `grpo_loss` on logits = hidden @ weight.T + bias.
    `chunk_size`: rows of logits alive at once, or "auto" (<= 256 MiB on CUDA, 128 MiB on CPU, in
    the hidden dtype), in one buffer reused by every chunk. Token-level objectives take row blocks
    whatever the sequence lengths (6·N·H·V FLOPs); objectives that couple a sequence's tokens
    (GSPO, VESPO, the off-policy mask, sequence IS) take whole sequences per chunk, and a sequence
    longer than a chunk has its logits recomputed for the backward (8·H·V per token).
    `validate`: as in `grpo_loss`. With validate=False and a token-level objective the call does
    not synchronise; a packed batch with a coupling objective reads cu_seqlens once to chunk it.
    `accumulate_weight_grad_fp32`: accumulate d_weight in fp32 (default) or in weight's dtype
    (saves V·H·2 bytes for a bf16 lm_head). Only the gradients that are needed are computed
    (a frozen weight costs no d_weight GEMM).
    Vocabulary-parallel (Megatron's column-parallel lm_head): with `process_group`, weight (V_local, H)
    and bias (V_local,) are this rank's rows, ids [vocab_start, vocab_start + V_local) (default
    rank · V_local); ids stay global and hidden is the same on every rank. Every rank gets the
    full-vocabulary loss, log-probs, entropy and metrics and its slice's d_weight; d_hidden is
    all-reduced inside (reduce_hidden_grad=True) or left as this rank's partial sum (False, for
    callers whose own region function reduces it). Every rank must pass the same chunk_size
    ("auto" sizes the chunks for the widest slice on every rank).
    """
    cfg = resolve_config(config, overrides)
    params = cfg.params
    checks = DeferredChecks(validate)
    _check_linear_inputs(hidden, weight, bias, cu_seqlens is not None)
    token_shape = tuple(hidden.shape[:-1])
    tokens = token_layout(token_shape, hidden.device, cu_seqlens, checks, "hidden")
    mask = check_ids_and_mask(ids, mask, token_shape, hidden.device, checks, "hidden")
    check_objective_inputs(tokens, advantages, old_logps, ref_logps, sampling_logps, mask, cfg, hidden.device,
                           checks, is_weights, anchor="hidden")
    num_items_in_batch = check_num_items(num_items_in_batch)
    vocab = weight.shape[0]
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    shard = _sharded_vocab(hidden, weight, process_group, vocab_start, validate)
    check_ids(ids, vocab if shard is None else shard.total, mask, checks)
    flat_mask = token_mask(mask, tokens, hidden.device)
    plan = LinearPlan(params, name, _chunk_rows(chunk_size, vocab, hidden, shard), bool(accumulate_weight_grad_fp32),
                      cu_seqlens is not None, token_shape, advantages_per_token(advantages, tokens),
                      is_weights is not None and weights_per_sequence(is_weights, tokens), shard,
                      bool(reduce_hidden_grad), cfg.truncation)
    batch = LossBatch(_kernel_ids(ids, vocab, shard), flat_mask, flat(advantages), flat(old_logps), flat(ref_logps),
                      flat(sampling_logps), flat(is_weights), num_items_in_batch, tokens.cu_seqlens)
    loss, logp, entropy, per_token_loss, vector = _FusedLinearGRPO.apply(hidden, weight, bias, plan, *batch)
    check_logp_finite(logp, entropy, flat_mask, checks, LOGITS_FROM_HIDDEN)
    out = loss_output(loss, logp, entropy, per_token_loss, io.metrics_from_vector(vector, params), flat_mask,
                      token_shape, checks)
    checks.raise_first()
    return out


def _kernel_ids(ids, vocab: int, shard: Optional[VocabShard]):
    """Flat ids the kernels can read: clamped into [0, V), or global for a vocabulary slice (the
    shard makes them local; ids in no rank's slice, as masked -100, belong to none)."""
    return safe_ids(ids.reshape(-1), vocab) if shard is None else ids.reshape(-1)


class _FusedLinearLogprobs(torch.autograd.Function):
    """Chunked logp/entropy (and Σp²); the backward recomputes each chunk's logits (nothing of
    size V is kept; with truncation, each row's threshold is)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, transform, rows, backend, shard, reduce_hidden_grad,
                truncation: Truncation, with_sum_pi_sq: bool):
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        n = ids.numel()
        logits_of = _LogitsBuffer(min(rows, max(n, 1)), weight, bias, h_rows)
        stats = RowStats(*(torch.empty(n, dtype=stats_dtype(hidden), device=hidden.device) for _ in RowStats._fields))
        for r0, r1 in row_blocks(0, n, rows):
            chunk = rows_stats(logits_of(r0, r1), ids[r0:r1], transform, backend, shard, True, truncation,
                               with_sum_pi_sq)
            for whole, part in zip(stats, chunk):
                whole[r0:r1] = part
        ctx.save_for_backward(hidden, weight, bias, gradient_ids(ids, shard), stats.lse, stats.entropy,
                              stats.threshold if truncation.active else None)
        ctx.transform, ctx.rows, ctx.backend = transform, rows, backend
        ctx.shard, ctx.reduce_hidden_grad = shard, reduce_hidden_grad
        ctx.mark_non_differentiable(stats.lse, stats.sum_pi_sq)
        return stats.logp, stats.entropy, stats.lse, stats.sum_pi_sq

    @staticmethod
    def backward(ctx, g_logp, g_ent, _, _sum_pi_sq):
        hidden, weight, bias, ids, lse, ent, threshold = ctx.saved_tensors
        h_rows = hidden.reshape(-1, hidden.shape[-1])
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        d_hidden = torch.empty_like(h_rows) if need_h else None
        acc_dtype = grad_accumulator_dtype(weight, True)
        d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        d_bias = torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device) if need_b else None
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp.to(lse.dtype).contiguous()
        g_ent = None if g_ent is None else g_ent.to(lse.dtype).contiguous()
        logits_of = _LogitsBuffer(min(ctx.rows, max(ids.numel(), 1)), weight, bias, h_rows)
        for r0, r1 in row_blocks(0, ids.numel(), ctx.rows):
            dlogits = logits_grad(logits_of(r0, r1), ids[r0:r1], lse[r0:r1], ent[r0:r1], g_logp[r0:r1],
                                  None if g_ent is None else g_ent[r0:r1], ctx.transform, ctx.backend, inplace=True,
                                  threshold=None if threshold is None else threshold[r0:r1])
            accumulate_input_grads(dlogits, h_rows[r0:r1], weight, None if d_hidden is None else d_hidden[r0:r1],
                                   d_weight, d_bias)
        if ctx.shard is not None and ctx.reduce_hidden_grad and d_hidden is not None:
            ctx.shard.all_reduce(d_hidden)
        return (None if d_hidden is None else d_hidden.view(hidden.shape),
                None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype)) + (None,) * (len(ctx.needs_input_grad) - 3)


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
    validate: bool = True,
    process_group=None,
    vocab_start: Optional[int] = None,
    reduce_hidden_grad: bool = True,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    min_p: Optional[float] = None,
    return_sum_pi_squared: bool = False,
):
    """Per-token log-probs (and entropy) of `ids` under softmax(z'), z' the transformed logits
    c·tanh(s·(hidden @ weight.T + bias)/c)/τ (s = logit_scale, c = final_logit_softcapping; without
    a softcap s·logits/τ), as `selective_logprobs`.

    hidden (..., H), ids (...) -> fp32 (...) (fp64 for fp64 hidden/weight). The logits exist one chunk at a time; under
    torch.no_grad() this is how old/reference log-probs are computed without the full logits.
    Differentiable w.r.t. hidden, weight and bias (the backward recomputes each chunk).
    Rows where `mask` is False return 0 and are not checked. `validate`: as in `selective_logprobs`.
    An empty batch (no rows) is not an error: empty log-probs, zero gradients.
    `process_group`, `vocab_start`, `reduce_hidden_grad`: a vocabulary-parallel lm_head, as in
    `fused_linear_grpo_loss` (weight holds this rank's (V_local, H) rows).
    `top_k`, `top_p`, `min_p` (the sampler's truncation) and `return_sum_pi_squared` (Σ_v p_v² per
    token, appended last) as in `selective_logprobs`; each chunk finds its rows' thresholds from
    its own logits (a chunk holds whole rows), across ranks when vocabulary-parallel.
    """
    checks = DeferredChecks(validate)
    truncation = make_truncation(top_k, top_p, min_p)
    _check_linear_inputs(hidden, weight, bias, None)
    transform = LogitTransform(temperature, logit_scale, final_logit_softcapping).kernel
    mask = check_ids_and_mask(ids, mask, tuple(hidden.shape[:-1]), hidden.device, checks, "hidden")
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    shard = _sharded_vocab(hidden, weight, process_group, vocab_start, validate)
    check_ids(ids, weight.shape[0] if shard is None else shard.total, mask, checks)
    rows = _chunk_rows(chunk_size, weight.shape[0], hidden, shard)
    logp, ent, _, sum_pi_sq = _FusedLinearLogprobs.apply(
        hidden, weight, bias, _kernel_ids(ids, weight.shape[0], shard), transform, rows, name, shard,
        bool(reduce_hidden_grad), truncation, bool(return_sum_pi_squared))
    return masked_logprobs(logp, ent, mask, ids.shape, return_entropy, checks, LOGITS_FROM_HIDDEN,
                           sum_pi_sq=sum_pi_sq if return_sum_pi_squared else None)
