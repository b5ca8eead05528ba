"""How many CPU threads the trainer uses: measured, not guessed.

A tiny model's operations (a 64-wide Llama: matrices of a few thousand elements) finish in
microseconds, so intra-op threads spend their time synchronising. Measured on a 2-core AMD
EPYC, one training step of the toy task (16 prompts x 8 completions), ms per step:

| parameters | idle, 1 thread | idle, 2 threads | one busy core, 1 thread | one busy core, 2 threads |
|---|---|---|---|---|
| 88k (H=64)    | 22  | 20  | 25   | 44   |
| 1.3M (H=256)  | 99  | 83  | 92   | 254  |
| 5.3M (H=512)  | 335 | 316 | 323  | 583  |
| 21M (H=1024)  | 1270 | 697 | 1285 | 2267 |

Below a few million parameters one thread costs at most ~15% on an idle machine and is 1.8-2.9x
faster when another process holds a core; from ~20M parameters threads pay off on an idle
machine. "auto" therefore takes one thread below SINGLE_THREAD_MAX_PARAMS and leaves torch's
setting (all cores, or OMP_NUM_THREADS) above it.
"""
from __future__ import annotations

import contextlib

import torch

SINGLE_THREAD_MAX_PARAMS = 8_000_000


def choose_threads(setting, model: torch.nn.Module) -> int:
    """The thread count for `setting` ("auto" or an int) and this model, on the CPU."""
    if setting != "auto":
        return int(setting)
    params = sum(p.numel() for p in model.parameters())
    return 1 if params < SINGLE_THREAD_MAX_PARAMS else torch.get_num_threads()


@contextlib.contextmanager
def cpu_threads(setting, model: torch.nn.Module):
    """Run the body with the chosen intra-op thread count (CPU models only), then restore it."""
    if next(model.parameters()).device.type != "cpu":
        yield torch.get_num_threads()
        return
    before = torch.get_num_threads()
    chosen = choose_threads(setting, model)
    torch.set_num_threads(chosen)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)
