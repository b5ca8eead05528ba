"""The vocabulary-parallel loss: bytes communicated and time, W processes against one.

    torchrun --standalone --nproc_per_node=2 -m benchmarks.vocab_parallel [--update-committed]

gloo on CPU, NCCL with one GPU per process: the same command on a multi-GPU machine. Each rank
holds V/W of the vocabulary. Three ways to get the GRPO loss (dapo, β = 0.04, forward +
backward) are measured on every rank:
  - ours, logits:        grpo_loss on the (N, V/W) logits slice with process_group;
  - all-gather logits:   the slices all-gathered into (N, V) on every rank, grpo_loss on them
                         (what a trainer without a vocabulary-parallel loss does);
  - ours, fused-linear:  fused_linear_grpo_loss on the (V/W, H) lm_head rows with process_group;
and the single-process calls on the whole vocabulary, on rank 0 alone, with as many threads as
the W processes have together. Bytes are counted by wrapping torch.distributed's collectives:
the payload each rank sends into an all-reduce, and the bytes it receives from an all-gather.
Rank 0 writes vocab_parallel.md into a fresh runs/benchmarks/<device>-<date>-<time>/ (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import os

import torch
import torch.distributed as dist

import grpo_kernels as gk

from . import output
from .measure import device_name, fixed_repeats

CONFIG = gk.GRPOLossConfig(loss_type="dapo", beta=0.04)


@contextlib.contextmanager
def counted_bytes(counter: list):
    """Add to counter[0] the bytes of every all-reduce payload and all-gather receipt."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "all_gather", "all_gather_into_tensor")}

    def all_reduce(tensor, *args, **kwargs):
        counter[0] += tensor.numel() * tensor.element_size()
        return originals["all_reduce"](tensor, *args, **kwargs)

    def all_gather(tensors, tensor, *args, **kwargs):
        counter[0] += tensor.numel() * tensor.element_size() * (len(tensors) - 1)
        return originals["all_gather"](tensors, tensor, *args, **kwargs)

    def all_gather_into_tensor(out, tensor, *args, **kwargs):
        counter[0] += (out.numel() - tensor.numel()) * out.element_size()
        return originals["all_gather_into_tensor"](out, tensor, *args, **kwargs)

    try:
        dist.all_reduce, dist.all_gather, dist.all_gather_into_tensor = (all_reduce, all_gather,
                                                                         all_gather_into_tensor)
        yield counter
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def inputs(n, v, h, dtype, device):
    g = torch.Generator().manual_seed(0)
    b = max(1, n // 256)
    t = n // b
    hidden = (torch.randn(b, t, h, generator=g) * 0.5).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(device, dtype)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    adv = torch.randn(b, generator=g).to(device)
    old = torch.full((b, t), -5.0).to(device)
    return hidden, weight, ids, adv, old


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node=W -m benchmarks.vocab_parallel",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--tokens", type=int, default=8192 if cuda else 1024, help="N (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=151936 if cuda else 32768, help="V (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=4096 if cuda else 256, help="H (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10 if cuda else 3, help="timed steps (default: %(default)s)")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
    origin = output.provenance(device_name(device)) if rank == 0 else None
    if args.vocab % world:
        raise SystemExit(f"--vocab {args.vocab} must be divisible by the number of processes {world}")
    threads = torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    hidden, weight, ids, adv, old = inputs(args.tokens, args.vocab, args.hidden, dtype, device)
    size = args.vocab // world
    rows = slice(rank * size, (rank + 1) * size)
    with torch.no_grad():
        logits = (hidden @ weight.T).contiguous()
    local_logits, local_weight = logits[..., rows].contiguous(), weight[rows].contiguous()
    group = dist.group.WORLD
    loss_kw = dict(old_logps=old, ref_logps=old, config=CONFIG)

    def ours_logits():
        x = local_logits.detach().requires_grad_(True)
        gk.grpo_loss(x, ids, adv, process_group=group, **loss_kw).loss.backward()

    def gathered_logits():
        x = local_logits.detach().requires_grad_(True)
        pieces = [torch.empty_like(local_logits) for _ in range(world)]
        dist.all_gather(pieces, local_logits)
        whole = torch.cat(pieces[:rank] + [x] + pieces[rank + 1:], dim=-1)  # the gradient reaches our slice
        gk.grpo_loss(whole, ids, adv, **loss_kw).loss.backward()

    def ours_linear():
        h, w = hidden.detach().requires_grad_(True), local_weight.detach().requires_grad_(True)
        gk.fused_linear_grpo_loss(h, w, ids, adv, process_group=group, **loss_kw).loss.backward()

    results = []
    for name, fn in (("ours, logits slice", ours_logits), ("all-gather the logits", gathered_logits),
                     ("ours, fused-linear (lm_head rows)", ours_linear)):
        with counted_bytes([0]) as counter:
            fn()
        dist.barrier()
        results.append((name, counter[0], fixed_repeats(fn, device, warmup=1, repeats=args.repeats)))

    single = {}
    dist.barrier()
    if rank == 0:  # the whole vocabulary on one process, with the cores of all W
        torch.set_num_threads(threads * world if not cuda else threads)

        def whole_logits():
            x = logits.detach().requires_grad_(True)
            gk.grpo_loss(x, ids, adv, **loss_kw).loss.backward()

        def whole_linear():
            h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
            gk.fused_linear_grpo_loss(h, w, ids, adv, **loss_kw).loss.backward()

        single = {"logits": fixed_repeats(whole_logits, device, warmup=1, repeats=args.repeats),
                  "fused-linear": fixed_repeats(whole_linear, device, warmup=1, repeats=args.repeats)}
        torch.set_num_threads(threads)
    dist.barrier()
    if rank == 0:
        write_report(args, world, threads, device, results, single, origin)
    dist.destroy_process_group()
    return 0


def write_report(args, world, threads, device, results, single, origin):
    n, v, h = args.tokens, args.vocab, args.hidden
    name = device_name(device)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    stats = 4 * 4  # a max and a packed sum of 3, fp32, per token
    lines = [f"# Vocabulary-parallel GRPO loss ({name}, {world} processes, torch {torch.__version__})", "",
             output.provenance_line(output.finish_provenance(origin)), "",
             f"N = {n} tokens, V = {v} ({v // world} per rank), H = {h}, {args.dtype}; dapo with β = 0.04, "
             f"forward + backward, median of {args.repeats} steps (min – max beside it, rank 0's); {threads} thread(s) "
             "per process.", "",
             "| method | bytes per rank per step | per token | ms per step | min – max |", "|---|---|---|---|---|"]
    for method, count, t in results:
        lines.append(f"| {method} | {count:,} | {count / n:,.0f} | {t.median:.1f} | {t.min:.1f} – {t.max:.1f} |")
    lines += ["", f"One process on the whole vocabulary, {threads * world if device.type == 'cpu' else threads} "
              "thread(s), no communication:", "", "| method | ms per step | min – max |", "|---|---|---|",
              f"| grpo_loss on (N, V) logits | {single['logits'].median:.1f} | "
              f"{single['logits'].min:.1f} – {single['logits'].max:.1f} |",
              f"| fused_linear_grpo_loss on the (V, H) lm_head | {single['fused-linear'].median:.1f} | "
              f"{single['fused-linear'].min:.1f} – {single['fused-linear'].max:.1f} |", "",
              "Bytes: an all-reduce counts the payload a rank contributes, an all-gather the bytes a rank "
              "receives. Ours: a max (N fp32) and one packed sum (3·N fp32) per pass, plus the layout check "
              f"(4 int64 from each other rank); the fused-linear path adds the N·H hidden-gradient all-reduce in "
              f"the hidden dtype. Expected per token: {stats} B (logits), {stats + h * itemsize:,} B "
              f"(fused-linear); the all-gather receives (W−1)·V/W logits per token: "
              f"{(world - 1) * (v // world) * itemsize:,} B."]
    text = "\n".join(lines) + "\n"
    output.publish_texts({"vocab_parallel.md": text}, output.directory(args, name), text)


if __name__ == "__main__":
    raise SystemExit(main())
