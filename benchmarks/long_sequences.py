"""Fused-linear on sequences longer than a chunk: `python -m benchmarks.long_sequences`.

One packed batch of sequences 4x longer than the chunk budget (chunk_size rows). Token-level
losses (dapo) cut each sequence into row blocks that go forward and backward at once: 6·N·H·V
FLOPs. Losses that couple a sequence's tokens (GSPO) need all of its log-probs before any
gradient, so their logits are recomputed for the backward: 8·N·H·V. Before the row-block path,
every loss paid the recompute on such sequences; the `recompute` row runs dapo through it.
Writes long_sequences.md into a fresh runs/benchmarks/<device>-<date>-<time>/ (or --out;
--update-committed for benchmarks/results/<device>/).
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

import grpo_kernels as gk
from grpo_kernels.config import GRPOLossConfig

from . import output
from .measure import device_name, fixed_repeats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.long_sequences", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--sequences", type=int, default=1, help="sequences (default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=512, help="H (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=32000, help="V (default: %(default)s)")
    parser.add_argument("--chunk", type=int, default=1024, help="chunk_size rows (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (default: %(default)s)")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    origin = output.provenance(device_name(device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    n = args.tokens * args.sequences
    hidden = torch.randn(n, args.hidden, generator=g).to(device, dtype)
    weight = (torch.randn(args.vocab, args.hidden, generator=g) / args.hidden ** 0.5).to(device, dtype)
    ids = torch.randint(0, args.vocab, (n,), generator=g).to(device)
    cu = (torch.arange(args.sequences + 1) * args.tokens).to(device=device, dtype=torch.int32)
    adv = torch.randn(args.sequences, generator=g).to(device)
    with torch.no_grad():
        old = gk.fused_linear_selective_logprobs(hidden, weight, ids) + 0.1

    def step(cfg):
        h, w = hidden.detach().requires_grad_(True), weight.detach().requires_grad_(True)
        out = gk.fused_linear_grpo_loss(h, w, ids, adv, old_logps=old, cu_seqlens=cu, config=cfg,
                                        chunk_size=args.chunk)
        torch.autograd.grad(out.loss, (h, w))

    dapo = GRPOLossConfig(loss_type="dapo")
    gspo = GRPOLossConfig(loss_type="grpo", importance_sampling_level="sequence")
    def timed(cfg):
        return fixed_repeats(lambda: step(cfg), device, warmup=1, repeats=args.repeats)

    results = [("dapo, row blocks (6·N·H·V)", timed(dapo))]
    with mock.patch.object(GRPOLossConfig, "couples_tokens", property(lambda self: True)):
        results.append(("dapo through the recompute path, as before (8·N·H·V)", timed(dapo)))
    results.append(("GSPO (couples tokens: recompute, 8·N·H·V)", timed(gspo)))
    name = device_name(device)
    base = results[1][1].median
    lines = [f"# Fused-linear on sequences longer than a chunk ({name}, torch {torch.__version__})", "",
             output.provenance_line(output.finish_provenance(origin)), "",
             f"{args.sequences} packed sequence(s) of {args.tokens} tokens, H={args.hidden}, V={args.vocab}, "
             f"chunk_size={args.chunk} rows, {str(dtype).replace('torch.', '')}, forward + backward, median of "
             f"{args.repeats}, with their min and max.", "", "| path | ms | min – max | vs the recompute path |",
             "|---|---|---|---|"]
    lines += [f"| {label} | {t.median:.1f} | {t.min:.1f} – {t.max:.1f} | {base / t.median:.2f}x |"
              for label, t in results]
    text = "\n".join(lines) + "\n"
    output.publish_texts({"long_sequences.md": text}, output.directory(args, name), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
