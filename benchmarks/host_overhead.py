"""Per-call host overhead of grpo_loss at N=256 tokens: `python -m benchmarks.host_overhead`.

At 256 tokens and a small vocabulary the kernels take microseconds and the call is its Python
glue, argument checks and host syncs. Times forward + backward with validate=True (every
data-dependent check, read with one host sync) and validate=False (no check, no sync), and
counts the call's host reads of tensor values (.item(), bool(), .tolist(): each a device sync
on a GPU). Run it under another checkout of grpo_kernels (PYTHONPATH) to get its "before" row:
a version without `validate` is timed with its defaults. Writes host_overhead.md into a fresh
runs/benchmarks/<device>-<date>-<time>/ (or --out; --update-committed for benchmarks/results/<device>/).
"""
from __future__ import annotations

import argparse
import inspect

import torch

import grpo_kernels as gk

from . import output
from .measure import device_name, time_ms

HOST_READERS = ("item", "tolist", "__bool__", "__int__", "__float__")


def count_host_reads(fn) -> int:
    """Host reads of tensor values during one fn() call."""
    count = [0]
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READERS}

    def counting(original):
        def reader(tensor, *args, **kwargs):
            count[0] += 1
            return original(tensor, *args, **kwargs)
        return reader

    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, counting(original))
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_overhead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=8, help="B (default: %(default)s)")
    parser.add_argument("--length", type=int, default=32, help="T; N = B·T (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=256, help="V (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls (default: %(default)s)")
    parser.add_argument("--label", default=f"grpo_kernels {gk.__version__}", help="the version's name in the table")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    b, t, v = args.sequences, args.length, args.vocab
    logits = torch.randn(b, t, v, generator=g).to(device)
    ids = torch.randint(0, v, (b, t), generator=g).to(device)
    mask = (torch.rand(b, t, generator=g) > 0.1).to(device)
    adv = torch.randn(b, generator=g).to(device)
    old = (torch.randn(b, t, generator=g) - 5).to(device)
    config = gk.GRPOLossConfig(loss_type="dapo", beta=0.04)
    has_validate = "validate" in inspect.signature(gk.grpo_loss).parameters
    modes = (True, False) if has_validate else (None,)

    rows = []
    for backend in gk.available_backends(device):
        for validate in modes:
            extra = {} if validate is None else {"validate": validate}

            def call():
                x = logits.detach().requires_grad_(True)
                out = gk.grpo_loss(x, ids, adv, mask=mask, old_logps=old, ref_logps=old, config=config,
                                   backend=backend, **extra)
                out.loss.backward()

            reads = count_host_reads(call)
            ms = time_ms(call, device, warmup=10, repeats=args.repeats)
            rows.append((backend, "default" if validate is None else f"validate={validate}", ms, reads))

    name = device_name(device)
    lines = [f"# Host overhead of grpo_loss ({name}, torch {torch.__version__}, {args.label})", "",
             f"N = {b}×{t} = {b * t} tokens, V = {v}, dapo with β = 0.04, fp32, forward + backward, median of "
             f"{args.repeats} calls.", "",
             "| backend | checks | µs per call | host reads per call |", "|---|---|---|---|"]
    lines += [f"| {backend} | {mode} | {ms * 1e3:.0f} | {reads} |" for backend, mode, ms, reads in rows]
    text = "\n".join(lines) + "\n"
    output.publish_texts({"host_overhead.md": text}, output.directory(args, name), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
