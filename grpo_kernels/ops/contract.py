"""The backend contract: the ops every backend (torch, triton, cpp, cuda) implements, with their
shapes and semantics. A backend is a plain module (or object) with these four callables;
`ops/dispatch.py` finds it once per call, and tests/test_backend_contract.py runs every
available backend against this text. Callers never branch on the backend.

Shared conventions: N rows (tokens), V vocabulary, B sequences. Statistics (log-probs,
entropies, lse, the objective's outputs) are fp32, or fp64 for fp64 inputs on the backends
that compute in fp64 (dispatch.FP64_BACKENDS); gradients have the logits' dtype. A backend
reads and writes only the tensors named here, never reads a value on the host, and writes
every element of every output it owns (callers may pass uninitialised buffers).

logprobs_forward(logits, ids, transform, with_entropy, truncation=NO_TRUNCATION, threshold=None,
                 with_sum_pi_sq=False) -> (logp, entropy, lse, threshold, sum_pi_sq)
    logits (N, V) or (B, T, V) with any row strides and unit vocabulary stride; ids (N,) int64
    in [0, V), or outside it for a row whose target is in another rank's vocabulary slice;
    transform: transform.KernelTransform (z' = scale·z, or cap·tanh(scale·z));
    truncation: truncation.Truncation (top_k, top_p, min_p as plain numbers).
    The kept set of a row is K = {v : z_v >= threshold} ∪ {y}, the threshold in RAW logit units
    (an exact logit value, as fp32, or −inf: every entry kept). With `threshold` given ((N,) fp32)
    the backend uses it as is and does not search (the vocabulary-parallel path finds it across
    ranks); otherwise, when truncation.active, the backend finds it per row without sorting the
    vocabulary (docs/math.md, "Truncated sampling": min_p, then top_k, then top_p, on z'), and it
    is −inf when truncation is off.
    Returns five (N,) tensors: logp = z'_y − lse, entropy H = lse − Σ_K p z' (exactly 0 for every
    row when with_entropy is False), lse = logsumexp over K of z', threshold (fp32, as used),
    sum_pi_sq = Σ_K p_v² (exactly 0 for every row when with_sum_pi_sq is False), p = softmax of
    z' over K. −inf logits have p = 0; a row with no finite logit in K has lse = −inf and H = 0.

logprobs_backward(logits, ids, lse, entropy, grad_logp, grad_entropy, transform, out, threshold=None) -> out
    Writes dL/dlogits into `out` (same shape as logits; may be `logits` itself: in place):
    [g_logp (1[v=y] − p_v) − g_H p_v (z'_v − (lse − H))] · dz'_v/dz_v, with p_v = 0 outside
    K (threshold None: −inf, K is every entry), so the gradient is exactly 0 there.
    grad_entropy None means 0. An id outside [0, V) means the row's target lies in another rank's
    vocabulary slice: no one-hot term. −inf logits get gradient 0, never NaN.

objective_pass(prep, params, rows, seqs) -> None
    prep: objective_inputs.PreparedObjective; params: options.LossParams; rows = (lo, hi),
    seqs = (lo, hi). For rows [lo, hi) of sequences [seqs) writes per_token_loss, g_logp
    (dL/dlogp) and g_entropy (dL/dH) of those rows and adds the rows' per-sequence sums into
    prep.partials (options.Slot order; RATIO_MAX as a running max). Token-level losses accept
    any row range; losses that couple a sequence's tokens (params.couples_tokens) are given
    whole sequences.

group_advantages(total, group_index, num_groups, scale_rewards, eps, group_size) ->
        (advantages (N,), mean (G,), std (G,), constant (G,) bool)
    total (N,) aggregated rewards, NaN for an unscorable row; group_index (N,) int64 in
    [0, G); group_size: consecutive groups of that size, or None (any grouping). scale_rewards
    is an options.AdvantageMode public name. Constant groups and NaN rows get advantage 0.
"""
from __future__ import annotations

OPS = ("logprobs_forward", "logprobs_backward", "objective_pass", "group_advantages")


def missing_ops(backend) -> list:
    """The contract's ops that `backend` does not provide (empty: it satisfies the contract)."""
    return [name for name in OPS if not callable(getattr(backend, name, None))]
