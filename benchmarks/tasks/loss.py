"""loss: the GRPO loss from logits, forward + backward (dapo, beta=0.04, asymmetric clip).
"""
from __future__ import annotations

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

from .common import LOSS_OPTIONS, Task, _baselines, _logits_inputs, _ours, _peer, trl_loss_lines


def build_loss(shape, device):
    inputs = _logits_inputs(shape, device, torch.Generator().manual_seed(0), extra_position=True)
    inputs["pristine"] = inputs["buffer"].to("cpu", copy=True)  # host copy: no device memory taken
    return inputs


def restore_logits(x):
    """In-place backward contenders (ours, Liger) write their gradient over the logits buffer."""
    x["buffer"].copy_(x["pristine"])


def _with_grad(x):
    """The (B, T, V) logits of the buffer (the usual logits[:, :-1] shift), tracked by autograd."""
    leaf = x["buffer"].detach().requires_grad_(True)
    return leaf, leaf[:, :-1]


def _ours_loss(backend):
    def run(x):
        leaf, logits = _with_grad(x)
        out = gk.grpo_loss(logits, x["ids"], x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                           ref_logps=x["ref_logps"], backend=backend, inplace_backward=True, **LOSS_OPTIONS)
        torch.autograd.grad(out.loss, logits)
        return out.loss.detach()
    return run


def _oracle_loss(x):
    _, logits = _with_grad(x)
    cfg = gk.GRPOLossConfig(**LOSS_OPTIONS)
    terms, _, _ = R.grpo_loss(logits.float(), x["ids"], x["advantages"], mask=x["mask"], old_logps=x["old_logps"],
                              ref_logps=x["ref_logps"], config=cfg)
    return terms.loss.detach()




def eager_loss(x):
    """Eager PyTorch as TRL writes it: log_softmax + gather on the logits, then the dapo loss lines."""
    _, logits = _with_grad(x)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
    loss = trl_loss_lines(logp, x)
    torch.autograd.grad(loss, logits)
    return loss.detach()


def _trl_loss(x):
    """TRL's own selective_log_softmax (its Triton kernel on CUDA), then GRPOTrainer's dapo loss lines."""
    from trl.trainer.utils import selective_log_softmax

    _, logits = _with_grad(x)
    loss = trl_loss_lines(selective_log_softmax(logits, x["ids"]), x)
    torch.autograd.grad(loss, logits)
    return loss.detach()


def _liger_loss(x):
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    leaf = x["buffer"].detach().requires_grad_(True)
    loss, _ = triton_grpo_loss(leaf, x["old_logps"], x["ref_logps"], x["ids"], x["advantages"],
                               completion_mask=x["mask"].int(), temperature=1.0, beta=0.04, eps_low=0.2, eps_high=0.28,
                               inplace=True, loss_type="dapo", reduce=True)
    torch.autograd.grad(loss, leaf)
    return loss.detach()


def loss_contenders(device):
    grad = lambda s: s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size()  # noqa: E731
    out = _ours(device, _ours_loss, note="in-place backward")
    out += _baselines(eager_loss, "log_softmax + gather + TRL's loss lines", grad_bytes=grad)
    out += _peer("trl", "TRL selective_log_softmax + GRPOTrainer loss", lambda: _trl_loss, grad_bytes=grad)
    out += _peer("liger_kernel", "Liger triton_grpo_loss", lambda: _liger_loss, gpu_only=True, device=device,
                 note="in-place backward")
    return out


TASK = Task("loss", build_loss, loss_contenders, _oracle_loss, restore=restore_logits,
            bytes_moved=lambda s: 3 * s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size())
