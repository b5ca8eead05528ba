"""objective: the GRPO objective alone from per-token log-probs (grpo_loss_from_logprobs), forward +
backward, against TRL's loss lines (eager and torch.compile) on the same log-probs.
"""
from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

from .common import LOSS_OPTIONS, SEQ_LEN, Task, _baselines, _ours, trl_loss_lines

FP32, MASK = 4, 1


def objective_bytes(shape) -> int:
    """Compulsory bytes of a per-token objective's forward + backward: the log-probs, old and
    reference log-probs (fp32) and the mask read, d loss / d log-prob (fp32) written."""
    return shape.n * (3 * FP32 + MASK + FP32)


def build_objective(shape, device):
    gen = torch.Generator().manual_seed(0)
    b, t = max(1, shape.n // SEQ_LEN), min(SEQ_LEN, shape.n)
    logp = (torch.randn(b, t, generator=gen) - 2).clamp(max=-0.01)
    noise = lambda: 0.2 * torch.randn(b, t, generator=gen)  # noqa: E731
    return dict(logp=logp.to(device), old_logps=(logp + noise()).to(device), ref_logps=(logp + noise()).to(device),
                mask=(torch.rand(b, t, generator=gen) > 0.1).to(device),
                advantages=torch.randn(b, generator=gen).to(device))


def _leaf(x):
    return x["logp"].detach().requires_grad_(True)


def _ours_objective(backend):
    def run(x):
        logp = _leaf(x)
        out = gk.grpo_loss_from_logprobs(logp, x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                                         ref_logps=x["ref_logps"], backend=backend, **LOSS_OPTIONS)
        torch.autograd.grad(out.loss, logp)
        return out.loss.detach()
    return run


def eager_objective(x):
    """TRL 1.16's GRPOTrainer loss lines on the log-probs, and their gradient."""
    logp = _leaf(x)
    loss = trl_loss_lines(logp, x)
    torch.autograd.grad(loss, logp)
    return loss.detach()


def _oracle_objective(x):
    terms = R.policy_objective(x["logp"].float(), torch.zeros_like(x["logp"]), x["advantages"], x["mask"],
                               gk.GRPOLossConfig(**LOSS_OPTIONS), old_logp=x["old_logps"], ref_logp=x["ref_logps"])
    return terms.loss.detach()


def objective_contenders(device):
    grad = lambda s: s.n * FP32  # noqa: E731
    out = _ours(device, _ours_objective, grad_bytes=grad)
    return out + _baselines(eager_objective, "TRL's loss lines on the log-probs", grad_bytes=grad)


TASK = Task("objective", build_objective, objective_contenders, _oracle_objective, bytes_moved=objective_bytes,
            tolerance=lambda s: 1e-4)
