"""The output folder: what the trainer writes there, the checks before a run touches it, and its lock.

A run owns its ``output_dir``: it deletes leftovers of interrupted saves there, rotates checkpoints and
overwrites the exported LoRA and the model card. So before anything is written the trainer refuses a
folder that is not a run's:

- an empty path, the working folder, the home folder or a folder above either of them;
- a path that cannot become a writable folder (a regular file in the way, a read-only filesystem,
  no permission);
- a layout that mixes the run with its data (:func:`check_layout`);
- a folder holding anything the trainer does not write (:data:`TRAINER_FILES`, :data:`TRAINER_FOLDERS`,
  ``checkpoint-<step>`` folders and their ``.tmp``/``.old`` forms, ``.tmp*`` files of killed writes, the cache
  and synthetic set the config puts there (:func:`configured_entries`); ``README.md`` only if it is this
  trainer's model card, ``config.yaml`` only if it is a config of this trainer's schema).

and it holds an exclusive lock on the folder for the whole run (:func:`lock_output_dir`): a ``flock`` on
``<output_dir>/.kontext-lora.lock``, which the kernel releases when the process ends however it ends
(``kill -9`` included), so a lock is never stale. Only the main process of a launch takes it: the ranks
of one ``accelerate launch`` share the folder by design and must not refuse each other. Within one
process the lock is re-entrant (a notebook may call ``setup`` again after a failed run).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from data.errors import TEMP_PREFIX, first_names
from kontext.errors import UserError
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.training.checkpoint import CHECKPOINT_RE, list_checkpoints, read_trainer_state
from kontext.training.config import Config, config_to_dict
from kontext.training.resume import resolve_resume

logger = logging.getLogger(__name__)

LOCK_NAME = ".kontext-lora.lock"
MODEL_CARD_NAME = "README.md"
CONFIG_NAME = "config.yaml"
# Every file and folder the trainer (or accelerate's trackers, under logs/) writes at the top level.
TRAINER_FILES = frozenset(
    {
        CONFIG_NAME,
        LORA_WEIGHTS_NAME,
        "lora_comfyui.safetensors",
        MODEL_CARD_NAME,
        "training_history.json",
        LOCK_NAME,
    }
)
TRAINER_FOLDERS = frozenset({"logs", "validation"})
# What a file browser leaves behind; never a user's data.
IGNORED = frozenset({".DS_Store", "Thumbs.db", ".ipynb_checkpoints"})
_MODEL_CARD_TAG = "kontext-lora"


class OutputDirError(UserError, ValueError):
    """The output folder cannot be used for this run; the message says why and what to do."""


class OutputDirLocked(OutputDirError):
    """Another process holds the output folder's lock."""


def check_location(output_dir: str, cwd: Path | None = None, home: Path | None = None) -> Path:
    """The absolute output folder, or :class:`OutputDirError` if a run must not write there.

    Writes nothing. Refuses an empty path, the working folder, the home folder and any folder above
    them (a run deletes and overwrites files in its folder), a path that is or runs through a regular
    file, and a folder that cannot be created or written (read-only filesystem, no permission).
    """
    if not str(output_dir).strip():
        raise OutputDirError("`output_dir` is empty; name a new folder for this run (e.g. output_dir=outputs/my_product).")
    path = Path(output_dir).expanduser().resolve()
    cwd = (cwd or Path.cwd()).resolve()
    home = (home or Path.home()).expanduser().resolve()
    protected = {"the working folder": cwd, "the home folder": home}
    what = next((name for name, p in protected.items() if path == p), None)
    what = what or next((f"a folder above {name} ({p})" for name, p in protected.items() if path in p.parents), None)
    if what:
        raise OutputDirError(
            f"output_dir {path} is {what}; a run deletes and overwrites files in its output folder. "
            "Name a folder of its own, e.g. output_dir=outputs/my_product."
        )
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"runs through the file {existing}"
        raise OutputDirError(f"output_dir {path} {where}, not a folder; choose another output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        why = "a read-only filesystem" if _read_only(existing) else "no write permission"
        what = "it" if existing == path else f"its parent {existing}"
        raise OutputDirError(
            f"output_dir {path} is not writable ({why} on {what}); choose a folder this user can write to."
        )
    return path


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def foreign_entries(output_dir: Path, own: frozenset[str] = frozenset()) -> list[str]:
    """Names at the top of ``output_dir`` that the trainer did not write (sorted; [] for a missing folder).

    ``own``: further top-level folders the run's config puts there (:func:`configured_entries`).
    """
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        name = p.name
        if name in IGNORED or (CHECKPOINT_RE.match(name) and p.is_dir()) or (name in TRAINER_FOLDERS and p.is_dir()):
            continue
        if name.startswith(TEMP_PREFIX) and p.is_file():
            continue  # a temporary file of an interrupted write (ours or safetensors'); removed when a run starts
        if any(name == o or name == f".{o}.lock" or name.startswith(f".{o}.tmp-") for o in own):
            continue  # the cache or synthetic set the config puts here, with the lock and temporary folder of its build
        if name in TRAINER_FILES and p.is_file() and _is_ours(p):
            continue
        if p.is_dir() and _is_evaluation_report(p):
            continue  # `python -m kontext.tools.evaluate --out OUTPUT_DIR/<name>`, as the run's summary once advised
        found.append(name + ("/" if p.is_dir() else ""))
    return sorted(found)


def _is_evaluation_report(folder: Path) -> bool:
    """True for a folder written by ``kontext.tools.evaluate`` (its ``report.md`` and ``metrics.json``)."""
    try:
        head = (folder / "report.md").read_text(encoding="utf-8", errors="replace")[:64]
    except OSError:
        return False
    return head.startswith("# Evaluation report") and (folder / "metrics.json").is_file()


def _is_ours(path: Path) -> bool:
    """A ``README.md`` is ours if it is the model card; a ``config.yaml`` if it has this trainer's sections."""
    if path.name == MODEL_CARD_NAME:
        try:
            head = path.read_text(encoding="utf-8", errors="replace")[:4096]
        except OSError:
            return False
        return head.startswith("---") and _MODEL_CARD_TAG in head
    if path.name == CONFIG_NAME:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            return False
        return isinstance(data, dict) and "output_dir" in data and set(data) <= set(config_to_dict(Config()))
    return True


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _top_entry(path: Path, folder: Path) -> str | None:
    """The name of ``folder``'s entry that holds ``path``, when ``path`` lies strictly inside ``folder``."""
    return path.relative_to(folder).parts[0] if folder in path.parents else None


def configured_entries(cfg: Any, output_dir: Path) -> frozenset[str]:
    """The top-level folders of ``output_dir`` that the run's config itself puts there: the latent cache
    (``data.cache_dir``) and a synthetic ``data.root`` (with the ``<root>_heldout`` folder the run's summary tells
    the user to make beside it)."""
    own = set()
    data_cfg = cfg.data
    cache_dir = data_cfg.cache_dir
    if data_cfg.cache_latents and cache_dir and (name := _top_entry(Path(cache_dir).expanduser().resolve(), output_dir)):
        own.add(name)
    if data_cfg.source == "folder" and data_cfg.synthetic.enabled:
        root = Path(str(data_cfg.root)).expanduser().resolve()
        for folder in (root, root.with_name(root.name + "_heldout")):
            if name := _top_entry(folder, output_dir):
                own.add(name)
    return frozenset(own)


def check_layout(cfg: Any, output_dir: Path) -> None:
    """Refuse a layout that mixes the run's folder with its data: ``output_dir`` inside the dataset (``data.root``,
    ``validation.data_root``); the user's own dataset inside ``output_dir``; ``data.cache_dir`` equal to it."""
    data_cfg = cfg.data
    datasets = [("data.root", data_cfg.root)] if data_cfg.source == "folder" else []
    if cfg.validation.data_root and data_cfg.source == "folder":
        datasets.append(("validation.data_root", cfg.validation.data_root))
    for key, root in datasets:
        root = Path(str(root)).expanduser().resolve()
        if _inside(output_dir, root):
            raise OutputDirError(
                f"output_dir {output_dir} is inside the dataset folder {key} = {root}; the run's files would mix with "
                "the samples. Choose an output_dir outside it (e.g. beside it)."
            )
        if _inside(root, output_dir) and not (key == "data.root" and data_cfg.synthetic.enabled):
            raise OutputDirError(
                f"{key} = {root} is inside output_dir {output_dir}; a run deletes and overwrites files in its output "
                "folder. Keep the dataset outside it (e.g. beside it)."
            )
    if data_cfg.cache_latents and data_cfg.cache_dir and Path(data_cfg.cache_dir).expanduser().resolve() == output_dir:
        raise OutputDirError(
            f"data.cache_dir is output_dir {output_dir} itself; the cache's samples/ and prompts/ would mix with the "
            "run's files. Set data.cache_dir to a folder of its own (inside output_dir is fine, e.g. "
            f"{output_dir / 'latent_cache'}), or leave it unset for the shared cache."
        )


def check_contents(output_dir: Path, own: frozenset[str] = frozenset()) -> None:
    """Refuse a folder that holds anything the trainer did not write (its files would be overwritten or mixed)."""
    foreign = foreign_entries(output_dir, own)
    if foreign:
        shown = first_names(foreign, 5)
        raise OutputDirError(
            f"output_dir {output_dir} holds files this trainer did not write: {shown}. A run deletes and "
            "overwrites files in its output folder; choose an empty or new folder (a run writes config.yaml, "
            "checkpoint-*/, logs/, validation/, the LoRA .safetensors, README.md and training_history.json)."
        )


def finished_step(output_dir: Path) -> int | None:
    """The last step of the finished run in ``output_dir`` (from ``training_history.json``), if it says."""
    try:
        history = json.loads((output_dir / "training_history.json").read_text(encoding="utf-8"))
        return int(history[-1]["step"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def open_output_dir(cfg: Any, main: bool) -> tuple[Path, Path | None]:
    """All checks on ``cfg.output_dir`` before a run writes anything: returns (folder, checkpoint to resume).

    In order: the location (:func:`check_location`); its contents (:func:`check_contents`); the lock, if
    the folder exists (a live run there is refused before any of its checkpoints is read); the checkpoint
    to resume, verified (``kontext.training.resume.resolve_resume``); then what a run may do to what is there:

    - a fresh run (no ``resume_from``) is refused over a finished run or another run's checkpoints,
      unless ``checkpoint.overwrite_output_dir``;
    - a resume of a finished run (``pytorch_lora_weights.safetensors`` present) must continue it: it is
      refused when no intact checkpoint exists (it would train again from scratch over the finished
      LoRA) or when ``train.max_steps`` does not exceed the finished step (it would train nothing and
      only rewrite the outputs).

    Raises :class:`OutputDirError` or ``kontext.training.checkpoint.CheckpointError``; writes nothing but the lock.
    """
    path = check_location(cfg.output_dir)
    check_layout(cfg, path)
    check_contents(path, configured_entries(cfg, path))  # before the lock: a folder not a run's gets no lock file
    lock_output_dir(path, main=main, create=False)
    ckpt_cfg = cfg.checkpoint
    resume = resolve_resume(path, ckpt_cfg.resume_from, warn=logger.warning if main else (lambda _msg: None))
    finished = (path / LORA_WEIGHTS_NAME).is_file()
    if not ckpt_cfg.resume_from and not ckpt_cfg.overwrite_output_dir:
        fix = _ways_on("Continue it with checkpoint.resume_from=latest (and a larger train.max_steps if it finished)")
        if finished:
            raise OutputDirError(f"output_dir {path} already holds a finished run ({LORA_WEIGHTS_NAME}). {fix}")
        ckpts = list_checkpoints(path)
        if ckpts:
            raise OutputDirError(f"output_dir {path} already holds checkpoints of another run ({ckpts[-1].name}). {fix}")
    if ckpt_cfg.resume_from and finished and not ckpt_cfg.overwrite_output_dir:
        if resume is None:
            raise OutputDirError(
                f"output_dir {path} holds a finished run ({LORA_WEIGHTS_NAME}) and no checkpoint to continue it from "
                "(checkpoint.every_steps was 0, or its checkpoints are gone); resuming would train again from "
                "scratch over it. Choose a new output_dir, or set checkpoint.overwrite_output_dir=true to replace it."
            )
        done = finished_step(path)
        done = int(read_trainer_state(resume)["step"]) if done is None else done
        if cfg.train.max_steps <= done:
            comfyui = path / "lora_comfyui.safetensors"
            missing = (
                f" Its ComfyUI file is missing (the run stopped while writing it); write it with: "
                f"python -m kontext.tools.comfyui {path / LORA_WEIGHTS_NAME}"
                if cfg.export.comfyui and not comfyui.is_file() else ""
            )
            raise OutputDirError(
                f"output_dir {path} holds a run that finished at step {done}; resuming it with train.max_steps="
                f"{cfg.train.max_steps} would train nothing and only rewrite its outputs.{missing} "
                + _ways_on(f"Train it longer with a train.max_steps above {done} (e.g. train.max_steps={2 * done})")
            )
    return path, resume


def _ways_on(longer: str) -> str:
    """The three ways on from a folder that holds a run: ``longer`` (how to continue it), a new folder, or
    replacing it; every refusal over a run that can be continued ends with all three."""
    return (
        f"{longer}; or choose a new output_dir; or set checkpoint.overwrite_output_dir=true to replace it (its "
        "checkpoints are then deleted when training starts)."
    )


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

_held: dict[Path, int] = {}  # this process's locks: output folder -> open lock-file descriptor


def lock_output_dir(output_dir: Path, *, main: bool, create: bool) -> bool:
    """Take the exclusive lock on ``output_dir`` for this process; True if it is held (now or already).

    ``main``: only the main process of a launch locks (other ranks return False at once). ``create``:
    make the folder if it does not exist yet; without it a missing folder is left alone (False), so a
    run refused later for bad input leaves no empty folder behind. Raises :class:`OutputDirLocked`
    naming the folder (and the holder's pid) if another process holds it, :class:`OutputDirError` if the
    folder or the lock file cannot be written. Without ``fcntl`` (Windows) no lock is taken.
    (``data.locking.exclusive_lock`` does not fit here: it waits for the holder, and a second run must be
    refused at once, not start when the first ends.)
    """
    output_dir = Path(output_dir).resolve()
    if not main:
        return False
    if output_dir in _held:
        return True
    try:
        import fcntl
    except ImportError:
        return False
    try:
        if not output_dir.is_dir():
            if not create:
                return False
            output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / LOCK_NAME
        for _ in range(10):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                    raise
                raise OutputDirLocked(
                    f"output_dir {output_dir} is in use by another training run{holder}; a second run there "
                    "would overwrite its files. Wait until it ends, or choose another output_dir."
                ) from None
            # The holder removes the file when it releases it; if it did so between our open and our lock,
            # we hold a lock on a deleted file: open the current one again.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise OutputDirLocked(f"output_dir {output_dir}: could not take its lock {path}; try again.")
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    except OutputDirError:
        raise
    except OSError as e:
        raise OutputDirError(f"output_dir {output_dir} is not writable ({e.strerror or e}); choose another output_dir.") from None
    _held[output_dir] = fd
    return True


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return f" ({text})" if text else ""


def unlock_output_dir(output_dir: Path) -> None:
    """Release this process's lock on ``output_dir`` (and remove the lock file); nothing if not held."""
    output_dir = Path(output_dir).resolve()
    fd = _held.pop(output_dir, None)
    if fd is None:
        return
    try:
        os.unlink(output_dir / LOCK_NAME)  # before unlocking: a process waiting on it re-checks the file
    except OSError:
        pass
    os.close(fd)


def unlock_all() -> None:
    """Release every output-folder lock this process holds."""
    for output_dir in list(_held):
        unlock_output_dir(output_dir)
