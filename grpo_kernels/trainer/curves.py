"""The reward curve, as a PNG (matplotlib) and as text for the terminal."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

# Why reward_png wrote nothing, in one line: matplotlib is optional (the `trainer` extra has it).
MATPLOTLIB_MISSING = 'matplotlib is not installed: pip install "grpo_kernels[trainer]" (or pip install matplotlib)'


def smooth(values: List[float], window: int = 5) -> List[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def text_curve(history: List[Dict], width: int = 60, height: int = 10, key: str = "reward") -> str:
    """A small ASCII plot of the smoothed metric against the step."""
    values = smooth([h[key] for h in history])
    if not values:
        return "(no steps)"
    lo, hi = min(0.0, min(values)), max(1.0, max(values))
    cols = [values[int(i * (len(values) - 1) / max(1, width - 1))] for i in range(min(width, len(values)))]
    rows = []
    for r in range(height, -1, -1):
        level = lo + (hi - lo) * r / height
        line = "".join("█" if v >= level else " " for v in cols)
        rows.append(f"{level:5.2f} |{line}")
    rows.append("      +" + "-" * len(cols))
    rows.append(f"       step 1 .. {history[-1]['step']}   ({key}, mean of the last 5 steps)")
    return "\n".join(rows)


def reward_png(history: List[Dict], path: str, title: Optional[str] = None) -> Optional[str]:
    """Plot the reward curve into the PNG `path` (written under another name and renamed, so an
    earlier plot is replaced whole or not at all); returns `path`, or None when matplotlib is
    not installed (MATPLOTLIB_MISSING says so)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h["reward"] for h in history], alpha=0.35, label="reward (per step)")
    ax.plot(steps, smooth([h["reward"] for h in history]), label="reward (mean of 5 steps)")
    if any("kl" in h for h in history):
        ax.plot(steps, [h.get("kl", 0.0) for h in history], label="KL to reference")
    ax.set(xlabel="optimizer step", ylabel="mean reward", title=title or "GRPO reward curve", ylim=(-0.02, 1.05))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path
