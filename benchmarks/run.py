"""One command for all benchmarks: `python -m benchmarks [--quick | --full] [--tasks ...]`.

--quick  a CPU-sized set (the CPU default): measured on a 2-core AMD EPYC, 6.4 min when
         other processes took at most 14% of the CPU, 14.5 and 20.4 min beside another job's
         test suite (each run's time and load are in its results.md)
--full   the GPU sweep: V in {32000, 128256, 151936, 262144}, N in {4096, 16384},
         H in {2048, 4096}, bf16 and fp32

Times: the contenders of a shape take turns, one repeat each per round; each goes on until the
~95% interval of its median is within ±3% of it (--target-spread), or it has spent 8 s on the
shape on CPU, 2 s on CUDA (--time-cap). Every row keeps its median, interval, min, max and
repeats; a row still wider than the target is flagged noisy (a column, and a marker in
results.md). A throughput above 100% of the measured roofline, or not above zero, is reported
as a measurement error, not as a number.

Results go to a fresh directory, runs/benchmarks/<device>-<date>-<time>/ (or --out), written
once at the end: results.csv, results.md (tables with the speed-up and memory ratio against
eager PyTorch and torch.compile of it, as users run it), roofline.json (the roofline, the
settings and where the set comes from: machine, date, commit, load) and PNG plots of time and
memory against V. Nothing is written if the run is interrupted. `--update-committed` writes
into the repository's committed set, benchmarks/results/<device>/, instead; the README's
numbers are rendered from it (python -m benchmarks.readme_numbers).
Contenders that cannot run here (a peer not installed, a backend not built) are printed
with the reason and listed in results.md. Every contender is checked against
grpo_kernels.reference (the ground truth the tests run in fp64; here it runs in fp32 on the
benchmark's inputs) before it is timed; the reference itself is not timed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

import torch

from . import output, report
from .roofline import attach_floor
from .measure import (DEFAULT_TARGET, DEFAULTS, OthersCpu, Sampler, cache_flush, cpu_peak_extra_bytes,
                      cuda_peak_extra_bytes, device_name, measure_interleaved, roofline, throughput)
from .tasks import TASKS, Contender, Shape, agreement, split_contenders



def quick_shapes() -> List[Shape]:
    return [
        Shape("logprobs", 2048, 16000, dtype="float32"),
        Shape("logprobs", 2048, 32000, dtype="float32"),
        Shape("loss", 2048, 16000, dtype="float32"),
        Shape("loss", 2048, 32000, dtype="float32"),
        Shape("linear", 1024, 32000, 512, dtype="float32"),
        Shape("advantages", 4096, 0, dtype="float32"),
        Shape("verl_policy", 262144, 0, dtype="float32"),
    ]


def full_shapes(vs=(32000, 128256, 151936, 262144), ns=(4096, 16384), hs=(2048, 4096),
                dtypes=("bfloat16", "float32")) -> List[Shape]:
    shapes = []
    for dtype in dtypes:
        for n in ns:
            for v in vs:
                shapes.append(Shape("logprobs", n, v, dtype=dtype))
                shapes.append(Shape("loss", n, v, dtype=dtype))
                for h in hs:
                    shapes.append(Shape("linear", n, v, h, dtype=dtype))
        for n in ns:
            shapes.append(Shape("advantages", n, 0, dtype=dtype))
    shapes.append(Shape("objective", 1 << 20, 0, dtype="float32"))
    shapes.append(Shape("verl_policy", 1 << 20, 0, dtype="float32"))
    return shapes


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def add_throughput(row: Dict, roof: Dict) -> None:
    """(Re)set a timed row's GB/s or TFLOP/s and % roofline, or its measurement error, against `roof`,
    and its floor and measured / floor where roofline.py knows the device."""
    attach_floor(row, roof.get("device", ""))
    for key in ("GBps", "TFLOPs", "pct_roofline", "measurement_error"):
        row.pop(key, None)
    task = TASKS[row["task"]]
    shape = Shape(row["task"], row["N"], row["V"], row["H"], dtype=row["dtype"])
    if task.bytes_moved:
        row.update(throughput(task.bytes_moved(shape), row["ms"], roof["copy_GBps"], "GBps"))
    if task.flops:
        row.update(throughput(task.flops(shape), row["ms"], roof["matmul_TFLOPs"], "TFLOPs"))


def bench_shape(shape: Shape, device: torch.device, roof: Dict, contenders: List[Contender], *, memory: bool,
                **timing) -> List[Dict]:
    """One shape's rows: every contender checked against the reference, then timed in interleaved
    rounds under the stop rule (measure.Sampler's keywords in `timing`), then its peak memory."""
    task = TASKS[shape.task]
    try:
        inputs = task.build(shape, device)
        expected = task.oracle(inputs)
    except Exception as exc:  # noqa: BLE001 - reported in the results, the sweep goes on
        return [dict(**shape.key(), contender="(inputs)", error="OOM" if _is_oom(exc) else repr(exc)[:200])]
    restore = lambda: task.reset(inputs)  # noqa: E731
    rows: List[Dict] = []
    timed = []  # (row, contender, sampler)
    flush = cache_flush(device)
    for contender in contenders:
        row = dict(**shape.key(), contender=contender.name, note=contender.note, role=contender.role)
        rows.append(row)
        try:
            restore()
            err = agreement(contender.run(inputs), expected)
            row["agreement"] = err
            if not err <= task.tolerance(shape):
                row["error"] = f"disagrees with the reference by {err:.2e}; not timed"
                continue
            sampler = Sampler(lambda c=contender: c.run(inputs), device, before=restore, flush=flush,
                              warmup=1 if device.type == "cpu" else 3, **timing)
            sampler.warm_up()
            timed.append((row, contender, sampler))
        except Exception as exc:  # noqa: BLE001
            row["error"] = "OOM" if _is_oom(exc) else repr(exc)[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    others = OthersCpu()
    try:
        with others:
            timings = measure_interleaved([s for _, _, s in timed])
    except Exception as exc:  # noqa: BLE001 - a contender failing mid-rounds: time the others alone
        timings = []
        for row, _, sampler in timed:
            try:
                timings.append(measure_interleaved([sampler])[0])
            except Exception as inner:  # noqa: BLE001
                timings.append(None)
                row["error"] = "OOM" if _is_oom(inner) else repr(inner)[:300]
        if device.type == "cuda":
            torch.cuda.empty_cache()
        del exc
    flush = None
    for (row, contender, _), timing in zip(timed, timings):
        if timing is None:
            continue
        try:
            row.update(timing.fields())
            if others.share is not None:
                row["others_cpu_pct"] = 100 * others.share
            add_throughput(row, roof)
            if memory:
                if device.type == "cuda":
                    restore()
                    peak = cuda_peak_extra_bytes(lambda: contender.run(inputs), device)
                else:
                    peak = cpu_peak_extra_bytes(dict(shape=shape.__dict__, contender=contender.name,
                                                     threads=torch.get_num_threads()))
                row["peak_MiB"] = peak / 2 ** 20
                row["overhead_MiB"] = max(0, peak - contender.grad_bytes(shape)) / 2 ** 20
        except Exception as exc:  # noqa: BLE001
            row["error"] = "OOM" if _is_oom(exc) else repr(exc)[:300]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    report.add_ratios(rows)
    inputs = None  # free the shape's tensors before the next one
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="CPU-sized set, 6-20 min on 2 cores, by the load (default without CUDA)")
    mode.add_argument("--full", action="store_true", help="the full GPU sweep (default with CUDA)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)} (default: all)")
    parser.add_argument("--vocab", type=int, nargs="*", help="override V of the full sweep")
    parser.add_argument("--tokens", type=int, nargs="*", help="override N of the full sweep")
    parser.add_argument("--hidden", type=int, nargs="*", help="override H of the full sweep (the linear task)")
    parser.add_argument("--dtypes", nargs="*", choices=("bfloat16", "float16", "float32"),
                        help="override the dtypes of the full sweep")
    cpu, cuda = DEFAULTS["cpu"], DEFAULTS["cuda"]
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help=f"at least N timed repeats per contender (default: {cuda['min_repeats']} on CUDA, "
                             f"{cpu['min_repeats']} on CPU)")
    parser.add_argument("--max-repeats", type=int, default=None, metavar="N",
                        help=f"at most N (default: {cuda['max_repeats']} on CUDA, {cpu['max_repeats']} on CPU)")
    parser.add_argument("--target-spread", type=float, default=DEFAULT_TARGET, metavar="F",
                        help="repeat until the ~95%% interval of the median is within ±F of it "
                             "(default: %(default)s); rows still wider are flagged noisy")
    parser.add_argument("--time-cap", type=float, default=None, metavar="S",
                        help=f"...or until a contender has spent S seconds on one shape (default: "
                             f"{cuda['time_cap_s']:g} on CUDA, {cpu['time_cap_s']:g} on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    unknown = set(args.tasks.split(",")) - set(TASKS)
    if unknown:
        parser.error(f"--tasks: unknown {sorted(unknown)}; choose from {list(TASKS)}")
    for option, value, low in (("--repeats", args.repeats, 1), ("--max-repeats", args.max_repeats, 1),
                               ("--time-cap", args.time_cap, 0)):
        if value is not None and not value >= low:
            parser.error(f"{option} must be >= {low}, got {value}")
    if not args.target_spread > 0:
        parser.error(f"--target-spread must be > 0, got {args.target_spread}")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    full = args.full or (not args.quick and device.type == "cuda")
    if full:
        kw = {}
        if args.vocab:
            kw["vs"] = tuple(args.vocab)
        if args.tokens:
            kw["ns"] = tuple(args.tokens)
        if args.dtypes:
            kw["dtypes"] = tuple(args.dtypes)
        if args.hidden:
            kw["hs"] = tuple(args.hidden)
        shapes = full_shapes(**kw)
    else:
        shapes = quick_shapes()
    wanted = set(args.tasks.split(","))
    shapes = [s for s in shapes if s.task in wanted]
    timing = dict(min_repeats=args.repeats, max_repeats=args.max_repeats, target=args.target_spread,
                  time_cap_s=args.time_cap)

    begin = time.perf_counter()
    name = device_name(device)
    out_dir = output.directory(args, name)
    origin = output.provenance(name)
    print(f"device: {name}; commit {origin['commit']}" + (" with uncommitted changes" if
          origin["uncommitted_changes"] else ""), file=sys.stderr)

    contenders, skipped = {}, []
    for task in sorted({s.task for s in shapes}, key=list(TASKS).index):
        contenders[task], skips = split_contenders(task, device)
        skipped += [dict(task=task, contender=s.name, reason=s.reason) for s in skips]
        if not contenders[task]:
            print(f"skipped task {task}: nothing to run", file=sys.stderr)
    for s in skipped:
        print(f"skipped {s['task']} / {s['contender']}: {s['reason']}", file=sys.stderr)
    shapes = [s for s in shapes if contenders[s.task]]

    roof = roofline(device)
    roof.update(device=name, torch=torch.__version__, mode="full" if full else "quick",
                target_spread=args.target_spread, **{k: v for k, v in timing.items() if k != "target"})
    roof.update({k: v for k, v in DEFAULTS[device.type if device.type == "cuda" else "cpu"].items()
                 if roof.get(k) is None})
    print(f"roofline: copy {roof['copy_GBps']:.0f} GB/s, matmul ({roof['matmul_dtype']}) "
          f"{roof['matmul_TFLOPs']:.3g} TFLOP/s (measured again at the end; the best counts)", file=sys.stderr)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    rows: List[Dict] = []
    try:
        for shape in tqdm(shapes, desc="benchmarks", unit="shape"):
            rows += bench_shape(shape, device, roof, contenders[shape.task], memory=not args.no_memory,
                                **timing)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    roof["wall_s"] = round(time.perf_counter() - start, 1)
    # The roofline again, after the shapes: a load at the start must not lower it. The best of the two
    # counts, and every row's % roofline is taken against it.
    again = roofline(device)
    roof["roofline_start"] = {k: roof[k] for k in ("copy_GBps", "matmul_TFLOPs")}
    roof["roofline_end"] = {k: again[k] for k in ("copy_GBps", "matmul_TFLOPs")}
    for key in ("copy_GBps", "matmul_TFLOPs"):
        roof[key] = max(roof[key], again[key])
    for row in rows:
        if "ms" in row and not row.get("error"):
            add_throughput(row, roof)
    roof["total_s"] = round(time.perf_counter() - begin, 1)
    roof["provenance"] = output.finish_provenance(origin)
    output.publish(lambda scratch: report.write_all(rows, roof, skipped, scratch), out_dir)
    with open(os.path.join(out_dir, "results.md")) as f:
        print(f.read())
    print(f"results in {out_dir} ({roof['wall_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
