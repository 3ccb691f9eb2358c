"""Graceful pre-emption: the first SIGTERM/SIGINT asks the loop to checkpoint and stop; a second exits at once.

Cloud schedulers send SIGTERM some seconds before killing a job. The training loop polls
:attr:`StopRequest.requested` after every optimiser update, so the update in flight finishes, a
checkpoint is written, and the process exits with a message saying how to resume. Work that the loop
runs between two polls and that takes long (validation) declares itself with :func:`busy`, so the
message says what the stop waits for instead of promising the end of a step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from types import FrameType

_doing: list[str] = []  # what the process is busy with between two polls (innermost last)


@contextlib.contextmanager
def busy(what: str) -> Iterator[None]:
    """Declare that the block is ``what`` (e.g. "the validation at step 40 (2 x 28 denoising steps)"):
    a first signal arriving inside it says it waits for that to finish."""
    _doing.append(what)
    try:
        yield
    finally:
        _doing.pop()


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
        doing = f"waiting for {_doing[-1]} to finish" if _doing else "finishing the current step"
        sys.stderr.write(
            f"\n{name} received: {doing}, then saving a checkpoint and stopping "
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
