"""verl_policy: verl's 'vanilla' policy loss from per-token log-probs, forward + backward,
against ours registered in verl (grpo_kernels.integrations.verl). Runs only where verl is installed.
"""
from __future__ import annotations

import torch

from .common import EAGER, SEQ_LEN, Contender, Skipped, Task, _have, _ours


def build_verl_policy(shape, device):
    """verl's inputs to a policy loss: per-token log-probs (B, T), advantages per token."""
    gen = torch.Generator().manual_seed(0)
    b, t = max(1, shape.n // SEQ_LEN), min(SEQ_LEN, shape.n)
    logp = (torch.randn(b, t, generator=gen) - 2).to(device)
    return dict(log_prob=logp, old_log_prob=logp + 0.2 * torch.randn(b, t, generator=gen).to(device),
                advantages=torch.randn(b, 1, generator=gen).expand(b, t).contiguous().to(device),
                mask=(torch.rand(b, t, generator=gen) > 0.1).to(device))


def _verl_actor_config():
    from verl.workers.config import ActorConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio_low=0.2,
                       clip_ratio_high=0.28)


def _verl_policy_run(loss_fn, config):
    def run(x):
        leaf = x["log_prob"].detach().requires_grad_(True)
        loss, _ = loss_fn(x["old_log_prob"], leaf, x["advantages"], x["mask"], "token-mean", config)
        torch.autograd.grad(loss, leaf)
        return loss.detach()
    return run


def verl_policy_contenders(device):
    if not _have("verl"):
        return [Skipped("verl_policy (every contender)", "verl is not installed")]
    from verl.trainer.ppo import core_algos

    from grpo_kernels.integrations import verl as gk_verl

    config = _verl_actor_config()
    grad = lambda s: s.n * 4  # noqa: E731 - d log_prob, fp32
    out = [Contender("verl 'vanilla' (eager)", _verl_policy_run(core_algos.get_policy_loss_fn("vanilla"), config),
                     grad_bytes=grad, role=EAGER)]
    out += _ours(device, lambda b: _verl_policy_run(gk_verl.policy_loss_fn("vanilla", b), config), grad_bytes=grad)
    for entry in out[1:]:
        entry.name += " 'grpo_kernels_vanilla'"
    return out


def _oracle_verl_policy(x):
    from verl.trainer.ppo import core_algos

    return _verl_policy_run(core_algos.get_policy_loss_fn("vanilla"), _verl_actor_config())(x)


TASK = Task("verl_policy", build_verl_policy, verl_policy_contenders, _oracle_verl_policy,
            tolerance=lambda s: 1e-4)
