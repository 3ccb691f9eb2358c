"""Graceful pre-emption: the first SIGTERM/SIGINT asks the loop to checkpoint and stop; a second exits at once.

Cloud schedulers send SIGTERM some seconds before killing a job. The training loop polls
:attr:`StopRequest.requested` after every optimiser update, so the update in flight finishes, a
checkpoint is written, and the process exits with a message saying how to resume.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


class StopRequest:
    """Installs handlers for SIGTERM and SIGINT for the lifetime of a ``with`` block."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = signals
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            sys.stderr.write(f"\n{name} received again: exiting now without a checkpoint.\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = name
        sys.stderr.write(
            f"\n{name} received: finishing the current step, then saving a checkpoint and stopping "
            "(send it again to exit at once).\n"
        )
        sys.stderr.flush()

    def __enter__(self) -> "StopRequest":
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()
