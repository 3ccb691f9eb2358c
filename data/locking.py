"""Building a shared folder once and atomically: a cross-process lock, and a build into a temporary folder that is
renamed into place (concurrent writers such as two accelerate ranks)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock_path`` (blocking); a second process waits until it is released.

    Without ``fcntl`` (Windows) no lock is taken; callers still write into a temp folder and rename it
    into place, so a concurrent reader never sees a torn folder.
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Build ``final`` in a fresh temporary sibling folder (yielded), renamed into place when the block succeeds.

    An existing ``final`` is replaced only then; if the block raises, the temporary folder is removed and
    ``final`` is left as it was. Hold :func:`exclusive_lock` around it when several processes may build.
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
