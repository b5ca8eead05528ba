"""Crash-safe checkpoint files: a payload dict written and read back (trainer_state.py: the trainer's).

A checkpoint is written to a temporary directory, flushed to disk, and renamed into place, so
a process killed mid-write (even by SIGKILL) never leaves a half checkpoint under a final name.
Each checkpoint records the SHA-256 of its state file; loading walks the checkpoints from the
newest down and skips, with a message, any that is truncated or corrupt, so a damaged
checkpoint is never loaded. `latest` names the newest complete one, for people and scripts.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from typing import Dict, List, Optional, Tuple

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str) -> None:
    """Flush a file or directory to disk, so a rename never publishes data still in flight."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(output_dir: str, step: int) -> str:
    """The directory of the checkpoint of `step`."""
    return os.path.join(output_dir, f"checkpoint-{step}")


def save(output_dir: str, step: int, payload: Dict) -> str:
    """Write checkpoint-<step>/ atomically (state.pt and its checksum) and point `latest` at it."""
    os.makedirs(output_dir, exist_ok=True)
    final = checkpoint_dir(output_dir, step)
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    state_path = os.path.join(tmp, STATE_FILE)
    torch.save(payload, state_path)
    fsync_path(state_path)
    meta = {"step": step, "sha256": _sha256(state_path), "bytes": os.path.getsize(state_path)}
    with open(os.path.join(tmp, META_FILE), "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = os.path.join(output_dir, "latest.tmp")
    with open(pointer, "w") as f:
        f.write(os.path.basename(final))
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, os.path.join(output_dir, "latest"))
    fsync_path(output_dir)
    return final


def checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """(step, path) of every finished checkpoint directory, newest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name))
             for name in os.listdir(output_dir) if (m := _CHECKPOINT_DIR.match(name))]
    return sorted(found, reverse=True)


def verify(path: str) -> Optional[str]:
    """None when checkpoint `path` is complete and intact, else why it is not."""
    state_path, meta_path = os.path.join(path, STATE_FILE), os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        return f"{META_FILE} is missing"
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        return f"{META_FILE} is unreadable ({exc})"
    if not os.path.exists(state_path):
        return f"{STATE_FILE} is missing"
    size = os.path.getsize(state_path)
    if size != meta.get("bytes"):
        return f"{STATE_FILE} has {size} bytes, {meta.get('bytes')} were written (truncated)"
    if _sha256(state_path) != meta.get("sha256"):
        return f"{STATE_FILE} does not match its SHA-256 (corrupt)"
    return None


def load_latest(output_dir: str) -> Optional[Dict]:
    """The newest intact checkpoint's payload; damaged ones are reported on stderr and skipped."""
    for _, path in checkpoints(output_dir):
        problem = verify(path)
        if problem is None:
            try:
                return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped like a corrupt one
                problem = f"{STATE_FILE} cannot be loaded ({type(exc).__name__}: {exc})"
        print(f"grpo_kernels: skipping checkpoint {path}: {problem}", file=sys.stderr)
    return None
