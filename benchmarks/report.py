"""Benchmark results as a CSV, markdown tables with ratios, and PNG plots of time and memory vs V."""
from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from typing import Dict, List

COLUMNS = ["task", "dtype", "N", "V", "H", "contender", "ms", "GBps", "TFLOPs", "pct_roofline", "peak_MiB",
           "overhead_MiB", "speedup_vs_reference", "memory_vs_reference", "agreement", "note", "error"]


def _shape_key(row):
    return (row["task"], row["dtype"], row["N"], row["V"], row["H"])


def add_ratios(rows: List[Dict]) -> None:
    """Speed-up and memory ratio of every contender against the eager reference of its shape."""
    reference = next((r for r in rows if r["contender"].startswith("reference") and "ms" in r), None)
    if reference is None:
        return
    for row in rows:
        if "ms" in row:
            row["speedup_vs_reference"] = reference["ms"] / row["ms"]
        if "overhead_MiB" in row and reference.get("overhead_MiB"):
            row["memory_vs_reference"] = row["overhead_MiB"] / reference["overhead_MiB"]


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


def write_markdown(rows: List[Dict], roof: Dict, path: str) -> None:
    lines = [f"# Benchmarks on {roof['device']}", "",
             f"torch {roof['torch']}; {roof['mode']} set. Measured roofline: device copy "
             f"{roof['copy_GBps']:.0f} GB/s, {roof['matmul_dtype']} matmul {roof['matmul_TFLOPs']:.1f} TFLOP/s.",
             "Times are medians of forward (+ backward where the task has one). `% roofline` is achieved "
             "GB/s against the copy bandwidth (logprobs: N·V·s bytes; loss: 3·N·V·s) or TFLOP/s against the "
             "matmul rate (linear: 6·N·H·V). `overhead MiB` is peak memory above the inputs, minus the "
             "gradients the contender must return. Ratios are against the eager reference of the same shape.", ""]
    groups = defaultdict(list)
    for row in rows:
        groups[_shape_key(row)].append(row)
    for (task, dtype, n, v, h), group in groups.items():
        title = f"## {task}: N={n}" + (f", V={v}" if v else "") + (f", H={h}" if h else "") + f", {dtype}"
        lines += [title, "", "| contender | ms | throughput | % roofline | peak MiB | overhead MiB | speed-up vs ref"
                  " | memory vs ref | note |", "|---|---|---|---|---|---|---|---|---|"]
        for r in group:
            if r.get("error"):
                lines.append(f"| {r['contender']} | | | | | | | | {r['error']} |")
                continue
            thr = f"{r['GBps']:.0f} GB/s" if "GBps" in r else (f"{r['TFLOPs']:.1f} TFLOP/s" if "TFLOPs" in r else "")
            lines.append(
                f"| {r['contender']} | {_fmt(r.get('ms'), 3)} | {thr} | {_fmt(r.get('pct_roofline'), 1)} | "
                f"{_fmt(r.get('peak_MiB'), 1)} | {_fmt(r.get('overhead_MiB'), 1)} | "
                f"{_fmt(r.get('speedup_vs_reference'))}x | {_fmt(r.get('memory_vs_reference'), 3)} | "
                f"{r.get('note', '')} |")
        ours = [r for r in group if r["contender"].startswith("grpo_kernels") and "ms" in r]
        peers = [r for r in group if not r["contender"].startswith("grpo_kernels") and "ms" in r]
        if ours and peers:
            best = min(ours, key=lambda r: r["ms"])
            versus = ", ".join(f"{p['ms'] / best['ms']:.2f}x vs {p['contender']}" for p in peers)
            lines += ["", f"Fastest of ours, {best['contender']}: {versus}."]
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


def write_all(rows: List[Dict], roof: Dict, out_dir: str) -> None:
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    write_markdown(rows, roof, os.path.join(out_dir, "results.md"))
    write_plots(rows, out_dir)
    with open(os.path.join(out_dir, "roofline.json"), "w") as f:
        json.dump(roof, f, indent=2)
