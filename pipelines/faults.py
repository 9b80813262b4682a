"""Test-only fault injection: faults made to happen for real inside the Ray Train workers.

The runner forwards every ``GANPIPE_FAULT_*`` variable of its environment to the steps' Ray
tasks; Tune trials and Ray Train workers started from them inherit it. Never set them outside
tests.

* ``GANPIPE_FAULT_NAN_STEP=N``: each worker writes NaN into one generator weight right after
  training step N, at most ``GANPIPE_FAULT_NAN_TIMES`` times (default 1) per worker process.
* ``GANPIPE_FAULT_CRASH_STEP=N`` with ``GANPIPE_FAULT_CRASH_MARKER=PATH``: the first worker to
  finish step N, of any process on the machine, creates PATH and raises; every later one finds
  PATH and goes on. One crash, however many restarts follow.
"""

from __future__ import annotations

import os

import torch

from pipelines.loop import TrainingState

FAULT_ENV_PREFIX = "GANPIPE_FAULT_"
FAULT_NAN_STEP_ENV = "GANPIPE_FAULT_NAN_STEP"
FAULT_NAN_TIMES_ENV = "GANPIPE_FAULT_NAN_TIMES"
FAULT_CRASH_STEP_ENV = "GANPIPE_FAULT_CRASH_STEP"
FAULT_CRASH_MARKER_ENV = "GANPIPE_FAULT_CRASH_MARKER"


class InjectedCrash(RuntimeError):
    """The test-only crash of a training worker."""


def fault_variables() -> dict[str, str]:
    """The test-only fault-injection variables set in this process."""
    return {k: v for k, v in os.environ.items() if k.startswith(FAULT_ENV_PREFIX)}


class NanInjector:
    """The test-only fault: NaN in a generator weight after step ``GANPIPE_FAULT_NAN_STEP``."""

    def __init__(self) -> None:
        raw = os.environ.get(FAULT_NAN_STEP_ENV, "")
        self.step = int(raw) if raw else None
        self.remaining = int(os.environ.get(FAULT_NAN_TIMES_ENV, "1") or 1)

    def after_step(self, step: int, state: TrainingState) -> None:
        """``step`` is the 0-based index of the step just trained."""
        if self.step is None or step + 1 != self.step or self.remaining <= 0:
            return
        self.remaining -= 1
        with torch.no_grad():
            next(state.generator.parameters()).view(-1)[0] = float("nan")


class CrashInjector:
    """The test-only fault: one worker raises after step ``GANPIPE_FAULT_CRASH_STEP``."""

    def __init__(self) -> None:
        raw = os.environ.get(FAULT_CRASH_STEP_ENV, "")
        self.step = int(raw) if raw else None
        self.marker = os.environ.get(FAULT_CRASH_MARKER_ENV, "")
        if self.step is not None and not self.marker:
            raise ValueError(f"{FAULT_CRASH_STEP_ENV} needs {FAULT_CRASH_MARKER_ENV} (a file path)")

    def after_step(self, step: int) -> None:
        """``step`` is the 0-based index of the step just trained."""
        if self.step is None or step + 1 != self.step:
            return
        try:  # O_EXCL: of all the processes racing here, exactly one creates the marker
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        raise InjectedCrash(f"injected crash after step {self.step} ({FAULT_CRASH_STEP_ENV})")
