"""Benchmark results as a CSV, markdown tables with ratios, and PNG plots of time and memory vs V.

Ratios compare each contender with the baselines of its shape: eager PyTorch as users write it
and torch.compile of the same code (the roles EAGER and COMPILED in tasks/common.py).
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
from collections import defaultdict
from typing import Dict, List

from . import output
from .tasks import COMPILED, EAGER

COLUMNS = ["task", "dtype", "N", "V", "H", "contender", "role",
           # time: the median, its ~95% interval, the extremes, how many repeats and why they stopped
           "ms", "ms_low", "ms_high", "ms_min", "ms_max", "repeats", "spread_pct", "noisy", "stop",
           "others_cpu_pct",  # CPU time other processes used while the shape was timed, % of the machine
           "GBps", "TFLOPs", "pct_roofline", "measurement_error",
           "floor_ms", "x_floor",  # benchmarks/roofline.py's floor on this device, and ms / floor
           "peak_MiB", "overhead_MiB",
           "speedup_vs_eager", "speedup_vs_eager_low", "speedup_vs_eager_high",
           "speedup_vs_compiled", "speedup_vs_compiled_low", "speedup_vs_compiled_high",
           "memory_vs_eager", "agreement", "note", "error"]
NOISY = "⚠ noisy"  # the marker of a row whose spread stayed above the target


def _shape_key(row):
    return (row["task"], row["dtype"], row["N"], row["V"], row["H"])


def add_ratios(rows: List[Dict]) -> None:
    """Speed-up against eager PyTorch and torch.compile, and memory against eager, on one shape's rows."""
    eager = next((r for r in rows if r.get("role") == EAGER and "ms" in r), None)
    compiled = next((r for r in rows if r.get("role") == COMPILED and "ms" in r), None)
    for row in rows:
        if "ms" not in row:
            continue
        for base, key in ((eager, "speedup_vs_eager"), (compiled, "speedup_vs_compiled")):
            if base is None:
                continue
            row[key] = base["ms"] / row["ms"]
            # The ratio's interval from the two medians' intervals (conservative: ends against ends).
            if "ms_low" in base and "ms_low" in row:
                row[key + "_low"], row[key + "_high"] = base["ms_low"] / row["ms_high"], base["ms_high"] / row["ms_low"]
        if eager is not None and "overhead_MiB" in row and eager.get("overhead_MiB"):
            row["memory_vs_eager"] = row["overhead_MiB"] / eager["overhead_MiB"]


def write_csv(rows: List[Dict], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits=2):
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def _sig(value: float) -> str:
    """Three significant digits, never rounded to zero (0.0594, 12.6, 313)."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _spread_cell(row: Dict) -> str:
    spread = row.get("spread_pct")
    text = "n/a" if spread is None or math.isnan(spread) else f"±{spread:.1f}%"
    return f"{text} {NOISY}" if row.get("noisy") else text


def _ratio_cell(row: Dict, key: str) -> str:
    if key not in row:
        return ""
    text = f"{_fmt(row[key])}x"
    if key + "_low" in row:
        text += f" ({_fmt(row[key + '_low'])}–{_fmt(row[key + '_high'])})"
    return text


def _throughput_cells(row: Dict):
    if row.get("measurement_error"):
        return "measurement error", "error"
    if "GBps" in row:
        return f"{_sig(row['GBps'])} GB/s", _fmt(row.get("pct_roofline"), 1)
    if "TFLOPs" in row:
        return f"{_sig(row['TFLOPs'])} TFLOP/s", _fmt(row.get("pct_roofline"), 1)
    return "", ""


def method_text(roof: Dict) -> str:
    """How the times were taken (the stop rule with this run's settings) and what the columns mean."""
    target = 100 * roof.get("target_spread", 0.03)
    cap, least, most = roof.get("time_cap_s"), roof.get("min_repeats"), roof.get("max_repeats")
    rule = (f"at least {least} repeats, then more until the ~95% interval of the median is within ±{target:g}% of it, "
            f"or the contender has spent {cap:g} s on the shape, or {most} repeats" if cap is not None else
            f"±{target:g}% target")
    return ("Times are medians of forward (+ backward where the task has one), on the same inputs for every "
            "contender of a shape; the contenders of a shape take turns, one repeat each per round. Repeats: "
            f"{rule}. `95% interval`: the distribution-free interval of the median (order statistics; [min, max] "
            f"below 6 repeats); `spread`: its larger side against the median; a row still wider than ±{target:g}% "
            f"when its repeats stop is marked {NOISY}. Speed-ups give, in brackets, the ratio of the two intervals' "
            "ends. `% roofline` is achieved GB/s against the copy bandwidth (logprobs: N·V·s bytes; loss: 3·N·V·s) "
            "or TFLOP/s against the matmul rate (linear: 6·N·H·V), both rooflines the best of their repeats, "
            "measured before and after the shapes (the better counts); `x floor` is the time over the workload's "
            "floor on an H100 or H200 (benchmarks/roofline.py, benchmarks/results/roofline.md), 1.00 at the floor; a "
            "rate above 100% of it or not above 0 is a measurement error, reported as one and not as a number. "
            "`overhead MiB` is peak memory above the inputs, minus the gradients the contender must return. "
            "Speed-ups are against plain eager PyTorch written as TRL writes it and `torch.compile` of that code, "
            "measured in the same run; memory is against eager. Every contender's value is first checked "
            "against `grpo_kernels.reference` (the plain-PyTorch ground truth the tests run in fp64; here in "
            "fp32 on the benchmark's inputs): the largest difference relative to its magnitude is the "
            "`agreement` column of results.csv, and a contender beyond the task's tolerance is reported, not "
            "timed. The reference itself is not timed.")


def write_markdown(rows: List[Dict], roof: Dict, skipped: List[Dict], path: str) -> None:
    timed = [r for r in rows if "ms" in r and not r.get("error")]
    noisy = [r for r in timed if r.get("noisy")]
    errors = [r for r in timed if r.get("measurement_error")]
    lines = [f"# Benchmarks on {roof['device']}", ""]
    if roof.get("provenance"):
        lines += [output.provenance_line(roof["provenance"]), ""]
    others = [r["others_cpu_pct"] for r in timed if "others_cpu_pct" in r]
    if others:
        lines += [f"Other processes used {min(others):.0f}–{max(others):.0f}% of the machine's CPU time while the "
                  "shapes were timed (each shape's share under its title): the interference behind slow or noisy "
                  "rows on a shared machine.", ""]
    lines += [f"{roof['mode'].capitalize()} set, {roof.get('wall_s', 0):.0f} s of measuring"
              + (f" ({roof['total_s']:.0f} s in all)" if "total_s" in roof else "")
              + f". Measured roofline: device copy {roof['copy_GBps']:.0f} GB/s, {roof['matmul_dtype']} matmul "
              f"{_sig(roof['matmul_TFLOPs'])} TFLOP/s. {len(noisy)} of {len(timed)} timed rows {NOISY}, "
              f"{len(errors)} measurement error(s).", "", method_text(roof), ""]
    groups = defaultdict(list)
    for row in rows:
        groups[_shape_key(row)].append(row)
    header = ("| contender | ms (median) | 95% interval | min – max | repeats | spread | throughput | % roofline "
              "| x floor "
              "| peak MiB | overhead MiB | speed-up vs eager | speed-up vs torch.compile | memory vs eager | note |")
    for (task, dtype, n, v, h), group in groups.items():
        title = f"## {task}: N={n}" + (f", V={v}" if v else "") + (f", H={h}" if h else "") + f", {dtype}"
        lines += [title, ""]
        share = next((r["others_cpu_pct"] for r in group if "others_cpu_pct" in r), None)
        if share is not None:
            lines += [f"Other processes used {share:.0f}% of the CPU time while this shape was timed.", ""]
        lines += [header, "|" + "---|" * header.count(" | ") + "---|"]
        for r in group:
            if r.get("error"):
                lines.append(f"| {r['contender']} |" + " |" * 13 + f" {r['error']} |")
                continue
            thr, pct = _throughput_cells(r)
            note = "; ".join(x for x in (r.get("note", ""), r.get("measurement_error") and
                                         f"measurement error: {r['measurement_error']}") if x)
            ms = lambda key: _fmt(r.get(key), 3)  # noqa: E731
            lines.append(
                f"| {r['contender']} | {ms('ms')} | {ms('ms_low')}–{ms('ms_high')} | {ms('ms_min')} – {ms('ms_max')} | "
                f"{r.get('repeats', '')} | {_spread_cell(r)} | "
                f"{thr} | {pct} | {_fmt(r.get('x_floor'), 2)} | "
                f"{_fmt(r.get('peak_MiB'), 1)} | {_fmt(r.get('overhead_MiB'), 1)} | "
                f"{_ratio_cell(r, 'speedup_vs_eager')} | {_ratio_cell(r, 'speedup_vs_compiled')} | "
                f"{_fmt(r.get('memory_vs_eager'), 3)} | {note} |")
        lines.append("")
    if skipped:
        lines += ["## Not run here", "", "| task | contender | why |", "|---|---|---|"]
        lines += [f"| {s['task']} | {s['contender']} | {s['reason']} |" for s in skipped]
        lines.append("")
    with open(path, "w") as f:
        f.write("\n".join(lines))


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
OFFSET = 0.015  # contender i is drawn at V·(1 + OFFSET·(i − centre)): equal values stay side by side


def plot_styles(names: List[str]) -> Dict[str, Dict]:
    """Per contender: a marker, a line style, a marker size and line width (later ones smaller and
    thinner, drawn on top, so an equal earlier line still shows around them) and a relative offset
    along V."""
    centre = (len(names) - 1) / 2
    return {name: dict(marker=MARKERS[i % len(MARKERS)], linestyle=LINESTYLES[i % len(LINESTYLES)],
                       markersize=max(3.0, 9.0 - 1.2 * i), linewidth=max(0.8, 3.2 - 0.6 * i),
                       offset=1 + OFFSET * (i - centre), zorder=2 + i)
            for i, name in enumerate(names)}


def write_plots(rows: List[Dict], out_dir: str) -> None:
    """<task>_<dtype>_N<n>[_H<h>].png: time (median, 95% interval as error bars) and memory against V,
    one line per contender. Noisy points are hollow; a measurement error does not change the time."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return
    series = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["task"] in ("logprobs", "loss", "linear") and "ms" in r and not r.get("error"):
            series[(r["task"], r["dtype"], r["N"], r["H"])][r["contender"]].append(r)
    for (task, dtype, n, h), by_contender in series.items():
        vocab_sizes = {r["V"] for rs in by_contender.values() for r in rs}
        if len(vocab_sizes) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        styles = plot_styles(sorted(by_contender))
        for name, rs in sorted(by_contender.items()):
            st = styles[name]
            rs = sorted(rs, key=lambda r: r["V"])
            xs = [r["V"] * st["offset"] for r in rs]
            ms = [r["ms"] for r in rs]
            err = [[r["ms"] - r.get("ms_low", r["ms"]) for r in rs], [r.get("ms_high", r["ms"]) - r["ms"] for r in rs]]
            line = axes[0].errorbar(xs, ms, yerr=err, marker=st["marker"], linestyle=st["linestyle"],
                                    linewidth=st["linewidth"], markersize=st["markersize"], capsize=3,
                                    zorder=st["zorder"], label=name)
            color = line[0].get_color()
            hollow = [(x, m) for x, m, r in zip(xs, ms, rs) if r.get("noisy")]
            if hollow:  # noisy points: white inside
                axes[0].plot(*zip(*hollow), linestyle="none", marker=st["marker"], markersize=st["markersize"],
                             markerfacecolor="white", markeredgecolor=color, zorder=st["zorder"] + 0.5)
            mem = [(x, r["overhead_MiB"]) for x, r in zip(xs, rs) if "overhead_MiB" in r]
            if mem:
                axes[1].plot(*zip(*mem), marker=st["marker"], linestyle=st["linestyle"], markersize=st["markersize"],
                             linewidth=st["linewidth"], color=color, zorder=st["zorder"], label=name)
        suffix = f"N={n}" + (f", H={h}" if h else "") + f", {dtype}"
        axes[0].set(xlabel="vocabulary V", ylabel="ms (median, 95% interval)", title=f"{task} time, {suffix}",
                    yscale="log")
        axes[1].set(xlabel="vocabulary V", ylabel="MiB above inputs and gradients", title=f"{task} memory, {suffix}")
        axes[1].set_yscale("symlog", linthresh=1.0)  # 0 MiB (in-place kernels) must stay visible
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
        shift = 100 * OFFSET * (len(styles) - 1) / 2
        fig.text(0.5, 0.005, f"Side by side (V offset by up to ±{shift:.0f}%), each with its own marker, line style "
                 "and width (later ones thinner, on top), so equal values stay visible.\nBars: the median's ~95% "
                 "interval. Hollow: noisy (the interval wider than the target).", ha="center", fontsize=7)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(os.path.join(out_dir, f"{task}_{dtype}_N{n}" + (f"_H{h}" if h else "") + ".png"), dpi=110)
        plt.close(fig)


def read_csv(path: str) -> List[Dict]:
    """results.csv back as rows: numbers as numbers, True/False as booleans, empty cells left out."""
    def value(text: str):
        if text in ("True", "False"):
            return text == "True"
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return text
    with open(path, newline="") as f:
        return [{k: value(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def redraw(out_dir: str) -> None:
    """Draw a result set's plots again from its results.csv (`python -m benchmarks.report DIR`)."""
    write_plots(read_csv(os.path.join(out_dir, "results.csv")), out_dir)


def write_all(rows: List[Dict], roof: Dict, skipped: List[Dict], out_dir: str) -> None:
    write_csv(rows, os.path.join(out_dir, "results.csv"))
    write_markdown(rows, roof, skipped, os.path.join(out_dir, "results.md"))
    write_plots(rows, out_dir)
    with open(os.path.join(out_dir, "roofline.json"), "w") as f:
        json.dump(roof, f, indent=2)


if __name__ == "__main__":
    for directory in sys.argv[1:]:
        redraw(directory)
