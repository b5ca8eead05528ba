"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM without losing it.

While `GRPOTrainer.train` runs in the main thread, the first SIGINT or SIGTERM does not stop the
process: it asks the loop to stop after the step in progress, which then writes a checkpoint
(the state at the end of a step, so a resumed run continues bit for bit) and raises
`TrainingInterrupted`. The same signal a second time stops at once, as it would have without
the trainer (a KeyboardInterrupt for SIGINT), without a checkpoint; a repeat within
REPEAT_GRACE_S of the first counts as the same request (Ctrl-C under torchrun reaches each
worker twice: from the terminal and forwarded by torchrun). The process's earlier handlers are
back in place when `train` returns or raises.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REPEAT_GRACE_S = 1.0


class TrainingInterrupted(KeyboardInterrupt):
    """`GRPOTrainer.train` stopped on SIGINT or SIGTERM after writing a checkpoint.

    signum: the signal; step: the last completed step; checkpoint: the checkpoint directory
    holding it (None when no step had completed, so nothing was written). A KeyboardInterrupt,
    so code that handles Ctrl-C keeps doing so. Command-line programs conventionally exit with
    status 128 + signum (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int, step: int, checkpoint: Optional[str]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = (f"checkpoint {checkpoint}; train(dataset, resume=True) continues from it" if checkpoint
                 else "nothing was written")
        super().__init__(f"{signal_name(signum)} stopped training at step {step}: {where}")


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class SignalStop:
    """A context manager: while it is active, SIGINT and SIGTERM set `signum` (the first one)
    instead of stopping the process. Installs nothing outside the main thread (Python delivers
    signals there only), or for a signal the process ignores. `announce`: print one line on the
    first signal (from the handler, so it shows while a long step finishes)."""

    def __init__(self, announce: bool = True):
        self.signum: Optional[int] = None
        self.announce = announce
        self._first = 0.0
        self._previous = {}

    def __enter__(self) -> "SignalStop":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN or previous is None:
                    continue
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def request(self, signum: int) -> None:
        """Stop as if `signum` had arrived (another rank's signal), without a message."""
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first = signum, time.monotonic()
            if self.announce:
                name = signal_name(signum)
                # os.write: a print() here could re-enter a write to stderr in progress.
                os.write(2, f"\ngrpo_kernels: {name} received: stopping after the current step and writing a "
                            f"checkpoint ({name} again stops at once, without one)\n".encode())
            return
        if signum != self.signum or time.monotonic() - self._first < REPEAT_GRACE_S:
            return  # another signal (torchrun's SIGTERM after the terminal's SIGINT), or the same one forwarded
        self._restore()
        signal.raise_signal(signum)  # the process's own handling: KeyboardInterrupt, or the default action
