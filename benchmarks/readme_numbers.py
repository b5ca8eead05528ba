"""The documentation's benchmark tables, rendered from the committed result files.

    python -m benchmarks.readme_numbers                      # print the section
    python -m benchmarks.readme_numbers --write docs/benchmarks.md
    python -m benchmarks.readme_numbers --check docs/benchmarks.md README.md

The section sits between the lines <!-- benchmarks:begin --> and <!-- benchmarks:end --> of a
markdown file; --write replaces it (or appends it to a file without one), --check exits 1 when
a file's section differs from what the committed results give, or the file has none.
tests/test_benchmark_numbers.py runs the check on docs/benchmarks.md, so a re-measured set
(`python -m benchmarks --update-committed`) and the page cannot disagree.

Sources, in benchmarks/results/<device>/: results.csv and roofline.json (python -m benchmarks),
linear_vs_trl.csv and trl_trainer.csv (python -m benchmarks.trl_trainer), each with the header
line of its .md saying where, when and from which commit it was measured.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional

from .output import COMMITTED
from .report import read_csv

BEGIN = "<!-- benchmarks:begin -->"
END = "<!-- benchmarks:end -->"
DEVICE = "AMD_EPYC_2_cores"
COMMAND = "python -m benchmarks.readme_numbers"
TASK_LABELS = {"logprobs": "log-probs", "loss": "loss fwd+bwd", "linear": "fused-linear fwd+bwd",
               "advantages": "group advantages", "verl_policy": "verl policy loss"}
TRL_LABELS = {"TRL selective_log_softmax": "`selective_log_softmax`",
              "TRL selective_log_softmax + GRPOTrainer loss": "`selective_log_softmax` + loss lines",
              "TRL 1.16 ChunkedLogProbFunction + loss": "`ChunkedLogProbFunction`"}


def _rel(path: str) -> str:
    return os.path.relpath(path, os.path.dirname(os.path.dirname(COMMITTED)))


def header_line(md_path: str) -> str:
    """The line of a results .md that says where, when and from which commit it was measured."""
    with open(md_path) as f:
        for line in f:
            if line.startswith(("Measured on", "Run on")):
                return line.strip()
    raise ValueError(f"{md_path} has no 'Measured on ...' line (machine, date, commit)")


def _ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    if ms >= 1:
        return f"{ms:.2f} ms"
    return f"{ms:.3f} ms"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def _time(row: Optional[Dict]) -> str:
    """'105 ms ±1.2%' (the median ± the half-width of its ~95% interval), '⚠' when noisy."""
    if row is None or "ms" not in row:
        return "—"
    spread = row.get("spread_pct")
    text = _ms(row["ms"]) + ("" if spread is None or math.isnan(spread) else f" ±{spread:.1f}%")
    return text + (" ⚠" if row.get("noisy") else "")


def _ours(row: Optional[Dict], has_compiled: bool) -> str:
    if row is None or "ms" not in row:
        return "—"
    ratios = []
    if "speedup_vs_eager" in row:
        interval = (f" [{row['speedup_vs_eager_low']:.2f}–{row['speedup_vs_eager_high']:.2f}]"
                    if "speedup_vs_eager_low" in row else "")
        ratios.append(f"{_x(row['speedup_vs_eager'])} eager{interval}")
    if has_compiled and "speedup_vs_compiled" in row:
        ratios.append(f"{_x(row['speedup_vs_compiled'])} compile")
    return _time(row) + (f" ({', '.join(ratios)})" if ratios else "")


def _mib(row: Optional[Dict]) -> str:
    if row is None or "overhead_MiB" not in row:
        return "—"
    v = row["overhead_MiB"]
    return "0" if v == 0 else ("<0.1" if v < 0.05 else (f"{v:.1f}" if v < 10 else f"{v:.0f}"))


def _share(group: List[Dict]) -> str:
    share = next((r["others_cpu_pct"] for r in group if "others_cpu_pct" in r), None)
    return "—" if share is None else f"{share:.0f}%"


def _shape_label(r: Dict) -> str:
    return (f"{TASK_LABELS.get(r['task'], r['task'])}, N={r['N']}" + (f", H={r['H']}" if r.get("H") else "")
            + (f", V={r['V']}" if r.get("V") else ""))


def quick_set_table(directory: str) -> List[str]:
    """The CPU quick set (results.csv), one line per shape: the baselines, ours, TRL's code, memory."""
    csv_path = os.path.join(directory, "results.csv")
    rows = read_csv(csv_path)
    with open(os.path.join(directory, "roofline.json")) as f:
        roof = json.load(f)
    shapes: Dict[tuple, List[Dict]] = {}
    for r in rows:
        shapes.setdefault((r["task"], r["dtype"], r["N"], r.get("V", 0), r.get("H", 0)), []).append(r)
    timed = [r for r in rows if "ms" in r and not r.get("error")]
    noisy = [r for r in timed if r.get("noisy")]
    errors = [r for r in timed if r.get("measurement_error")]
    target = 100 * roof.get("target_spread", 0.03)
    dtypes = sorted({r["dtype"] for r in rows})
    md_path = os.path.join(directory, "results.md")
    minutes = roof.get("total_s", roof.get("wall_s", 0)) / 60
    lines = [f"From `{_rel(csv_path)}` (every contender, interval and ratio in `{_rel(md_path)}`). "
             + header_line(md_path),
             "",
             f"{roof['mode'].capitalize()} set, {minutes:.1f} min. Each time is the median of its repeats ± the larger "
             "side of the median's ~95% interval; ⚠ marks a noisy row, whose "
             f"interval stayed wider than ±{target:g}% ({len(noisy)} of {len(timed)} rows). Ratios compare medians "
             "of the same run, [the range the two intervals allow]. Memory: peak above the inputs and the "
             "gradients a contender must return. Others' CPU: the share of the machine's CPU time other processes "
             "used while the shape was timed (on a shared machine, what slows and spreads a row). "
             + (f"Measurement errors: {', '.join(r['contender'] + ' (' + _shape_label(r) + ')' for r in errors)}."
                if errors else "No measurement errors."),
             "",
             f"| task ({', '.join(dtypes)}, {roof['provenance']['cpus'] if 'provenance' in roof else '?'} cores) | "
             "eager PyTorch | torch.compile | `cpp` | `torch` backend | TRL's own code | "
             "memory MiB: `cpp` / `torch` / eager | others' CPU |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, _dtype, _n, _v, _h), group in shapes.items():
        eager = next((r for r in group if r.get("role") == "eager"), None)
        compiled = next((r for r in group if r.get("role") == "compiled"), None)
        cpp = next((r for r in group if str(r["contender"]).startswith("grpo_kernels[cpp]")), None)
        torch_b = next((r for r in group if str(r["contender"]).startswith("grpo_kernels[torch]")), None)
        trl = next((r for r in group if str(r["contender"]) in TRL_LABELS), None)
        eager_cell = _time(eager)
        if eager is not None and task == "verl_policy":
            eager_cell += " (verl's `vanilla`)"
        trl_cell = "—" if trl is None else f"{_time(trl)} ({TRL_LABELS[trl['contender']]})"
        lines.append(f"| {_shape_label(group[0])} | {eager_cell} | {_time(compiled)} | "
                     f"{_ours(cpp, compiled is not None)} | {_ours(torch_b, compiled is not None)} | {trl_cell} | "
                     f"{_mib(cpp)} / {_mib(torch_b)} / {_mib(eager)} | {_share(group)} |")
    return lines


def trl_user_table(directory: str) -> List[str]:
    """What a TRL user gains: the fused-linear loss against TRL's chunked head (linear_vs_trl.csv)
    and the training step of trl.GRPOTrainer against FusedGRPOTrainer (trl_trainer.csv)."""
    lines = ["| measured | TRL 1.16 | grpo_kernels | ratio |", "|---|---|---|---|"]
    sources = []
    linear_csv = os.path.join(directory, "linear_vs_trl.csv")
    if os.path.exists(linear_csv):
        rows = read_csv(linear_csv)
        trl = next(r for r in rows if str(r["contender"]).startswith("TRL"))
        ours = min((r for r in rows if str(r["contender"]).startswith("grpo_kernels[")), key=lambda r: r["ms"])
        backend = ours["contender"][len("grpo_kernels["):-1]
        lines.append(f"| fused-linear loss fwd+bwd, N={ours['N']}, H={ours['H']}, V={ours['V']} (`{backend}`) | "
                     f"{_time(trl)}, {trl['overhead_MiB']:.0f} MiB above inputs | "
                     f"{_time(ours)}, {ours['overhead_MiB']:.0f} MiB | {_x(trl['ms'] / ours['ms'])} faster, "
                     f"{100 * ours['overhead_MiB'] / trl['overhead_MiB']:.1f}% of the memory |")
        sources.append(linear_csv)
    trainer_csv = os.path.join(directory, "trl_trainer.csv")
    if os.path.exists(trainer_csv):
        rows = read_csv(trainer_csv)
        trl, ours = rows[0], rows[1]

        def step(r):
            s = f"{r['median_step_s']:.3f} s"
            if "step_s_min" in r:
                s += f" ({r['step_s_min']:.3f}–{r['step_s_max']:.3f} over {r['steps'] - 1} steps)"
            return s
        lines.append(f"| `trl.GRPOTrainer` vs `FusedGRPOTrainer`, tiny Llama (H=256, V={ours['vocab']}), median "
                     f"training step | {step(trl)}, peak RSS {trl['peak_rss_MiB']:.0f} MiB | {step(ours)}, "
                     f"{ours['peak_rss_MiB']:.0f} MiB | {_x(trl['median_step_s'] / ours['median_step_s'])} faster, "
                     f"{ours['peak_rss_MiB'] / trl['peak_rss_MiB']:.2f}x the memory |")
        sources.append(trainer_csv)
    if not sources:
        return []
    notes = []
    for path in sources:
        md = path[:-len(".csv")] + ".md"
        has_spread = "ms_low" in read_csv(path)[0] or "step_s_min" in read_csv(path)[0]
        notes.append(f"`{_rel(path)}`: {header_line(md)}"
                     + ("" if has_spread else " One median per row: that run recorded no spread."))
    return [f"- {n}" for n in notes] + [""] + lines


def render(device: str = DEVICE) -> str:
    """The section, markers included, for the committed set of `device`."""
    directory = os.path.join(COMMITTED, device)
    lines = [BEGIN, f"<!-- generated by `{COMMAND}` from {_rel(directory)}/: edit those files (or the script), "
                    "not this section -->", "",
             "**CPU, quick set** (`python -m benchmarks --quick --update-committed`)", ""]
    lines += quick_set_table(directory)
    trl = trl_user_table(directory)
    if trl:
        lines += ["", "**What a TRL user gains** (`python -m benchmarks.trl_trainer` and the fused-linear set)", ""]
        lines += trl
    lines.append(END)
    return "\n".join(lines) + "\n"


def section(text: str) -> Optional[str]:
    """The text from the begin marker's line to the end marker's line (included), or None."""
    start = text.find(BEGIN)
    end = text.find(END, start + 1) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return text[start:end + len(END)] + "\n"


def check(path: str, device: str = DEVICE) -> Optional[str]:
    """None when `path`'s section equals the rendered one, else what is wrong and what to run."""
    with open(path) as f:
        found = section(f.read())
    if found is None:
        return (f"{path} has no {BEGIN} ... {END} section with the benchmark numbers: "
                f"run `{COMMAND} --write {path}` (then move the section where it belongs)")
    if found != render(device):
        return (f"{path}'s benchmark numbers differ from the committed results in "
                f"{_rel(os.path.join(COMMITTED, device))}/: run `{COMMAND} --write {path}`")
    return None


def write(path: str, device: str = DEVICE) -> None:
    text = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    new = render(device)
    old = section(text)
    if old is None:
        text = text + ("\n" if text and not text.endswith("\n") else "") + new
    else:
        text = text.replace(old, new)
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=f"{COMMAND}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=DEVICE, help="the committed set, benchmarks/results/DEVICE "
                        "(default: %(default)s)")
    act = parser.add_mutually_exclusive_group()
    act.add_argument("--write", metavar="FILE", nargs="+", help="replace (or append) the section of each FILE")
    act.add_argument("--check", metavar="FILE", nargs="+", help="exit 1 if a FILE's section differs or is missing")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(COMMITTED, args.device)):
        parser.error(f"--device: no committed set {os.path.join(COMMITTED, args.device)}")
    if args.write:
        for path in args.write:
            write(path, args.device)
            print(f"wrote the benchmark section of {path}", file=sys.stderr)
        return 0
    if args.check:
        problems = [p for p in (check(path, args.device) for path in args.check) if p]
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    sys.stdout.write(render(args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
