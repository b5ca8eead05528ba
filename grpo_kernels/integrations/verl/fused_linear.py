"""Fused-linear log-probs for verl's actor (use_fused_kernels=True): drop-ins for verl's
`FusedLinearForPPO` and `linear_cross_entropy`, and `patch_fused_linear`, which installs them."""
from __future__ import annotations

import functools
import threading

import torch

from ...fused_linear import fused_linear_selective_logprobs
from ...truncation import NO_TRUNCATION, Truncation

# Σπ² for verl's optimal-token baselines (sum_pi_squared.py): its engine wrapper sets .requested per
# micro-batch; the drop-ins below then also return Σπ² from the same pass and keep it in .value.
SUM_PI_SQUARED = threading.local()


def _fused_logprobs(hidden, weight, ids, temperature, backend, truncation, **kwargs):
    """(log_probs, entropy) of the fused-linear pass, keeping Σπ² when the engine asked for it."""
    requested = getattr(SUM_PI_SQUARED, "requested", False)
    out = fused_linear_selective_logprobs(hidden, weight, ids.long(), temperature=float(temperature),
                                          return_entropy=True, backend=backend, return_sum_pi_squared=requested,
                                          **truncation._asdict(), **kwargs)
    if requested:
        SUM_PI_SQUARED.value = out[2]
    return out[0], out[1]


class FusedLinearForPPO(torch.nn.Module):
    """Drop-in for verl's `FusedLinearForPPO`: (log_probs, entropy) of `input_ids` from the hidden
    states and the lm_head weight, without materialising the logits.

    forward(hidden_states (..., H), vocab_weights (V, H), input_ids (...), temperature) ->
    fp32 (log_probs, entropy), each of input_ids' shape; differentiable w.r.t. hidden_states and
    vocab_weights. verl's `chunk_size` and `impl_backend` are accepted and ignored: the chunk
    size follows grpo_kernels' memory budget and `backend` picks our kernels. `truncation`: the
    rollout sampler's top-k/top-p/min-p (verl/truncation.py); the log-probs and entropy are then
    those of the distribution renormalised over the kept set.
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", backend: str = "auto",
                 truncation: Truncation = NO_TRUNCATION):
        super().__init__()
        self.backend, self.truncation = backend, truncation

    def forward(self, hidden_states, vocab_weights, input_ids, temperature: float = 1.0):
        return _fused_logprobs(hidden_states, vocab_weights, input_ids, temperature, self.backend, self.truncation)


def linear_cross_entropy(hidden, weight, labels, temperature: float = 1.0, reduction: str = "none",
                         dist_process_group=None, backend: str = "auto", truncation: Truncation = NO_TRUNCATION):
    """Drop-in for `verl.utils.kernel.linear_cross_entropy.linear_cross_entropy`: flat fp32
    (log_probs (N,), entropy (N,)) for hidden (..., H) and labels (...). Only reduction="none".

    With `dist_process_group` (verl's vocabulary-parallel lm_head) `weight` is this rank's
    (V / world, H) rows, ids [rank · V_local, (rank + 1) · V_local), labels global, as verl
    shards it; every rank gets the full-vocabulary log-probs and entropy, d_weight of its rows,
    and, as verl's kernel, its partial d_hidden (the caller's tensor-parallel region reduces it).
    `truncation`: as FusedLinearForPPO's (the thresholds found across the ranks' slices).
    """
    if reduction != "none":
        raise ValueError(f"reduction={reduction!r} is not supported; grpo_kernels returns per-token values ('none')")
    return _fused_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1), temperature, backend,
                           truncation, process_group=dist_process_group, reduce_hidden_grad=False)


def patch_fused_linear(backend: str = "auto", truncation: Truncation = NO_TRUNCATION) -> None:
    """Make verl's fused-kernel model forwards (use_fused_kernels=True, impl_backend "torch" or
    "triton") use our fused-linear log-probs (over `truncation`'s kept set, default the whole
    vocabulary). verl imports both names inside the forward, so replacing the module attributes
    is enough."""
    import verl.utils.experimental.torch_functional as torch_functional
    import verl.utils.kernel.linear_cross_entropy as lce

    torch_functional.FusedLinearForPPO = functools.partial(FusedLinearForPPO, backend=backend, truncation=truncation)
    lce.linear_cross_entropy = functools.partial(linear_cross_entropy, backend=backend, truncation=truncation)
