"""Graceful stops: one signal scope from the start of a run to the end of its export.

Cloud schedulers send SIGTERM some seconds before killing a job; a user presses Ctrl-C (SIGINT), closes the
terminal (SIGHUP) or sends SIGQUIT. :class:`StopRequest` handles all four the same way for the lifetime of a
``with`` block, and a block entered while another is active joins it, so the trainer has one scope from
``setup`` through ``finish`` whichever of them a caller enters first.

- Polled (the default): the first signal only records the request. The training loop polls
  :attr:`StopRequest.requested` after every optimiser update, so the update in flight finishes, a checkpoint is
  written, and the process exits with a message saying how to resume. Work that runs between two polls and takes
  long (validation, the final export) declares itself with :func:`busy`, so the message says what the stop waits
  for instead of promising the end of a step.
- Interrupting (:meth:`StopRequest.interrupting`): the first signal raises :class:`Stopped` at once, where nothing
  is lost by stopping (setup, before the first update; the final validation, which a resume repeats). Blocks that
  must not be cut in half (:meth:`StopRequest.uninterrupted`) take the stop at their end.
- A second signal of a kind already received exits at once with status 128 + the signal number. A signal of
  another kind is the same stop passed on (a launcher that got the terminal's Ctrl-C sends SIGTERM on top) and
  only said; so is, under torchrun, the first repeat (its agent passes each signal on as the same signal).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from os import environ
from types import FrameType

# What the process is busy with between two polls (innermost last): (what, what follows it).
_doing: list[tuple[str, str]] = []

STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name)
)
_SAVE_AND_STOP = "saving a checkpoint and stopping"


class Stopped(BaseException):
    """A stop that ends the block at once (raised by an interrupting :class:`StopRequest`).

    A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it.
    """

    def __init__(self, name: str, signum: int) -> None:
        super().__init__(name)
        self.name = name
        self.signum = signum


@contextlib.contextmanager
def busy(what: str, then: str = _SAVE_AND_STOP) -> Iterator[None]:
    """Declare that the block is ``what`` (e.g. "the validation at step 40 (2 x 28 denoising steps)"):
    a first signal arriving inside it says it waits for that to finish, then ``then``."""
    _doing.append((what, then))
    try:
        yield
    finally:
        _doing.pop()


def _say(text: str) -> None:
    """Write to stderr from a signal handler. A terminal that hung up (SIGHUP) fails every write with EIO: then
    stdout and stderr go to /dev/null, so that the stop's own output can never crash the save it asks for."""
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.close(devnull)


class StopRequest:
    """Handles SIGTERM, SIGINT, SIGHUP and SIGQUIT for the lifetime of a ``with`` block (see the module's text).

    ``with StopRequest() as stop`` inside another active one binds ``stop`` to the outer request: one scope per
    process, and its handlers are restored when the outermost block ends.
    """

    _active: "StopRequest | None" = None

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.requested: str | None = None  # the first signal's name
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._interrupt: tuple[str | None] | None = None  # (note,) while interrupting
        self._held = 0  # depth of uninterrupted blocks
        self._joined: StopRequest | None = None
        self._received: set[int] = set()
        # torchrun's agent (also under `accelerate launch` with several processes) passes a signal on to its workers
        # as the same signal: a worker that also received it from the terminal or the scheduler gets it twice.
        self._echoes = 1 if "TORCHELASTIC_RUN_ID" in environ else 0

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum in self._received:
            if not self._echoes:
                _say(f"\n{name} received again: exiting now without a checkpoint.\n")
                os._exit(128 + signum)
            self._echoes -= 1
        self._received.add(signum)
        if self.requested is not None:
            # Another kind of signal (or torchrun's echo) is the same stop passed on: Ctrl-C reaches `accelerate
            # launch` as well as this process, and the launcher sends SIGTERM on top. Taking it for a second request
            # would turn every Ctrl-C under a launcher into an exit without a checkpoint.
            _say(f"\n{name} received as well: the stop asked for by {self.requested} goes on "
                 f"(send {self.requested} again to exit at once).\n")
            return
        self.requested, self.signum = name, signum
        if self._interrupt is not None:
            note = self._interrupt[0]
            if note:
                _say(f"\n{name} received: {note}, then {_SAVE_AND_STOP} (send it again to exit at once).\n")
            if self._held:
                return  # raised at the end of the uninterrupted block
            raise Stopped(name, signum)
        what, then = _doing[-1] if _doing else ("", _SAVE_AND_STOP)
        doing = f"waiting for {what} to finish" if what else "finishing the current step"
        _say(f"\n{name} received: {doing}, then {then} (send it again to exit at once).\n")

    @contextlib.contextmanager
    def interrupting(self, note: str | None = None) -> Iterator[None]:
        """Inside the block the first signal raises :class:`Stopped` at once (as does a stop already requested
        on entry). ``note``: what the handler says it does ("ending the final validation early"); without it the
        handler says nothing and the code that catches :class:`Stopped` gives the one message."""
        if self.requested is not None:
            raise Stopped(self.requested, self.signum or 0)
        previous, self._interrupt = self._interrupt, (note,)
        try:
            yield
        finally:
            self._interrupt = previous

    @contextlib.contextmanager
    def uninterrupted(self) -> Iterator[None]:
        """A block that an interrupting stop never cuts in half: a signal inside it is recorded and, where the
        surrounding block interrupts, raised as :class:`Stopped` when the block has completed."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._interrupt is not None and self.requested is not None:
            raise Stopped(self.requested, self.signum or 0)

    def __enter__(self) -> "StopRequest":
        active = StopRequest._active
        if active is not None:
            self._joined = active
            return active
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals cannot be handled here
                pass
        if self._previous:
            StopRequest._active = self
        return self

    def __exit__(self, *exc: object) -> None:
        if self._joined is not None:
            self._joined = None
            return
        if StopRequest._active is self:
            StopRequest._active = None
        for s, prev in self._previous.items():
            signal.signal(s, prev)  # type: ignore[arg-type]
        self._previous.clear()


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """:meth:`StopRequest.uninterrupted` of the active scope (nothing without one)."""
    active = StopRequest._active
    with active.uninterrupted() if active is not None else contextlib.nullcontext():
        yield
