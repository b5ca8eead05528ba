"""sum_pi_squared: what Σ_v π_v² costs on top of log-prob + entropy in our one pass over the logits
(`selective_logprobs(..., return_entropy=True, return_sum_pi_squared=True)`), forward, no grad.

    python -m benchmarks.tasks.sum_pi_squared [--n 2048] [--v 32000] [--backends cpp torch]
                                              [--update-committed]

For each backend, log-prob + entropy against log-prob + entropy + Σπ² (the extra output should
cost nothing measurable on a memory-bound pass), and verl's way beside them: log_softmax + gather,
verl's entropy_from_logits and calculate_sum_pi_squared_from_logits on the materialised logits
(where verl is installed). Every row is checked against the materialised softmax first (largest
difference in the last column), timed in interleaved rounds under the benchmarks' stop rule
(measure.py). Writes sum_pi_squared.md into a fresh runs/benchmarks/<device>-<date>-<time>/ (or
--out), or into benchmarks/results/ with --update-committed. Triton runs only in its interpreter on
a machine without a GPU: not timed there.
"""
from __future__ import annotations

import argparse
import importlib.util
from typing import Callable, Dict

import torch

import grpo_kernels as gk

from .common import Shape
from .logprobs import build_logprobs


def ours(backend: str, with_sum_pi_squared: bool) -> Callable:
    """The public op as verl's actor calls it for old log-probs: forward, no grad, no validation."""
    def run(x):
        with torch.no_grad():
            return gk.selective_logprobs(x["logits"], x["ids"], return_entropy=True,
                                         return_sum_pi_squared=with_sum_pi_squared, backend=backend, validate=False)
    return run


def verls_way(x):
    """verl's FSDP actor without fused kernels: log-probs, entropy and Σπ² from the materialised logits."""
    import verl.utils.torch_functional as verl_F

    with torch.no_grad():
        logits = x["logits"]
        logp = torch.log_softmax(logits, -1).gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1)
        return logp, verl_F.entropy_from_logits(logits), verl_F.calculate_sum_pi_squared_from_logits(logits)


def materialised(x):
    """(log-prob, entropy, Σπ²) in fp64 from the softmax: the check of every row."""
    logp_all = torch.log_softmax(x["logits"].double(), -1)
    p = logp_all.exp()
    return logp_all.gather(-1, x["ids"].unsqueeze(-1)).squeeze(-1), -(p * logp_all).sum(-1), p.square().sum(-1)


def difference(got, want) -> float:
    return max(float((g.double() - w).abs().max()) for g, w in zip(got, want))


def main(argv=None) -> int:
    from .. import output
    from ..measure import device_name, measure_checked

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tasks.sum_pi_squared", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--backends", nargs="+", default=["cpp", "torch"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads time the neighbours)")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = build_logprobs(Shape("sum_pi_squared", args.n, args.v, dtype="float32"), device)
    inputs["ids"] = inputs["ids"].reshape(-1)
    inputs["logits"] = inputs["logits"].reshape(-1, args.v)
    want = materialised(inputs)
    name = device_name(device)
    origin = output.provenance(name)
    rows: Dict[str, Callable] = {}
    for backend in args.backends:
        rows[f"grpo_kernels[{backend}] log-prob + entropy"] = ours(backend, False)
        rows[f"grpo_kernels[{backend}] log-prob + entropy + Σπ²"] = ours(backend, True)
    if importlib.util.find_spec("verl") is not None:
        rows["verl 0.9.1's way: log_softmax + gather, entropy_from_logits, calculate_sum_pi_squared_from_logits"] = (
            verls_way)
    timings, errors, others = measure_checked(
        [(label, lambda r=run: r(inputs), lambda out: difference(out, want)) for label, run in rows.items()], device,
        tolerance=1e-4)
    output.finish_provenance(origin)
    lines = [f"# Σπ² in the log-prob pass: its cost on {name} (N={args.n}, V={args.v}, fp32, "
             f"{torch.get_num_threads()} torch thread(s))", "", output.provenance_line(origin), "",
             "Forward, no grad (verl's old-log-prob pass), of `randn·2` logits (N, V) and random ids, "
             "validate=False. Each row checked against the fp64 materialised softmax first (largest difference "
             "over its outputs in the last column). Times are medians of interleaved repeats "
             "(benchmarks/measure.py), with the ~95% interval of the median. \"+ Σπ² ÷ without\": the time "
             "with Σπ² over the same backend's time without it. Triton is not timed here (interpreter only "
             "without a GPU).", "",
             "| contender | ms | 95% interval | + Σπ² ÷ without | agreement |", "|---|---|---|---|---|"]
    labels = list(rows)
    for i, (label, t, err) in enumerate(zip(labels, timings, errors)):
        lo, hi = t.interval
        ratio = f"{t.median / timings[i - 1].median:.3f}" if label.endswith("+ Σπ²") else ""
        lines.append(f"| {label} | {t.median:.1f} | {lo:.1f}–{hi:.1f}{' (noisy)' if t.noisy else ''} | {ratio} | "
                     f"{err:.1e} |")
    if others.share is not None:
        lines += ["", f"Other processes used {100 * others.share:.0f}% of the CPU during the timing."]
    text = "\n".join(lines) + "\n"
    out_dir = output.COMMITTED if args.update_committed else output.directory(args, name)
    output.publish_texts({"sum_pi_squared.md": text}, out_dir, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
