"""What a trainer checkpoint holds, so a resumed run continues bit for bit: the model, optimizer
and scheduler states, the step and history, every rank's RNG states, the adaptive-entropy state
and the run's layout (world size, data-parallel strategy). checkpoint.py writes and reads the
payload crash-safely.

The payload is a dict with the keys "model", "optimizer", "scheduler", "step", "history", "rng"
(rank 0's), "rng_per_rank", "world_size", "data_parallel", "config" and "entropy_control"; older
checkpoints without the last four (or "rng_per_rank") still load.
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Dict, Optional

import torch

if TYPE_CHECKING:
    from .trainer import GRPOTrainer


def rng_state(sampler: torch.Generator) -> Dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampler": sampler.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Dict, sampler: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    sampler.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def payload(trainer: "GRPOTrainer") -> Optional[Dict]:
    """The trainer's checkpoint payload on rank 0, None on the other ranks. Every rank must call it:
    it gathers the RNG states of all ranks and (FSDP2) the whole model and optimizer states; the
    model and optimizer are the same on every rank."""
    parallel = trainer.parallel
    rng = parallel.gather_objects(rng_state(trainer.sampler))
    model_state, optimizer_state = parallel.full_state(trainer.model, trainer.optimizer)
    if not parallel.is_main:
        return None
    return {"model": model_state, "optimizer": optimizer_state, "scheduler": trainer.scheduler.state_dict(),
            "step": trainer.step, "history": trainer.history, "rng": rng[0], "rng_per_rank": rng,
            "world_size": parallel.world, "data_parallel": parallel.strategy, "config": trainer.cfg.to_dict(),
            "entropy_control": trainer.entropy.state_dict()}


def restore(trainer: "GRPOTrainer", state: Dict) -> None:
    """Load a payload from the trainer's output_dir into it (every rank). A run resumes with the
    number of processes, and the data-parallel strategy, that wrote it."""
    parallel, where = trainer.parallel, trainer.cfg.output_dir
    written_by = state.get("world_size", 1)
    if written_by != parallel.world:
        raise ValueError(f"the checkpoint in {where} was written by {written_by} process(es); resume "
                         f"it with the same number (this run has {parallel.world})")
    strategy = state.get("data_parallel", parallel.strategy)
    if written_by > 1 and strategy != parallel.strategy:
        raise ValueError(f"the checkpoint in {where} was written with data_parallel={strategy!r}; "
                         f"resume it with the same (this run has {parallel.strategy!r})")
    parallel.load_full_state(trainer.model, trainer.optimizer, state["model"], state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.step, trainer.history = state["step"], state["history"]
    if "entropy_control" in state:
        trainer.entropy.load_state_dict(state["entropy_control"])
    restore_rng(state.get("rng_per_rank", [state["rng"]])[parallel.rank], trainer.sampler)
