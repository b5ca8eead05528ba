"""Benchmark results as a CSV, markdown tables with ratios, and PNG plots of time and memory vs V.

Ratios compare each contender with the baselines of its shape: eager PyTorch as users write it
and torch.compile of the same code (the roles EAGER and COMPILED in tasks/common.py).
"""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Dict, List

from .tasks import COMPILED, EAGER

COLUMNS = ["task", "dtype", "N", "V", "H", "contender", "role", "ms", "GBps", "TFLOPs", "pct_roofline", "peak_MiB",
           "overhead_MiB", "speedup_vs_eager", "speedup_vs_compiled", "memory_vs_eager", "agreement", "note", "error"]


def _shape_key(row):
    return (row["task"], row["dtype"], row["N"], row["V"], row["H"])


def add_ratios(rows: List[Dict]) -> None:
    """Speed-up against eager PyTorch and torch.compile, and memory against eager, on one shape's rows."""
    eager = next((r for r in rows if r.get("role") == EAGER and "ms" in r), None)
    compiled = next((r for r in rows if r.get("role") == COMPILED and "ms" in r), None)
    for row in rows:
        if "ms" not in row:
            continue
        if eager is not None:
            row["speedup_vs_eager"] = eager["ms"] / row["ms"]
            if "overhead_MiB" in row and eager.get("overhead_MiB"):
                row["memory_vs_eager"] = row["overhead_MiB"] / eager["overhead_MiB"]
        if compiled is not None:
            row["speedup_vs_compiled"] = compiled["ms"] / row["ms"]


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits=2):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def write_markdown(rows: List[Dict], roof: Dict, skipped: List[Dict], path: str) -> None:
    lines = [f"# Benchmarks on {roof['device']}", "",
             f"torch {roof['torch']}; {roof['mode']} set, {roof.get('wall_s', 0):.0f} s. Measured roofline: device "
             f"copy {roof['copy_GBps']:.0f} GB/s, {roof['matmul_dtype']} matmul {roof['matmul_TFLOPs']:.1f} TFLOP/s.",
             "Times are medians of forward (+ backward where the task has one), on the same inputs for every "
             "contender of a shape. `% roofline` is achieved GB/s against the copy bandwidth (logprobs: N·V·s "
             "bytes; loss: 3·N·V·s) or TFLOP/s against the matmul rate (linear: 6·N·H·V). `overhead MiB` is peak "
             "memory above the inputs, minus the gradients the contender must return. Speed-ups are against "
             "plain eager PyTorch written as TRL writes it and `torch.compile` of that code, measured in the "
             "same run; memory is against eager. The fp32 reference only checks every contender's value "
             "(`agreement`) and is not timed.", ""]
    groups = defaultdict(list)
    for row in rows:
        groups[_shape_key(row)].append(row)
    for (task, dtype, n, v, h), group in groups.items():
        title = f"## {task}: N={n}" + (f", V={v}" if v else "") + (f", H={h}" if h else "") + f", {dtype}"
        lines += [title, "", "| contender | ms | throughput | % roofline | peak MiB | overhead MiB | speed-up vs eager"
                  " | speed-up vs torch.compile | memory vs eager | note |", "|" + "---|" * 10]
        for r in group:
            if r.get("error"):
                lines.append(f"| {r['contender']} | | | | | | | | | {r['error']} |")
                continue
            thr = f"{r['GBps']:.0f} GB/s" if "GBps" in r else (f"{r['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in r else "")
            ratio = lambda key: f"{_fmt(r[key])}x" if key in r else ""  # noqa: E731
            lines.append(
                f"| {r['contender']} | {_fmt(r.get('ms'), 3)} | {thr} | {_fmt(r.get('pct_roofline'), 1)} | "
                f"{_fmt(r.get('peak_MiB'), 1)} | {_fmt(r.get('overhead_MiB'), 1)} | {ratio('speedup_vs_eager')} | "
                f"{ratio('speedup_vs_compiled')} | {_fmt(r.get('memory_vs_eager'), 3)} | {r.get('note', '')} |")
        lines.append("")
    if skipped:
        lines += ["## Not run here", "", "| task | contender | why |", "|---|---|---|"]
        lines += [f"| {s['task']} | {s['contender']} | {s['reason']} |" for s in skipped]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


def write_plots(rows: List[Dict], out_dir: str) -> None:
    """time_<task>_<dtype>_N<n>.png and memory_... : one line per contender against V."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] in ("logprobs", "loss", "linear") and "ms" in r:
            series[(r["task"], r["dtype"], r["N"], r["H"])][r["contender"]].append(r)
    for (task, dtype, n, h), by_contender in series.items():
        vocab_sizes = {r["V"] for rs in by_contender.values() for r in rs}
        if len(vocab_sizes) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, rs in sorted(by_contender.items()):
            rs = sorted(rs, key=lambda r: r["V"])
            axes[0].plot([r["V"] for r in rs], [r["ms"] for r in rs], marker="o", label=name)
            mem = [(r["V"], r["overhead_MiB"]) for r in rs if "overhead_MiB" in r]
            if mem:
                axes[1].plot(*zip(*mem), marker="o", label=name)
        suffix = f"N={n}" + (f", H={h}" if h else "") + f", {dtype}"
        axes[0].set(xlabel="vocabulary V", ylabel="ms (median)", title=f"{task} time, {suffix}", yscale="log")
        axes[1].set(xlabel="vocabulary V", ylabel="MiB above inputs and gradients", title=f"{task} memory, {suffix}")
        axes[1].set_yscale("symlog", linthresh=1.0)  # 0 MiB (in-place kernels) must stay visible
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"{task}_{dtype}_N{n}" + (f"_H{h}" if h else "") + ".png"), dpi=110)
        plt.close(fig)


def write_all(rows: List[Dict], roof: Dict, skipped: List[Dict], out_dir: str) -> None:
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    write_markdown(rows, roof, skipped, os.path.join(out_dir, "results.md"))
    write_plots(rows, out_dir)
    with open(os.path.join(out_dir, "roofline.json"), "w") as f:
        json.dump(roof, f, indent=2)
