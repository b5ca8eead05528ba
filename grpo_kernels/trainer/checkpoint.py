"""Atomic checkpoints with every RNG state, so a resumed run continues bit for bit.

A checkpoint is written to a temporary directory and renamed into place, so an interrupted
write never leaves a half checkpoint behind; `latest` names the newest complete one.
"""
from __future__ import annotations

import os
import random
import shutil
from typing import Dict, Optional

import torch


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


def save(output_dir: str, step: int, payload: Dict) -> str:
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(payload, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = os.path.join(output_dir, "latest.tmp")
    with open(pointer, "w") as f:
        f.write(os.path.basename(final))
    os.replace(pointer, os.path.join(output_dir, "latest"))
    return final


def load_latest(output_dir: str) -> Optional[Dict]:
    pointer = os.path.join(output_dir, "latest")
    if not os.path.exists(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(output_dir, f.read().strip(), "state.pt")
    return torch.load(path, map_location="cpu", weights_only=False)
