"""One tuning sweep of the Triton log-prob kernels: `python -m benchmarks.tune_triton` (GPU).

The forward (logp, entropy, lse) and the in-place backward are one program per row that walks
the vocabulary in blocks of BLOCK_V columns; the block width and the warps per program are the
knobs. For each (BLOCK_V cap, num_warps) the sweep checks the kernels against the torch
backend on the same bf16 logits (fresh random values, outputs poisoned first), then times them
(median of CUDA-event timings) and reports the achieved bandwidth over the bytes that must move
(forward: N·V·2 read; backward: N·V·2 read + N·V·2 written) against a measured device-to-device
copy. Writes tune_triton.md into a fresh runs/benchmarks/<device>-<date>-<time>/ (or --out).
"""
from __future__ import annotations

import argparse
import itertools

import torch

from . import output
from .measure import device_name, roofline, time_ms


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tune_triton", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="N (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=151936, help="V (default: %(default)s)")
    parser.add_argument("--blocks", default="1024,2048,4096,8192", help="BLOCK_V caps to try")
    parser.add_argument("--warps", default="4,8,16", help="num_warps to try")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.tune_triton needs a CUDA GPU (torch.cuda.is_available() is False)")
    from grpo_kernels.ops import torch_backend
    from grpo_kernels.ops.triton import logprobs as kernels
    from grpo_kernels.transform import LogitTransform

    device = torch.device("cuda")
    n, v = args.tokens, args.vocab
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, v, device=device, generator=g) * 2).to(torch.bfloat16)
    ids = torch.randint(0, v, (n,), device=device, generator=g)
    g_logp, g_ent = torch.randn(n, device=device, generator=g), torch.randn(n, device=device, generator=g)
    tau = LogitTransform()
    want_logp, want_ent, want_lse = torch_backend.logprobs_forward(logits, ids, tau)
    want_grad = torch_backend.logprobs_backward(logits, ids, want_lse, want_ent, g_logp, g_ent, tau,
                                                torch.empty_like(logits)).float()
    bandwidth = roofline(device)["copy_GBps"] * 1e9  # bytes read + written per second
    nbytes = n * v * logits.element_size()
    rows = []
    original_cap, original_warps = kernels.MAX_BLOCK_V, kernels._num_warps
    try:
        for cap, warps in itertools.product(map(int, args.blocks.split(",")), map(int, args.warps.split(","))):
            kernels.MAX_BLOCK_V, kernels._num_warps = cap, (lambda block, w=warps: w)
            logp, ent, lse = kernels.logprobs_forward(logits, ids, tau)
            out = torch.full_like(logits, float("nan"))
            kernels.logprobs_backward(logits, ids, want_lse, want_ent, g_logp, g_ent, tau, out)
            error = max(float((logp - want_logp).abs().max()), float((ent - want_ent).abs().max()),
                        float((out.float() - want_grad).abs().max()) / max(float(want_grad.abs().max()), 1e-30))
            fwd = time_ms(lambda: kernels.logprobs_forward(logits, ids, tau), device, repeats=20)
            work = logits.clone()
            bwd = time_ms(lambda: kernels.logprobs_backward(work, ids, want_lse, want_ent, g_logp, g_ent, tau, work),
                          device, repeats=20, before=lambda: work.copy_(logits))
            rows.append((cap, warps, error, fwd, nbytes / (fwd * 1e-3) / bandwidth,
                         bwd, 2 * nbytes / (bwd * 1e-3) / bandwidth))
            print(f"BLOCK_V<={cap} warps={warps}: error {error:.1e}, fwd {fwd:.3f} ms, bwd {bwd:.3f} ms", flush=True)
    finally:
        kernels.MAX_BLOCK_V, kernels._num_warps = original_cap, original_warps
    name = device_name(device)
    lines = [f"# Triton log-prob kernels: block width and warps ({name}, torch {torch.__version__})", "",
             f"N = {n}, V = {v}, bf16 logits; copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + written). "
             "Error: max |Δ| of logp and H, and of dlogits relative to its largest element, against the "
             "torch backend.", "",
             "| BLOCK_V cap | num_warps | error | fwd ms | fwd % copy bw | bwd ms | bwd % copy bw |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c} | {w} | {e:.1e} | {f:.3f} | {100 * fb:.0f}% | {b:.3f} | {100 * bb:.0f}% |"
              for c, w, e, f, fb, b, bb in rows]
    text = "\n".join(lines) + "\n"
    output.publish_texts({"tune_triton.md": text}, output.directory(args, name), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
