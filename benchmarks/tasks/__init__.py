"""What is benchmarked: six tasks, their inputs, their cost model and their contenders.

Tasks, one module each in this package (what they share is in common.py):
  logprobs     selective log-probs forward, no grad (the old/reference-policy pass)
  loss         the GRPO loss from logits, forward + backward (dapo, beta=0.04, asymmetric clip)
  linear       the fused-linear GRPO loss from hidden states and lm_head, forward + backward
  objective    the GRPO objective alone from per-token log-probs, forward + backward
  verl_policy  verl's 'vanilla' policy loss from per-token log-probs, forward + backward (where verl is installed)
  advantages   group advantages of N rewards in groups of 8
  truncation   log-probs + entropy of the top-p 0.8 truncated distribution (python -m benchmarks.tasks.truncation
               also compares top-k, min-p and the plain pass, on the CPU)

Standalone, outside the harness's sweep (`python -m benchmarks.tasks.<name>`, results in benchmarks/results/):
  verl_policy_losses       verl's 12 policy losses against ours, time and host reads per call, B=256 x 1024
  verl_rollout_correction  verl's rollout correction against ours, time and host reads per call, B=256 x 1024
  sum_pi_squared           log-prob + entropy with and without Σπ² in the same pass (N=2048, V=32000)

Baselines are what users run today: plain eager PyTorch written the way TRL writes it
(log_softmax + gather, then GRPOTrainer's loss lines) and `torch.compile` of the same code; every
ratio in the results is against them (for verl_policy, verl's own eager loss). Peers (TRL's
kernels, Liger, verl) run when installed. The reference (`grpo_kernels.reference`, the ground
truth the tests run in fp64; here in fp32 on the benchmark's inputs) is the correctness oracle:
each contender's value is compared with it before timing (`agreement` in results.csv), and a
contender that disagrees is reported, not timed. The reference itself is never timed.
"""
from __future__ import annotations

import torch

from . import advantages, linear, logprobs, loss, objective, truncation, verl_policy
from .advantages import eager_advantages
from .common import (COMPILED, EAGER, LOSS_OPTIONS, OURS, PEER, SEQ_LEN, Contender, Shape, Skipped, Task, agreement,
                     trl_loss_lines)
from .linear import eager_linear
from .logprobs import eager_logprobs
from .loss import eager_loss

TASKS = {module.TASK.name: module.TASK
         for module in (logprobs, loss, linear, objective, advantages, verl_policy, truncation)}


def split_contenders(task: str, device: torch.device):
    """(runnable contenders, skipped ones) of a task on this device."""
    entries = TASKS[task].contenders(device)
    return [e for e in entries if isinstance(e, Contender)], [e for e in entries if isinstance(e, Skipped)]


def find_contender(task: str, device: torch.device, name: str) -> Contender:
    return next(c for c in split_contenders(task, device)[0] if c.name == name)


__all__ = ["COMPILED", "EAGER", "LOSS_OPTIONS", "OURS", "PEER", "SEQ_LEN", "TASKS", "Contender", "Shape", "Skipped",
           "Task", "agreement", "eager_advantages", "eager_linear", "eager_logprobs", "eager_loss", "find_contender",
           "split_contenders", "trl_loss_lines"]
