"""What the benchmark tasks share: shapes, contenders and their roles, input builders, TRL's loss lines.

Each task lives in its own module of this package (logprobs, loss, linear, verl_policy,
advantages); this one holds what more than one of them uses.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import grpo_kernels as gk

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
    oracle: Callable[[Dict], torch.Tensor]  # grpo_kernels.reference's value (in fp32), for the agreement check
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


def device_randn(size, gen: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal values of `size` in `dtype` on `device`, reproducible from `gen`. On CUDA they
    are drawn there, seeded from `gen` (the GPU draws the loss shape's 2.5e9 logits in milliseconds,
    one CPU thread in tens of seconds: time a GPU lease cannot spare); on CPU from `gen` itself."""
    if device.type != "cuda":
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    on_device = torch.Generator(device).manual_seed(seed)
    return torch.randn(*size, generator=on_device, device=device, dtype=torch.float32).to(dtype)


def _token_inputs(shape: Shape, device: torch.device, gen: torch.Generator) -> Dict:
    b, t = max(1, shape.n // SEQ_LEN), min(SEQ_LEN, shape.n)
    ids = torch.randint(0, shape.v, (b, t), generator=gen).to(device)
    mask = (torch.rand(b, t, generator=gen) > 0.1).to(device)
    adv = torch.randn(b, generator=gen).to(device)
    return dict(b=b, t=t, ids=ids, mask=mask, advantages=adv)


def _logits_inputs(shape: Shape, device: torch.device, gen: torch.Generator, extra_position: bool) -> Dict:
    inputs = _token_inputs(shape, device, gen)
    b, t = inputs["b"], inputs["t"]
    buffer = device_randn((b, t + int(extra_position), shape.v), gen, device, shape.torch_dtype) * 2
    inputs["buffer"] = buffer
    with torch.no_grad():
        logp = gk.selective_logprobs(buffer[:, :t], inputs["ids"], backend="torch" if device.type == "cpu" else "auto")
    noise = lambda: 0.2 * torch.randn(b, t, generator=gen).to(device)  # noqa: E731
    inputs["old_logps"], inputs["ref_logps"] = logp + noise(), logp + noise()
    return inputs


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


def agreement(value: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, relative to the expected magnitude (NaN where the shapes differ)."""
    value, expected = value.detach().float().cpu(), expected.detach().float().cpu()
    if value.shape != expected.shape:
        return float("nan")
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((value - expected).abs().max()) / scale if expected.numel() else 0.0
