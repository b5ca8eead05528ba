"""linear: the fused-linear GRPO loss from hidden states and lm_head, forward + backward.
"""
from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

from .common import LOSS_OPTIONS, Task, _baselines, _ours, _peer, _token_inputs, device_randn, trl_loss_lines


def build_linear(shape, device):
    gen = torch.Generator().manual_seed(0)
    inputs = _token_inputs(shape, device, gen)
    b, t = inputs["b"], inputs["t"]
    dt = shape.torch_dtype
    inputs["hidden"] = torch.randn(b, t, shape.h, generator=gen).to(device=device, dtype=dt)
    inputs["weight"] = device_randn((shape.v, shape.h), gen, device, torch.float32).div_(shape.h ** 0.5).to(dt)
    with torch.no_grad():
        logp = gk.fused_linear_selective_logprobs(inputs["hidden"], inputs["weight"], inputs["ids"],
                                                  backend="torch" if device.type == "cpu" else "auto")
    noise = lambda: 0.2 * torch.randn(b, t, generator=gen).to(device)  # noqa: E731
    inputs["old_logps"], inputs["ref_logps"] = logp + noise(), logp + noise()
    return inputs


def _linear_leaves(x):
    return x["hidden"].detach().requires_grad_(True), x["weight"].detach().requires_grad_(True)


def _ours_linear(backend):
    def run(x):
        h, w = _linear_leaves(x)
        out = gk.fused_linear_grpo_loss(h, w, x["ids"], x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                                        ref_logps=x["ref_logps"], backend=backend, **LOSS_OPTIONS)
        torch.autograd.grad(out.loss, (h, w))
        return out.loss.detach()
    return run


def _oracle_linear(x):
    h, w = _linear_leaves(x)
    cfg = gk.GRPOLossConfig(**LOSS_OPTIONS)
    terms, _, _ = R.grpo_loss((h @ w.T).float(), x["ids"], x["advantages"], mask=x["mask"],
                              old_logps=x["old_logps"], ref_logps=x["ref_logps"], config=cfg)
    return terms.loss.detach()


def eager_linear(x):
    """Materialised logits = hidden @ lm_head.T, then log_softmax + gather and TRL's loss lines."""
    h, w = _linear_leaves(x)
    logits = (h @ w.T).float()
    logp = torch.log_softmax(logits, -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
    loss = trl_loss_lines(logp, x)
    torch.autograd.grad(loss, (h, w))
    return loss.detach()


def _liger_linear(x):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    h, w = _linear_leaves(x)
    fn = LigerFusedLinearGRPOLoss(beta=0.04, epsilon_low=0.2, epsilon_high=0.28, loss_type="dapo",
                                  use_ref_model=True)
    loss, _ = fn(h, w, x["ids"], x["mask"].int(), x["advantages"], ref_per_token_logps=x["ref_logps"],
                 old_per_token_logps=x["old_logps"])
    torch.autograd.grad(loss, (h, w))
    return loss.detach()


def _trl_chunked_linear(x):
    """TRL 1.16's own path: its fused LM head (ChunkedLogProbFunction, log-probs and entropy, logits
    recomputed in the backward) at the chunk size GRPOTrainer uses, then its loss lines."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    h, w = _linear_leaves(x)
    b, t = x["ids"].shape
    logp, _, *_ = ChunkedLogProbFunction.apply(h.reshape(b * t, -1), w, None, x["ids"].reshape(-1), 1.0,
                                                _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs", "entropy"))
    loss = trl_loss_lines(logp.view(b, t).float(), x)
    torch.autograd.grad(loss, (h, w))
    return loss.detach()


def linear_contenders(device):
    def grad(s):
        size = torch.tensor([], dtype=s.torch_dtype).element_size()
        return (s.n * s.h + s.v * s.h) * size
    out = _ours(device, _ours_linear, grad_bytes=grad, note="d_weight accumulated in fp32")
    out += _baselines(eager_linear, "materialised logits + log_softmax + gather + TRL's loss lines",
                      grad_bytes=grad)
    out += _peer("trl", "TRL 1.16 ChunkedLogProbFunction + loss", lambda: _trl_chunked_linear, grad_bytes=grad,
                 note="8·N·H·V FLOPs (logits recomputed in backward)")
    out += _peer("liger_kernel", "Liger LigerFusedLinearGRPOLoss", lambda: _liger_linear, gpu_only=True,
                 device=device, grad_bytes=grad)
    return out


TASK = Task("linear", build_linear, linear_contenders, _oracle_linear,
            flops=lambda s: 6 * s.n * s.h * s.v)
