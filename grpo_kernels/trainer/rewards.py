"""Calling reward functions with TRL's convention, and checking what they return.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, one value
per completion; `columns` are the dataset's other keys, one list entry per completion.
None means unscorable (NaN here: group_advantages gives such a completion advantage 0).
A function that raises, or returns the wrong number or type of values, stops the run with
an error naming it.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

import torch


def reward_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def score(reward_funcs: Sequence[Callable], prompts: List[str], completions: List[str],
          columns: Dict[str, list], device) -> torch.Tensor:
    """(B, F) float rewards, NaN where a function returned None."""
    out = torch.empty(len(completions), len(reward_funcs), dtype=torch.float32)
    for j, fn in enumerate(reward_funcs):
        name = reward_name(fn)
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as exc:
            raise RuntimeError(f"reward function {name!r} raised {type(exc).__name__}: {exc}") from exc
        values = list(values) if values is not None else None
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise ValueError(f"reward function {name!r} returned {got} for {len(completions)} completions; "
                             "it must return one float (or None) per completion")
        for i, v in enumerate(values):
            if v is None:
                out[i, j] = float("nan")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or math.isinf(v):
                raise TypeError(f"reward function {name!r} returned {v!r} for completion {i}; "
                                "expected a finite float or None")
            else:
                out[i, j] = float(v)
    return out.to(device)
