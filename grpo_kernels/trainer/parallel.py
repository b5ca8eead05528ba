"""Data-parallel training over torch.distributed (gloo on CPU, NCCL on GPUs): FSDP2 or DDP.

Each of the W processes (`torchrun --nproc_per_node=W`) trains on its share of every step's
prompts: W divides prompts_per_step, and a prompt's group of completions stays on one rank.
Rewards are all-gathered (B·F floats), so advantages, reward metrics and the stopping rule are
those of the whole batch on every rank; the loss normalisers are global (token counts summed
over ranks, as TRL's num_items_in_batch), and each rank's loss is scaled by W so that the
ranks' averaged gradient (DDP's all-reduce, FSDP2's reduce-scatter) is the gradient of the
whole batch's loss: the update does not depend on how the batch is split.

FSDP2 (the default, `fully_shard`) shards parameters, gradients and optimizer states: each
decoder layer (the model's `_no_split_modules`) is a unit, and the root unit is a module whose
forward runs every use of the policy (sampling, old/reference log-probs, the micro-batch's
fused-linear loss), so FSDP2 gathers the embeddings, final norm and lm_head there and the loss
reads the whole lm_head weight the way FSDP2 expects. Outside that forward the lm_head is a
DTensor shard, which the loss refuses with an error rather than reading its local rows as the
whole weight. DDP (`data_parallel="ddp"`) keeps a whole model per rank.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import List, NoReturn, Sequence

import torch
import torch.distributed as dist

STRATEGIES = ("fsdp2", "ddp")


class DataParallel:
    """The process group the trainer runs in: world 1 (plain single-process training) unless
    torch.distributed is initialised with more than one process. `strategy`: "fsdp2" or "ddp"."""

    def __init__(self, device: torch.device, strategy: str = "fsdp2"):
        if strategy not in STRATEGIES:
            raise ValueError(f"data_parallel={strategy!r} is not one of {list(STRATEGIES)}")
        self.strategy = strategy
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

    def max(self, values: Sequence[float]) -> List[float]:
        """Each value's maximum over the ranks (fp64; one all-reduce)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
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

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "fsdp2"

    def wrap(self, module: torch.nn.Module, units=()) -> torch.nn.Module:
        """`module` made data-parallel: FSDP2 with each module whose class is named in `units` a
        unit of its own and `module` the root (in place), or DDP around it; either starts from
        rank 0's parameters. Unchanged in a single process."""
        if not self.enabled:
            return module
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device = next(module.parameters()).device
            return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        from torch.distributed.fsdp import fully_shard

        for param in module.parameters():  # FSDP2 shards what each rank has: make it rank 0's
            dist.broadcast(param.data, src=0)
        for sub in list(module.modules()):
            if type(sub).__name__ in units:
                fully_shard(sub)
        fully_shard(module)
        return module

    def sync_gradients(self, module: torch.nn.Module, last: bool):
        """Reduce gradients only after the last micro-batch of a step (DDP's no_sync, FSDP2's
        set_requires_gradient_sync)."""
        if self.sharded:
            module.set_requires_gradient_sync(last)
        elif not last and hasattr(module, "no_sync"):
            return module.no_sync()
        return contextlib.nullcontext()

    def full_state(self, model: torch.nn.Module, optimizer) -> tuple:
        """(model, optimizer) state dicts with whole tensors, in the single-process format for
        the model (FSDP2: gathered to rank 0's CPU; every rank must call it)."""
        if not self.sharded:
            return model.state_dict(), optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)

    def load_full_state(self, model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
        if not self.sharded:
            model.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, model_state, options=options)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def torchrun_world_size() -> int:
    """The number of processes torchrun started (its WORLD_SIZE; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_by_torchrun() -> bool:
    """Whether this process is one of several that torchrun started (WORLD_SIZE > 1)."""
    return torchrun_world_size() > 1


def end_worker_process(code: int) -> NoReturn:
    """End this torchrun worker with exit status `code` after its process group is destroyed,
    without finalizing the interpreter (stdout, stderr and logging flushed first; never returns).

    Why: FSDP2 keeps references to the gloo process group, so `destroy_process_group` cannot
    join gloo's worker threads (they stay alive: /proc/self/task lists pt_gloo_runloop after it).
    A worker thread still releasing the tensors of a finished collective when the interpreter
    finalizes needs the GIL, is ended by pthread_exit inside a noexcept frame, and the process
    aborts: "terminate called without an active exception", SIGABRT, backtrace in
    ProcessGroupGloo::runLoop -> PyEval_AcquireThread -> pthread_exit. A 2-rank FSDP2 script
    that only trains 3 steps, destroys the group and returns aborted in 13 of 280 runs on the
    2-core CPU machine under load, and in none of 160 when it ended this way. multiprocessing
    ends its child processes the same way (os._exit), so the tests' spawned ranks never hit it.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced: nothing left to write
            pass
    logging.shutdown()
    os._exit(code)


def init_from_environment() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with one GPU per local
    rank when CUDA is available, gloo otherwise. False when not launched by torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True
