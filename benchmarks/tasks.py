"""What is benchmarked: four tasks, their inputs, their cost model and their contenders.

Tasks:
  logprobs    selective log-probs forward, no grad (the old/reference-policy pass)
  loss        the GRPO loss from logits, forward + backward (dapo, beta=0.04, asymmetric clip)
  linear      the fused-linear GRPO loss from hidden states and lm_head, forward + backward
  advantages  group advantages of N rewards in groups of 8

Baselines are what users run today: plain eager PyTorch written the way TRL writes it
(log_softmax + gather, then GRPOTrainer's loss lines) and `torch.compile` of the same code; every
ratio in the results is against them. Peers (TRL's kernels, Liger, verl) run when installed.
The fp32 reference (`grpo_kernels.reference`) is the correctness oracle: each contender's value
is compared with it before timing (`agreement`), and a contender that disagrees is reported,
not timed. The reference itself is never timed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import grpo_kernels as gk
from grpo_kernels import reference as R

SEQ_LEN = 1024  # tokens per completion; N tokens make N / SEQ_LEN sequences
# TRL 1.16's defaults (dapo, bias-corrected KL) with a KL penalty and DAPO's asymmetric clip.
LOSS_OPTIONS = dict(loss_type="dapo", beta=0.04, epsilon=0.2, epsilon_high=0.28)


@dataclass
class Shape:
    task: str
    n: int
    v: int
    h: int = 0
    dtype: str = "bfloat16"

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    def key(self) -> Dict:
        return dict(task=self.task, N=self.n, V=self.v, H=self.h, dtype=self.dtype)


EAGER, COMPILED, OURS, PEER = "eager", "compiled", "ours", "peer"


@dataclass
class Contender:
    name: str
    run: Callable[[Dict], torch.Tensor]
    # Bytes of gradient it necessarily allocates (not counted as overhead in the memory ratio).
    grad_bytes: Callable[[Shape], int] = lambda s: 0
    note: str = ""
    role: str = PEER  # EAGER and COMPILED are the baselines of the ratios


@dataclass
class Skipped:
    """A contender that does not run here, and why (printed, and listed in results.md)."""
    name: str
    reason: str


@dataclass
class Task:
    name: str
    build: Callable[[Shape, torch.device], Dict]
    contenders: Callable[[torch.device], List[Contender]]  # Contender and Skipped entries
    oracle: Callable[[Dict], torch.Tensor]  # the fp32 reference value, for the agreement check
    # Called (untimed) before every run of every contender: puts back inputs that in-place
    # contenders overwrite, so each run sees the same logits.
    restore: Optional[Callable[[Dict], None]] = None

    def reset(self, inputs: Dict) -> None:
        """Put back what an earlier run overwrote (nothing for tasks without in-place contenders)."""
        if self.restore is not None:
            self.restore(inputs)
    bytes_moved: Optional[Callable[[Shape], float]] = None  # memory-bound: GB/s vs copy roofline
    flops: Optional[Callable[[Shape], float]] = None  # compute-bound: TFLOP/s vs matmul roofline
    tolerance: Callable[[Shape], float] = field(default=lambda s: 2e-2 if s.dtype != "float32" else 1e-4)


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ours(device: torch.device, make, **kw) -> List:
    """One contender per backend of ours that runs on `device`, and the others as Skipped."""
    out = []
    for backend in ("triton", "cuda", "cpp", "torch"):
        if device.type == "cpu" and backend in ("triton", "cuda"):
            reason = "interpreted Triton on CPU is a correctness tool" if backend == "triton" else "needs CUDA"
            out.append(Skipped(f"grpo_kernels[{backend}]", reason))
        elif backend in gk.available_backends(device):
            out.append(Contender(f"grpo_kernels[{backend}]", make(backend), role=OURS, **kw))
        else:
            out.append(Skipped(f"grpo_kernels[{backend}]", "not built (see available_backends() in the README)"))
    return out


def _peer(module: str, name: str, make, *, gpu_only: bool = False, device=None, **kw) -> List:
    if not _have(module):
        return [Skipped(name, f"{module} is not installed")]
    if gpu_only and device is not None and device.type != "cuda":
        return [Skipped(name, "Triton kernels, GPU only")]
    return [Contender(name, make(), role=PEER, **kw)]


def _baselines(eager, what: str, **kw) -> List[Contender]:
    """Plain eager PyTorch as users write it, and torch.compile of the same function."""
    return [Contender(f"eager PyTorch ({what})", eager, role=EAGER, **kw),
            Contender(f"torch.compile ({what})", torch.compile(eager, dynamic=False), role=COMPILED, **kw)]


def _token_inputs(shape: Shape, device: torch.device, gen: torch.Generator) -> Dict:
    b, t = max(1, shape.n // SEQ_LEN), min(SEQ_LEN, shape.n)
    ids = torch.randint(0, shape.v, (b, t), generator=gen).to(device)
    mask = (torch.rand(b, t, generator=gen) > 0.1).to(device)
    adv = torch.randn(b, generator=gen).to(device)
    return dict(b=b, t=t, ids=ids, mask=mask, advantages=adv)


def _logits_inputs(shape: Shape, device: torch.device, gen: torch.Generator, extra_position: bool) -> Dict:
    inputs = _token_inputs(shape, device, gen)
    b, t = inputs["b"], inputs["t"]
    buffer = torch.randn(b, t + int(extra_position), shape.v, generator=gen, dtype=torch.float32).to(
        device=device, dtype=shape.torch_dtype) * 2
    inputs["buffer"] = buffer
    with torch.no_grad():
        logp = gk.selective_logprobs(buffer[:, :t], inputs["ids"], backend="torch" if device.type == "cpu" else "auto")
    noise = lambda: 0.2 * torch.randn(b, t, generator=gen).to(device)  # noqa: E731
    inputs["old_logps"], inputs["ref_logps"] = logp + noise(), logp + noise()
    return inputs


# ----------------------------------------------------------------------------------------- logprobs

def build_logprobs(shape, device):
    gen = torch.Generator().manual_seed(0)
    inputs = _token_inputs(shape, device, gen)
    inputs["logits"] = (torch.randn(inputs["b"], inputs["t"], shape.v, generator=gen) * 2).to(
        device=device, dtype=shape.torch_dtype)
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


# ----------------------------------------------------------------------------------------- loss

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


def trl_loss_lines(logp, x):
    """GRPOTrainer._compute_loss's lines for LOSS_OPTIONS (dapo, k3 KL times the ratio), as TRL 1.16 writes them."""
    mask = x["mask"].float()
    coef_1 = torch.exp(logp - x["old_logps"])
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    adv = x["advantages"].unsqueeze(1)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    d = x["ref_logps"] - logp
    per_token = per_token + 0.04 * (torch.exp(d) - d - 1) * coef_1
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


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


# ----------------------------------------------------------------------------------------- linear

def build_linear(shape, device):
    gen = torch.Generator().manual_seed(0)
    inputs = _token_inputs(shape, device, gen)
    b, t = inputs["b"], inputs["t"]
    dt = shape.torch_dtype
    inputs["hidden"] = torch.randn(b, t, shape.h, generator=gen).to(device=device, dtype=dt)
    inputs["weight"] = (torch.randn(shape.v, shape.h, generator=gen) / shape.h ** 0.5).to(device=device, dtype=dt)
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


# ----------------------------------------------------------------------------------------- verl policy loss

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


# ----------------------------------------------------------------------------------------- advantages

def build_advantages(shape, device):
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 3, (shape.n,), generator=gen).float()
    rewards[torch.rand(shape.n, generator=gen) < 0.05] = float("nan")
    return dict(rewards=rewards.to(device))


def _oracle_advantages(x):
    n = x["rewards"].numel()
    return R.group_advantages(x["rewards"], torch.arange(n, device=x["rewards"].device) // 8, n // 8).advantages


def eager_advantages(x):
    """TRL's vectorised group statistics (nanmean, unbiased std, + 1e-4), NaN rewards as 0 advantage."""
    r = x["rewards"].view(-1, 8)
    mean = torch.nanmean(r, 1, keepdim=True)
    std = ((r - mean) ** 2).nansum(1, keepdim=True).div((~torch.isnan(r)).sum(1, keepdim=True) - 1).sqrt()
    return torch.nan_to_num(((r - mean) / (std + 1e-4)).flatten(), nan=0.0)


def advantages_contenders(device):
    out = _ours(device, lambda b: (lambda x: gk.group_advantages(x["rewards"], group_size=8, backend=b).advantages))
    return out + _baselines(eager_advantages, "TRL's vectorised lines")


TASKS = {
    "logprobs": Task("logprobs", build_logprobs, logprobs_contenders, _oracle_logprobs,
                     bytes_moved=lambda s: s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size()),
    "loss": Task("loss", build_loss, loss_contenders, _oracle_loss, restore=restore_logits,
                 bytes_moved=lambda s: 3 * s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size()),
    "linear": Task("linear", build_linear, linear_contenders, _oracle_linear, flops=lambda s: 6 * s.n * s.h * s.v),
    "advantages": Task("advantages", build_advantages, advantages_contenders, _oracle_advantages,
                       tolerance=lambda s: 1e-4),
    "verl_policy": Task("verl_policy", build_verl_policy, verl_policy_contenders, _oracle_verl_policy,
                        tolerance=lambda s: 1e-4),
}


def split_contenders(task: str, device: torch.device):
    """(runnable contenders, skipped ones) of a task on this device."""
    entries = TASKS[task].contenders(device)
    return [e for e in entries if isinstance(e, Contender)], [e for e in entries if isinstance(e, Skipped)]


def find_contender(task: str, device: torch.device, name: str) -> Contender:
    return next(c for c in split_contenders(task, device)[0] if c.name == name)


def agreement(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the expected magnitude (NaN where the shapes differ)."""
    value, expected = value.detach().float().cpu(), expected.detach().float().cpu()
    if value.shape != expected.shape:
        return float("nan")
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((value - expected).abs().max()) / scale if expected.numel() else 0.0
