"""How the training script was launched, and what it does about it: CPU threads, the process group on a
CPU-only machine, log levels, and the one-message error a user sees.

``train_kontext_lora.py`` runs as ``python train_kontext_lora.py`` (one process) or under ``accelerate
launch`` (one or many); these functions are the differences between the two.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
import time
from typing import Any

import torch

# The loggers of this project's packages; libraries (diffusers, transformers, ...) stay at WARNING.
OWN_LOGGERS = ("kontext_lora", "kontext", "data", "losses")
# When the run started (set by :func:`setup_logging`, the first thing setup does): the summary's wall time.
RUN_CLOCK: dict[str, float] = {}


def launched_by_accelerate(environ: Any = None) -> bool:
    """True under ``accelerate launch`` (or torchrun), which choose the processes' CPU threads themselves."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or any(k.startswith("ACCELERATE_") for k in env)


def is_main_launch_process() -> bool:
    """True on the process that owns the output folder: rank 0 of a launch, or a plain single process.

    Read from the launcher's ``RANK`` so the lock can be taken before ``Accelerator()`` exists.
    """
    return os.environ.get("RANK", "0").strip() in ("", "0")


def stderr_is_relayed_by_accelerate(environ: Any = None) -> bool:
    """True when this process's stderr is the pipe through which ``accelerate launch`` relays it.

    accelerate's single-process launcher (no ``LOCAL_RANK``: torchrun starts the multi-process runs and
    leaves stderr alone) reads the script's stderr through a pipe and writes it through as it comes; on a
    non-zero exit it then raises ``CalledProcessError`` from a ``RuntimeError`` that holds the last 512 KiB
    of it, so every message, warning and progress bar of a failed run is printed a second time after the
    script ends, under a ``RuntimeError:`` line that reads like the cause.
    """
    env = os.environ if environ is None else environ
    if not launched_by_accelerate(env) or "LOCAL_RANK" in env:
        return False
    try:
        return stat.S_ISFIFO(os.fstat(2).st_mode)
    except OSError:
        return False


def stderr_to_stdout_under_accelerate() -> bool:
    """Under :func:`stderr_is_relayed_by_accelerate`, write this process's stderr to its stdout (the same
    terminal): everything the script prints then appears once, and accelerate's traceback after a failure holds
    only its own lines. Returns whether it did. The script's entry point calls this; imports never do."""
    if not stderr_is_relayed_by_accelerate():
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(sys.stdout.fileno(), 2)
    # Both streams now share one file: flush stdout per line so that its lines keep their place among stderr's.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    return True


def _launcher_process(pid: int | None = None) -> tuple[list[str], dict[str, str]] | None:
    """The command line and environment of the process that started this one (``/proc``), or None if unreadable."""
    pid = os.getppid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        with open(f"/proc/{pid}/environ", "rb") as f:
            pairs = [e.decode(errors="replace").partition("=") for e in f.read().split(b"\0") if e]
    except OSError:
        return None
    return argv, {k: v for k, _, v in pairs}


def launcher_chose_threads(launcher: tuple[list[str], dict[str, str]] | None) -> bool:
    """Whether the thread count a launcher (``accelerate launch``, torchrun) put in ``OMP_NUM_THREADS`` was chosen:
    by the user (``--num_cpu_threads_per_process``, or ``OMP_NUM_THREADS`` in the launcher's own environment), or
    by the launcher with a look at the machine (``accelerate launch --cpu``). False when the launcher filled in its
    default of one thread: ``accelerate launch script.py`` without ``--cpu`` on a machine without a GPU, and torchrun,
    run every process on one core. An unreadable launcher counts as a choice (it is left alone)."""
    if launcher is None:
        return True
    argv, env = launcher
    if env.get("OMP_NUM_THREADS", "").strip():
        return True
    return any(a.startswith(("--num_cpu_threads_per_process", "--cpu")) for a in argv)


def cpu_threads_for_run(environ: Any = None, launcher: Any = "parent") -> int | None:
    """The intra-op thread count to set for this run on the CPU, or None to leave the one it has.

    None when the thread count was chosen: the user's ``OMP_NUM_THREADS`` in a plain ``python`` run, or a launcher's
    considered choice (:func:`launcher_chose_threads`; ``launcher`` is its ``(argv, environ)``, by default read from
    the parent process). Otherwise (a plain run, or a launcher's default of one thread) the physical cores this process
    may use, shared by the processes of this machine (``LOCAL_WORLD_SIZE``), less the cores other work keeps busy
    (:func:`busy_cores`): OpenMP threads that wait for a core held by another process spin, and on a busy
    2-core box two threads ran a step tens of times slower than one. Runs on an accelerator are left alone.
    """
    env = os.environ if environ is None else environ
    if launched_by_accelerate(env):
        if launcher_chose_threads(_launcher_process() if launcher == "parent" else launcher):
            return None
    elif env.get("OMP_NUM_THREADS", "").strip():
        return None
    if torch.accelerator.is_available():
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    local = max(1, int(env.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = max(1, min(usable, physical) // local)
    if cores == 1:
        return 1  # nothing to choose: no need to sample the machine's load
    return max(1, min(cores, (usable - busy_cores()) // local))


def _cpu_busy_seconds() -> float | None:
    """Seconds all CPUs have spent busy since boot (``/proc/stat``: everything but idle and iowait), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def busy_cores(window: float = 0.25) -> int:
    """Cores other work keeps busy: the smaller of the 1-minute load average and what the CPUs did in the last
    ``window`` seconds besides this process (``/proc/stat``). The load average alone lags: right after another run
    ends it still reads about one busy core for a minute; the moment's sample alone would follow a brief spike."""
    try:
        average = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        average = 0
    before = _cpu_busy_seconds()
    if before is None:
        return average
    own_before = time.process_time()
    time.sleep(window)
    after, own = _cpu_busy_seconds(), time.process_time() - own_before
    others = max(0.0, (after - before) - own) / window if after is not None else float(average)
    return min(average, round(others))


def set_cpu_threads() -> int | None:
    """Apply :func:`cpu_threads_for_run` (the script's entry point calls this; imports never do)."""
    threads = cpu_threads_for_run()
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and for any worker process started later
    return threads


def cpu_only_multiprocess() -> bool:
    """True when launched as several processes (``WORLD_SIZE`` > 1) on a machine without any accelerator.

    accelerate then only forms a gloo group (``DistributedType.MULTI_CPU``) if asked for the CPU;
    otherwise every process silently trains alone and all of them write the same output folder.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.accelerator.is_available()


def setup_logging(accelerator: Any) -> None:
    """Our own messages at INFO on the main process; libraries only when something is wrong. Starts the run clock."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    RUN_CLOCK["start"] = time.perf_counter()
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def error_text(e: Exception) -> str:
    """The user-error message as the script writes it last: plain, or framed under ``accelerate launch``.

    accelerate answers a non-zero exit with its own ``CalledProcessError`` traceback (after a bare
    ``RuntimeError`` line: :func:`stderr_to_stdout_under_accelerate` leaves it nothing to repeat), printed after
    the script has ended, so there the message is set off by a rule and a pointer; the error stays the last line.
    """
    if not launched_by_accelerate() or not is_main_launch_process():
        return f"error: {e}\n"
    return (
        f"\n{'=' * 72}\n"
        "The run stopped on the error below. The RuntimeError and CalledProcessError traceback that accelerate "
        "prints after it only say that this script exited with status 2.\n"
        f"error: {e}\n"
    )
