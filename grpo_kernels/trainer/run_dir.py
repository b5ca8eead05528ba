"""The run directory (TrainerConfig.output_dir): what marks it as holding a run, and how a run
writes there so that nothing of an earlier run is lost.

- A directory holds a run when it has any of the files a run writes: metrics.jsonl,
  reward_curve.png, `latest`, checkpoint-<step>/ (or their temporary forms). A new run refuses
  such a directory unless it resumes it or is told to overwrite it (`RunExistsError`).
- Nothing in the directory is touched until the first step of a run has completed: a run that
  fails or is stopped before that leaves the directory exactly as it was.
- Overwriting never deletes: once the new run's first step has completed, the earlier run's
  files are moved into `replaced-<YYYYmmdd-HHMMSS>/` inside the directory (a checkpoint there
  still resumes: `--output-dir <dir>/replaced-... --resume`). Delete that folder when it is no
  longer needed.
- metrics.jsonl is only ever appended to, or written as a new file that is renamed into place
  (at the first step of a resumed run, whose log restarts from its checkpoint's history).
"""
from __future__ import annotations

import json
import os
import re
import time
from typing import Dict, List, Optional

from .checkpoint import fsync_path

LOG_FILE = "metrics.jsonl"
REPLACED_PREFIX = "replaced-"
_RUN_ENTRY = re.compile(r"^(?:(?:metrics\.jsonl|reward_curve\.png|latest)(?:\.tmp.*)?|(?:\.tmp-)?checkpoint-\d+)$")


class RunExistsError(FileExistsError):
    """The output directory already holds a run, and the new run was told neither to resume it nor to overwrite it."""


class NoCheckpointError(FileNotFoundError):
    """resume was asked for, and the output directory holds no intact checkpoint."""


def run_entries(output_dir: str) -> List[str]:
    """The names of the entries of `output_dir` that a run wrote (sorted; [] when there is none)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir) if _RUN_ENTRY.match(name))


def describe(names: List[str]) -> str:
    """The run entries `names` in a few words: its log and plot, and its newest checkpoint."""
    steps = sorted(int(m.group(1)) for name in names if (m := re.match(r"^checkpoint-(\d+)$", name)))
    parts = [name for name in (LOG_FILE, "reward_curve.png") if name in names]
    if steps:
        parts.append(f"checkpoint-{steps[-1]}" + (f" and {len(steps) - 1} older" if len(steps) > 1 else ""))
    return ", ".join(parts) or ", ".join(names)


def refusal(output_dir: str, names: List[str], resume: str = "resume=True", overwrite: str = "overwrite=True") -> str:
    """The one-line message of a new run refused by `output_dir` (`names`: its run entries)."""
    return (f"{output_dir} already holds a run ({describe(names)}): pass {resume} to continue it, or {overwrite} to "
            f"start a new one (the earlier run is then moved into {os.path.join(output_dir, REPLACED_PREFIX)}<date>/ "
            f"once the new run's first step has completed)")


def set_aside(output_dir: str) -> Optional[str]:
    """Move the run entries of `output_dir` into a new replaced-<date>/ folder inside it; returns
    that folder (None when there was nothing to move)."""
    names = run_entries(output_dir)
    if not names:
        return None
    base = os.path.join(output_dir, REPLACED_PREFIX + time.strftime("%Y%m%d-%H%M%S"))
    folder, n = base, 1
    while os.path.exists(folder):
        n += 1
        folder = f"{base}-{n}"
    os.makedirs(folder)
    # `latest` first: it never names a checkpoint that has already gone.
    for name in sorted(names, key=lambda name: name != "latest"):
        os.replace(os.path.join(output_dir, name), os.path.join(folder, name))
    fsync_path(output_dir)
    return folder


def write_new(path: str, text: str) -> None:
    """Replace `path` by a file holding `text`, written under another name, flushed and renamed:
    a failure at any point leaves either the old file or the new one, never a truncated one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunLog:
    """metrics.jsonl of one `train()` call. Nothing is written until the first record arrives;
    then (`set_aside_first`) the earlier run's entries are moved aside, the log is written as a
    new file holding the whole history (a resumed run's log restarts from its checkpoint's
    history, dropping steps that ran after that checkpoint and were lost) and renamed into
    place, and each later record is appended and flushed. `enabled=False` (ranks other than 0)
    writes nothing."""

    def __init__(self, output_dir: str, set_aside_first: bool = False, enabled: bool = True):
        self.output_dir, self.set_aside_first, self.enabled = output_dir, set_aside_first, enabled
        self.started = False
        self.replaced: Optional[str] = None  # where the earlier run went (set_aside_first)
        self._file = None

    def write(self, history: List[Dict]) -> None:
        """Log the newest record of `history` (all of it at the first call)."""
        if not self.enabled:
            self.started = True
            return
        if not self.started:
            os.makedirs(self.output_dir, exist_ok=True)
            if self.set_aside_first:
                self.replaced = set_aside(self.output_dir)
            path = os.path.join(self.output_dir, LOG_FILE)
            write_new(path, "".join(json.dumps(record) + "\n" for record in history))
            self._file = open(path, "a")
            self.started = True
            return
        self._file.write(json.dumps(history[-1]) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
