"""Run a function on several spawned processes joined in a process group, as torchrun would.

`run_ranks(world, fn, *args)` starts `world` processes, initialises torch.distributed (gloo,
or NCCL on GPUs, with a file rendezvous) in each, calls fn(rank, world, *args) and returns the ranks' results in
rank order. An exception on any rank fails the call with every rank's traceback; a rank that
has not finished within `timeout` seconds (a hang in a collective) fails it too, after the
processes are killed. `fn` must be importable (defined at a module's top level).
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import tempfile
import traceback


class RankFailure(AssertionError):
    """A rank raised, or the ranks did not finish in time."""


def _entry(fn, rank, world, init_file, args, results, backend):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results.put((rank, True, fn(rank, world, *args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            dist.barrier()  # no rank tears gloo down while another still talks to it
        finally:
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout: float = 240.0, expect_errors: bool = False, backend: str = "gloo"):
    """[fn(0, world, *args), ..., fn(world − 1, ...)]. With expect_errors=True a rank's exception
    is returned (as its "Type: message" text) instead of failing the call. backend: "gloo" (CPU)
    or "nccl" (one GPU per rank)."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_entry, args=(fn, rank, world, init_file, args, results, backend), daemon=True)
                 for rank in range(world)]
        for p in procs:
            p.start()
        found = {}
        try:
            while len(found) < world:
                rank, ok, value = results.get(timeout=timeout)
                found[rank] = (ok, value)
        except queue.Empty:
            missing = sorted(set(range(world)) - set(found))
            raise RankFailure(f"ranks {missing} did not finish within {timeout} s (a hang in a collective?)") from None
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    errors = {rank: value for rank, (ok, value) in found.items() if not ok}
    if errors and not expect_errors:
        raise RankFailure("\n".join(f"rank {rank}: {text}" for rank, text in sorted(errors.items())))
    return [found[rank][1] for rank in range(world)]
