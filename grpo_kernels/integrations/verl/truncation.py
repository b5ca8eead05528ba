"""verl's actor log-probs over the kept set of verl's own rollout sampler (opt-in).

verl samples training rollouts with `actor_rollout_ref.rollout.temperature`, `top_k` (vLLM's
convention: -1 is off) and `top_p` (verl's agent loop passes exactly these to vLLM/SGLang), but
its actor and reference log-probs are over the whole vocabulary (only the temperature reaches
them), so every importance ratio π_train/π_rollout is biased by the kept mass. With
`patch_truncation(rollout_truncation(config.actor_rollout_ref.rollout))` the log-probs verl's
FSDP, automodel and torchtitan engines compute (the eager `logprobs_from_logits` on logits already
divided by the temperature, and, with use_fused_kernels=True, our fused-linear drop-ins) are those
of the truncated distribution: renormalised over the kept set (docs/math.md, "Truncated sampling").

In a verl run, set GRPO_KERNELS_VERL_TRUNCATION=1 in the workers' environment: the plugin then
wraps `ActorRolloutRefWorker.__init__`, which reads `config.rollout` in every worker process and
patches that process (`install_worker_hook`). Validation rollouts (val_kwargs) are not training
data and are not read.
"""
from __future__ import annotations

import functools
import importlib

from ...losses import selective_logprobs
from ...truncation import Truncation, sampler_truncation
from .fused_linear import patch_fused_linear

# verl's engines whose forward calls `logprobs_from_logits` by the name they imported.
ENGINE_MODULES = ("verl.workers.engine.fsdp.transformer_impl", "verl.workers.engine.automodel.transformer_impl",
                  "verl.workers.engine.torchtitan.transformer_impl",
                  "verl.trainer.ppo.prefix_grouper_utils")  # the prefix-grouper forward imports it too


def rollout_truncation(rollout_config) -> Truncation:
    """The truncation verl's training rollouts sample with: `top_k` (-1 or 0: off), `top_p`, and
    `min_p` where the config has one (verl 0.9.1's has none). Takes verl's RolloutConfig or its
    OmegaConf node (`config.actor_rollout_ref.rollout`). Greedy rollouts (do_sample=False) raise:
    their "distribution" is a point mass, which no log-prob renormalisation describes."""
    get = rollout_config.get if hasattr(rollout_config, "get") else functools.partial(getattr, rollout_config)
    if not get("do_sample", True):
        raise ValueError("actor_rollout_ref.rollout.do_sample=False samples greedily: there is no truncated "
                         "distribution to compute log-probs of; set do_sample=True or leave "
                         "GRPO_KERNELS_VERL_TRUNCATION unset")
    return sampler_truncation(top_k=get("top_k", -1), top_p=get("top_p", 1.0), min_p=get("min_p", None))


def truncated_logprobs_from_logits(logits, labels, inplace_backward=True, *, truncation: Truncation,
                                   backend: str = "auto"):
    """Drop-in for verl's `logprobs_from_logits(logits, labels, inplace_backward)` (logits (..., V)
    already divided by the temperature, labels (...)) -> fp32 log-probs (...) over the kept set."""
    return selective_logprobs(logits, labels.long(), backend=backend, **truncation._asdict())


def patch_truncation(truncation: Truncation, backend: str = "auto") -> None:
    """Make this process's verl engines compute actor/reference log-probs over `truncation`'s kept
    set: the eager path of every engine in ENGINE_MODULES that imports, and the fused-linear path
    (patch_fused_linear with the truncation). A no-op for a truncation that is off."""
    if not truncation.active:
        return
    patch_fused_linear(backend, truncation=truncation)
    replacement = functools.partial(truncated_logprobs_from_logits, truncation=truncation, backend=backend)
    for name in ENGINE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an engine whose own dependencies (torchtitan, nemo automodel) are missing
            continue
        module.logprobs_from_logits = replacement


def install_worker_hook(backend: str = "auto") -> None:
    """Wrap verl's `ActorRolloutRefWorker.__init__` so that each worker, once it has its config,
    patches its own process with the truncation of `config.rollout` (`patch_truncation`)."""
    from verl.workers.engine_workers import ActorRolloutRefWorker

    original = ActorRolloutRefWorker.__init__
    if getattr(original, "_grpo_kernels_truncation", False):
        return

    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        patch_truncation(rollout_truncation(config.rollout), backend)

    __init__._grpo_kernels_truncation = True
    ActorRolloutRefWorker.__init__ = __init__
