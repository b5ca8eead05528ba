"""truncation: log-probs + entropy of the truncated sampling distribution (top-p 0.8), forward, no grad.

The task (for `python -m benchmarks --tasks truncation` on shapes that name it): ours against the
sort-based eager PyTorch a user writes today (softmax, sort, cumsum, mask, renormalise).

    python -m benchmarks.tasks.truncation [--n 2048] [--v 32000] [--update-committed]

measures, on the CPU, ours with top-p 0.8, top-k 50 and min-p 0.05 against our plain
(full-vocabulary) fused pass and the eager sort, each checked against grpo_kernels.reference
first, timed in interleaved rounds under the benchmarks' stop rule (measure.py), and writes
truncation_cpu.md into a fresh runs/benchmarks/<device>-<date>-<time>/ (or --out), or into
benchmarks/results/ with --update-committed.
"""
from __future__ import annotations

import argparse
import os

import torch

from grpo_kernels import reference as R
from grpo_kernels.ops.dispatch import backend_module
from grpo_kernels.transform import KernelTransform
from grpo_kernels.truncation import NO_TRUNCATION, make_truncation

from .common import EAGER, OURS, Contender, Shape, Task, agreement
from .logprobs import build_logprobs

TOP_P = 0.8
SETTINGS = {"plain": {}, "top-p 0.8": dict(top_p=TOP_P), "top-k 50": dict(top_k=50), "min-p 0.05": dict(min_p=0.05)}


build_truncation = build_logprobs  # the logprobs task's inputs: randn·2 logits, random ids


def eager_sort_top_p(x, top_p=TOP_P):
    """What a user writes today (NeMo-RL's way): softmax, sort, cumsum, mask, renormalise (log_softmax
    over the kept logits), then gather; the entropy of the renormalised distribution too."""
    logits = x["logits"].float()
    ids = x["ids"].unsqueeze(-1)
    probs = torch.softmax(logits, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    drop_sorted = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass above already reaches top_p
    drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted).scatter_(-1, ids, False)
    logp_all = torch.log_softmax(logits.masked_fill(drop, float("-inf")), -1)
    p = logp_all.exp()
    _entropy = -(p * logp_all.masked_fill(drop, 0.0)).sum(-1)
    return logp_all.gather(-1, ids).squeeze(-1)


def ours(settings, backend="cpp"):
    """The backend's fused log-probs + entropy with the truncation `settings` (the op, as losses call it)."""
    truncation = make_truncation(**settings) if settings else NO_TRUNCATION
    op = backend_module(backend).logprobs_forward

    def run(x):
        logits, ids = x["logits"], x["ids"]
        logp = op(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), KernelTransform(), True, truncation)[0]
        return logp.view(ids.shape)
    return run


def oracle(settings):
    return lambda x: R.logprobs_and_entropy(x["logits"].float(), x["ids"], **settings)[0]


def truncation_contenders(device):
    if device.type != "cpu":
        return []
    return [Contender("grpo_kernels[cpp] top-p 0.8", ours(SETTINGS["top-p 0.8"]), role=OURS),
            Contender("eager PyTorch (softmax, sort, cumsum, mask, renormalise)", eager_sort_top_p, role=EAGER)]


TASK = Task("truncation", build_truncation, truncation_contenders, oracle(SETTINGS["top-p 0.8"]),
            bytes_moved=lambda s: s.n * s.v * torch.tensor([], dtype=s.torch_dtype).element_size())


def main(argv=None) -> int:
    from .. import output
    from ..measure import device_name, measure_checked

    parser = argparse.ArgumentParser(prog="python -m benchmarks.tasks.truncation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    shape = Shape("truncation", args.n, args.v, dtype="float32")
    inputs = build_truncation(shape, device)
    name = device_name(device)
    origin = output.provenance(name)
    contenders = [(f"grpo_kernels[cpp] {label}", ours(s), oracle(s)) for label, s in SETTINGS.items()]
    contenders.append(("eager PyTorch sort, top-p 0.8", eager_sort_top_p, oracle(SETTINGS["top-p 0.8"])))
    checked = [(label, lambda r=run: r(inputs), lambda out, w=want: agreement(out, w(inputs)))
               for label, run, want in contenders]
    timings, errors, others = measure_checked(checked, device, tolerance=1e-4)
    output.finish_provenance(origin)
    plain = timings[0].median
    eager = timings[-1].median
    lines = [f"# Truncated sampling log-probs + entropy on the CPU (N={args.n}, V={args.v}, fp32, "
             f"{args.threads} threads)", "", output.provenance_line(origin), "",
             "Forward (log-prob and entropy, no grad) of `randn·2` logits; every row checked against "
             "grpo_kernels.reference first (largest difference in the last column). Times are medians of "
             "interleaved repeats (benchmarks/measure.py), with the ~95% interval of the median.", "",
             "| contender | ms | 95% interval | × plain | eager sort ÷ this | agreement |", "|---|---|---|---|---|---|"]
    for (label, _, _), t, err in zip(contenders, timings, errors):
        lo, hi = t.interval
        lines.append(f"| {label} | {t.median:.1f} | {lo:.1f}–{hi:.1f}{' (noisy)' if t.noisy else ''} | "
                     f"{t.median / plain:.2f} | {eager / t.median:.1f} | {err:.1e} |")
    if others.share is not None:
        lines += ["", f"Other processes used {100 * others.share:.0f}% of the CPU during the timing."]
    lines += ["", "Target (issue 25): truncation-aware ≤ 2× the plain pass, ≥ 5× faster than the eager sort.", ""]
    directory = output.directory(args, name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "truncation_cpu.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
