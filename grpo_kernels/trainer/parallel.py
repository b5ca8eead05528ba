"""Data-parallel training over torch.distributed (gloo on CPU, NCCL on GPUs), with DDP.

Each of the W processes (`torchrun --nproc_per_node=W`) holds a whole model and trains on its
share of every step's prompts: W divides prompts_per_step, and a prompt's group of completions
stays on one rank. Rewards are all-gathered (B·F floats), so advantages, reward metrics and the
stopping rule are those of the whole batch on every rank; the loss normalisers are global
(token counts summed over ranks, as TRL's num_items_in_batch), and each rank's loss is scaled
so that DDP's averaged gradient is the gradient of the whole batch's loss: the update does not
depend on how the batch is split.

Why DDP rather than FSDP2: the fused-linear loss reads the lm_head weight directly and calls
the model's backbone, never the modules' own forward on the logits, which is where FSDP2
gathers a sharded parameter; the trainer's models (and the sampler, HF `generate`) need the
whole weights on every rank anyway. A sharded (DTensor) lm_head passed to the loss is refused
with an error rather than read as if its local rows were the whole weight.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Sequence

import torch
import torch.distributed as dist


class DataParallel:
    """The process group the trainer runs in: world 1 (plain single-process training) unless
    torch.distributed is initialised with more than one process."""

    def __init__(self, device: torch.device):
        self.enabled = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1
        # NCCL reduces CUDA tensors only; gloo takes CPU ones.
        self.device = device if self.enabled and dist.get_backend() == "nccl" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the log, the checkpoints and the progress bar."""
        return self.rank == 0

    def share(self, count: int, what: str) -> slice:
        """This rank's contiguous share of `count` items (W must divide it)."""
        if count % self.world:
            raise ValueError(f"{what}={count} must be divisible by the number of processes ({self.world}), so every "
                             "rank holds whole groups of completions")
        size = count // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's equally shaped `x`, concatenated along dim 0 in rank order."""
        if not self.enabled:
            return x
        pieces = [torch.empty_like(x, device=self.device) for _ in range(self.world)]
        dist.all_gather(pieces, x.to(self.device).contiguous())
        return torch.cat(pieces).to(x.device)

    def sum(self, values: Sequence[float]) -> List[float]:
        """Each value summed over the ranks (fp64; one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        found = [None] * self.world
        dist.all_gather_object(found, obj)
        return found

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP around `module` (which broadcasts rank 0's parameters now), or the module itself."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    @staticmethod
    def sync_gradients(module: torch.nn.Module, last: bool):
        """No gradient all-reduce before the last micro-batch of a step (DDP's no_sync)."""
        if last or not hasattr(module, "no_sync"):
            return contextlib.nullcontext()
        return module.no_sync()


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with one GPU per local
    rank when CUDA is available, gloo otherwise. False when not launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
