"""Where benchmark results go, and how they are written: never over the committed set by accident.

By default every run writes a fresh directory, runs/benchmarks/<device>-<date>-<time>/;
`--update-committed` writes into the repository's set, benchmarks/results/<device>/. Files are
written only at the end of a run, into a scratch directory beside the target, and then moved in
with one atomic rename each, so an interrupted run leaves nothing and a reader never sees a
half-written file.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Optional

COMMITTED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
FRESH = os.path.join("runs", "benchmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None,
                       help=f"results directory (default: a fresh {FRESH}/<device>-<date>-<time>)")
    where.add_argument("--update-committed", action="store_true",
                       help="write into the committed set, benchmarks/results/<device>/, replacing its files")


def directory(args: argparse.Namespace, device_label: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", device_label).strip("_")
    if args.update_committed:
        return os.path.join(COMMITTED, slug)
    return args.out or os.path.join(FRESH, f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}")


def publish(write: Callable[[str], None], out_dir: str) -> None:
    """write(scratch_dir) creates the files; each is then renamed into out_dir atomically."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".bench-", dir=parent)
    try:
        write(scratch)
        os.makedirs(out_dir, exist_ok=True)
        for name in sorted(os.listdir(scratch)):
            os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def publish_texts(texts: Dict[str, str], out_dir: str, report: str) -> None:
    """Publish named text files (as publish does), then print `report` and where they went."""
    def write(scratch):
        for name, text in texts.items():
            with open(os.path.join(scratch, name), "w", newline="") as f:
                f.write(text)
    publish(write, out_dir)
    print(report)
    print(f"results in {out_dir}", file=sys.stderr)


def _git(*argv: str) -> Optional[str]:
    try:
        done = subprocess.run(["git", "-C", ROOT, *argv], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def provenance(machine: str) -> Dict:
    """Where, when and from which code a result set comes: the machine, the date (UTC), the git
    commit of this checkout (and whether the measured code, grpo_kernels/, csrc/ or benchmarks/,
    had uncommitted changes), torch, Python, and the load average before the run."""
    commit = _git("rev-parse", "--short", "HEAD")
    changes = _git("status", "--porcelain", "--untracked-files=no", "--", "grpo_kernels", "csrc", "benchmarks",
                   ":(exclude)benchmarks/results")
    import torch

    return dict(machine=machine, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), commit=commit or "unknown",
                uncommitted_changes=bool(changes), torch=torch.__version__, python=platform.python_version(),
                cpus=os.cpu_count(), load_before=round(os.getloadavg()[0], 2))


def provenance_line(p: Dict) -> str:
    """The results' header line: machine, date, commit (and the load around the run, when known)."""
    line = (f"Measured on {p['machine']}, {p['date']}, commit {p['commit']}"
            + (" with uncommitted changes" if p.get("uncommitted_changes") else "")
            + f"; torch {p['torch']}, Python {p['python']}")
    if "load_before" in p:
        line += f"; load average {p['load_before']:.1f} before the run"
        if "load_after" in p:
            line += f" and {p['load_after']:.1f} after it"
        line += f" ({p['cpus']} CPUs)"
    return line + "."


def finish_provenance(p: Dict) -> Dict:
    """The load average after the run, added to `p`."""
    p["load_after"] = round(os.getloadavg()[0], 2)
    return p
