"""logprobs: selective log-probs forward, no grad (the old/reference-policy pass).
"""
from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

from .common import Task, _baselines, _ours, _peer, _token_inputs, device_randn


def build_logprobs(shape, device):
    gen = torch.Generator().manual_seed(0)
    inputs = _token_inputs(shape, device, gen)
    inputs["logits"] = device_randn((inputs["b"], inputs["t"], shape.v), gen, device, torch.float32).mul_(2).to(
        shape.torch_dtype)
    return inputs


def eager_logprobs(x):
    """log_softmax + gather on the whole (B, T, V) logits: the naive code TRL documents."""
    return torch.log_softmax(x["logits"].float(), -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)


def _oracle_logprobs(x):
    return R.logprobs_and_entropy(x["logits"].float(), x["ids"])[0]


def logprobs_contenders(device):
    out = _ours(device, lambda b: (lambda x: gk.selective_logprobs(x["logits"], x["ids"], backend=b)))
    out += _baselines(eager_logprobs, "log_softmax + gather")

    def trl():
        from trl.trainer.utils import selective_log_softmax
        return lambda x: selective_log_softmax(x["logits"], x["ids"])
    note = "TRL's fused Triton kernel on CUDA" if device.type == "cuda" else "eager: per-row logsumexp loop"
    out += _peer("trl", "TRL selective_log_softmax", trl, note=note)
    return out


TASK = Task("logprobs", build_logprobs, logprobs_contenders, _oracle_logprobs,
            bytes_moved=lambda s: s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size())
