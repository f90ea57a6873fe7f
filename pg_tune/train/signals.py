"""Stopping cleanly: SIGTERM/SIGINT finish the current step, checkpoint, and exit non-zero.

Clusters pre-empt jobs with SIGTERM (SLURM, Kubernetes) and expect the process to exit soon; an
exit status of 128 + signal number tells the scheduler the job did not finish, so it can be
requeued and resumed with ``--resume auto``. A second Ctrl-C stops at once (Python's default).

Fault injection for the resume tests: ``PG_TUNE_FAULT_KILL_AFTER_CHECKPOINT=N`` makes the process
SIGKILL itself right after the checkpoint of step N is on disk — a crash with no clean-up at all.
It is a checkpoint callback the train command installs only when the variable is set; the loop
itself knows nothing of it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

KILL_AFTER_CHECKPOINT_ENV = "PG_TUNE_FAULT_KILL_AFTER_CHECKPOINT"


class TrainingStopped(RuntimeError):
    """Training ended early on purpose; ``exit_code`` is what the CLI returns."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum = signum
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint written"
        super().__init__(
            f"stopped by {name} after step {step}; {where}. Resume with: pg-tune train RECIPE --resume auto"
        )


class NonFiniteError(TrainingStopped, FloatingPointError):
    """A non-finite loss or gradient norm under ``train.on_nonfinite=stop``."""


class StopSignals:
    """Context manager: records SIGTERM/SIGINT instead of dying mid-step."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        # A second signal falls through to the previous behaviour (KeyboardInterrupt / termination).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        print(
            f"\npg-tune: received {signal.Signals(signum).name}: finishing this step, then checkpointing",
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def kill_after_checkpoint_callback() -> Callable[..., None] | None:
    """The crash of the resume tests, as a checkpoint callback: SIGKILL ourselves once step N's
    checkpoint is written. None unless ``PG_TUNE_FAULT_KILL_AFTER_CHECKPOINT`` is set."""
    target = os.environ.get(KILL_AFTER_CHECKPOINT_ENV)
    if target is None:
        return None

    def kill(step: int, *_: object) -> None:
        if int(target) == step:
            print(f"pg-tune: {KILL_AFTER_CHECKPOINT_ENV}={step}: SIGKILL now", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill
