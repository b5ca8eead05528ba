"""One command for all benchmarks: `python -m benchmarks [--quick | --full] [--tasks ...]`.

--quick  a CPU-sized set (the shapes the CPU targets of the issues name), runs in minutes
--full   the GPU sweep: V in {32000, 128256, 151936, 262144}, N in {4096, 16384},
         H in {2048, 4096}, bf16 and fp32

Writes benchmarks/results/<device>/: results.csv, results.md (tables with speed-up and memory
ratio against the reference and each peer), roofline.json, and PNG plots of time and memory
against V. Every contender is checked against the fp32 reference before it is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List

import torch

from . import report
from .measure import cpu_peak_extra_bytes, cuda_peak_extra_bytes, device_name, roofline, time_ms
from .tasks import TASKS, Shape, agreement

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def quick_shapes() -> List[Shape]:
    return [
        Shape("logprobs", 2048, 16000, dtype="float32"),
        Shape("logprobs", 2048, 32000, dtype="float32"),
        Shape("loss", 2048, 16000, dtype="float32"),
        Shape("loss", 2048, 32000, dtype="float32"),
        Shape("linear", 4096, 32000, 1024, dtype="float32"),
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
    shapes.append(Shape("verl_policy", 1 << 20, 0, dtype="float32"))
    return shapes


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def bench_shape(shape: Shape, device: torch.device, roof: Dict, *, repeats: int, memory: bool) -> List[Dict]:
    task = TASKS[shape.task]
    rows: List[Dict] = []
    try:
        inputs = task.build(shape, device)
    except Exception as exc:  # noqa: BLE001 - reported in the results, the sweep goes on
        return [dict(**shape.key(), contender="(inputs)", error="OOM" if _is_oom(exc) else repr(exc)[:200])]
    contenders = task.contenders(device)
    expected = None
    for contender in contenders:
        row = dict(**shape.key(), contender=contender.name, note=contender.note)
        rows.append(row)
        try:
            value = contender.run(inputs)
            if expected is None and contender.name.startswith("reference"):
                expected = value
            ref_value = expected if expected is not None else value
            err = agreement(value, ref_value)
            row["agreement"] = err
            if not err <= task.tolerance(shape):
                row["error"] = f"disagrees with the reference by {err:.2e}; not timed"
                continue
            ms = time_ms(lambda: contender.run(inputs), device, repeats=repeats, warmup=2 if device.type == "cpu" else 3)
            row["ms"] = ms
            if task.bytes_moved:
                gbs = task.bytes_moved(shape) / (ms * 1e-3) / 1e9
                row["GBps"], row["pct_roofline"] = gbs, 100 * gbs / roof["copy_GBps"]
            if task.flops:
                tf = task.flops(shape) / (ms * 1e-3) / 1e12
                row["TFLOPs"], row["pct_roofline"] = tf, 100 * tf / roof["matmul_TFLOPs"]
            if memory:
                if device.type == "cuda":
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
    del inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CPU-sized set (default without CUDA)")
    mode.add_argument("--full", action="store_true", help="the full GPU sweep (default with CUDA)")
    parser.add_argument("--tasks", default="logprobs,loss,linear,advantages,verl_policy")
    parser.add_argument("--vocab", type=int, nargs="*", help="override V of the full sweep")
    parser.add_argument("--tokens", type=int, nargs="*", help="override N of the full sweep")
    parser.add_argument("--dtypes", nargs="*", help="override the dtypes of the full sweep")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurements")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)

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
        shapes = full_shapes(**kw)
    else:
        shapes = quick_shapes()
    wanted = set(args.tasks.split(","))
    shapes = [s for s in shapes if s.task in wanted]
    repeats = args.repeats or (20 if device.type == "cuda" else 3)

    name = device_name(device)
    out_dir = os.path.join(args.out, re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_"))
    os.makedirs(out_dir, exist_ok=True)
    print(f"device: {name}", file=sys.stderr)
    roof = roofline(device)
    roof.update(device=name, torch=torch.__version__, mode="full" if full else "quick")
    print(f"roofline: copy {roof['copy_GBps']:.0f} GB/s, matmul ({roof['matmul_dtype']}) "
          f"{roof['matmul_TFLOPs']:.1f} TFLOP/s", file=sys.stderr)

    from tqdm.auto import tqdm

    rows: List[Dict] = []
    for shape in tqdm(shapes, desc="benchmarks", unit="shape"):
        rows += bench_shape(shape, device, roof, repeats=repeats, memory=not args.no_memory)
        report.write_all(rows, roof, out_dir)  # keep partial results if the run is cut short
    with open(os.path.join(out_dir, "roofline.json"), "w") as f:
        json.dump(roof, f, indent=2)
    print(open(os.path.join(out_dir, "results.md")).read())
    print(f"results in {out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
