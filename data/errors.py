"""The exception types for problems with a user's files: a dataset that cannot be used, a file that cannot be written.

Every check in ``data`` that finds something wrong with the user's files raises
:class:`DatasetError`, carrying *all* problems found so that one run lists everything to fix.

Every file the project writes (safetensors, torch, YAML, JSON, images) is written inside :func:`writing`, the one
write guard: whatever the library raises for a failed write (``OSError``; safetensors' ``SafetensorError``, which
is not an ``OSError``; torch's ``RuntimeError``) becomes a :class:`WriteError` naming the file and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from kontext.errors import UserError


class DatasetError(UserError, ValueError):
    """A dataset cannot be used as it is.

    ``DatasetError(where, problems)``: ``where`` names the dataset (``source.describe()``), ``problems``
    holds one line per problem, each naming the file (or row and column) and the fix. ``str(err)`` lists
    them all under a one-line summary naming the dataset.
    """

    def __init__(self, where: str, problems: Sequence[str]) -> None:
        if isinstance(problems, str):
            raise TypeError("DatasetError problems must be a list of lines, not one string")
        self.where = where
        self.problems = list(problems)
        n = len(self.problems)
        head = f"Dataset {where} has {n} problem{'s' if n != 1 else ''}:"
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))

    def __reduce__(self) -> tuple[type, tuple[str, list[str]]]:
        # BaseException pickles as cls(*args) with args = (message,); rebuild from the fields instead.
        return (type(self), (self.where, self.problems))


def first_names(names: Sequence[str], limit: int) -> str:
    """The first ``limit`` of ``names`` joined with ", ", then `` and K more`` for the rest: a list in a message."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


class WriteError(UserError, OSError):
    """A file could not be written. ``str(err)`` names the file, what the library said and the fix; ``errno`` is the
    operating system's code where one was given (``ENOSPC`` for a full disk)."""


# What torch's zip writer and safetensors say when the operating system refused a write (they keep only the text).
_WRITE_FAILURE_TEXT = ("no space left", "disk quota exceeded", "iostream error", "file write failed",
                       "pytorchstreamwriter", "i/o error", "os error", "permission denied", "read-only file system")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` (or what caused it) says the disk or quota is full.

    Python raises ``OSError(ENOSPC)``; torch's zip writer and safetensors raise errors whose text is all that is
    left of it ("file write failed", "iostream error", "No space left on device").
    """
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return True
        text = str(e).lower()
        if any(s in text for s in ("no space left", "disk quota exceeded", "iostream error", "file write failed")):
            return True
    return False


def is_write_error(exc: BaseException) -> bool:
    """True if ``exc`` is what a library raises when a file cannot be written: any ``OSError``, any safetensors
    ``SafetensorError``, and the ``RuntimeError`` of torch's writer (recognised by its text, so that a programming
    error raised as a RuntimeError is never taken for a full disk)."""
    if isinstance(exc, (OSError, SafetensorError)):
        return True
    if isinstance(exc, RuntimeError):
        return any(s in str(e).lower() for e in _chain(exc) for s in _WRITE_FAILURE_TEXT)
    return False


def _os_errno(exc: BaseException) -> int | None:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
    return errno.ENOSPC if is_disk_full(exc) else None


def write_fix(exc: BaseException) -> str:
    """What the user can do about the write error ``exc``."""
    code = _os_errno(exc)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return "Free some space on that disk (or raise the quota) and run the command again."
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Make that folder writable (it is read-only or not yours), or choose another one."
    if code == errno.EISDIR:
        return "That path is a folder; name a file, or remove the folder."
    if code in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST):  # EEXIST: mkdir met a file where a folder goes
        return "A folder on that path is missing or is a file; fix the path."
    return "Check that the folder exists, can be written and has free space, then run the command again."


def reason_of(exc: BaseException) -> str:
    """The first line of what the library said (at most 200 characters)."""
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__
    return text.splitlines()[0][:200]


def remove_partial(paths: Iterable[Path]) -> None:
    """Delete half-written files or folders (they would look like results)."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)


@contextmanager
def writing(path: str | Path, what: str = "", fix: str = "", partial: Iterable[str | Path] = ()) -> Iterator[None]:
    """The one write guard: a write error raised inside (:func:`is_write_error`) becomes a :class:`WriteError`.

    ``path``: the file (or folder) written; ``what``: a few words for it, before the path; ``fix``: what to
    do, when more is known than :func:`write_fix` can tell from the error; ``partial``: what to delete when the
    write failed (a half-written file must not look finished). Nothing else is deleted: the target of an atomic
    rename still holds its previous, intact version.
    """
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        if not is_write_error(e):
            raise
        path = Path(path)
        remove_partial(Path(p) for p in partial)
        err = WriteError(f"cannot write {what + ' ' if what else ''}{path}: {reason_of(e)}. {fix or write_fix(e)}")
        err.errno = _os_errno(e)
        raise err from e


# Temporary files of atomic writes begin with this (safetensors' own are ``.tmpXXXXXX``): a leftover of a write that
# a kill interrupted is recognised as such and removed, never taken for someone else's file.
TEMP_PREFIX = ".tmp"


def write_text_atomic(path: str | Path, text: str, what: str = "") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same folder and a rename, inside
    :func:`writing`: a failed or interrupted write leaves the previous version of ``path`` whole."""
    path = Path(path)
    tmp = path.with_name(f"{TEMP_PREFIX}-{os.getpid()}-{path.name}")
    with writing(path, what, partial=[tmp]):
        with open(tmp, "w", encoding="utf-8") as f:  # an ordinary open: the umask's mode, as for any file
            f.write(text)
        os.replace(tmp, path)
    return path


def file_in_the_way(folder: str | Path) -> str | None:
    """Why ``folder`` cannot be a folder ("is a file", "runs through the file X"), or None when it is one or can
    be created."""
    folder = Path(folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir():
        return None
    return "is a file" if existing == folder else f"runs through the file {existing}"
