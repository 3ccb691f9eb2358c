"""The collectives that keep every process of a run in step: they all skip an update together, all stop on a
signal together, and all learn of a failure on one of them (instead of waiting at a barrier for it).

Each function is one collective with several processes and a plain local answer with one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from kontext.errors import UserError


def main_process_first(acc: Any, fn: Callable[[], Any], everyone: bool = True) -> Any:
    """``fn()`` on the main process, then (``everyone``) on the others; returns this process's result.

    Unlike ``accelerator.main_process_first()``, an error on the main process does not leave the other ranks
    waiting at its barrier: the main process re-raises it, every other rank raises a :class:`UserError` with
    its message. The broadcast of the outcome is the barrier (one collective, several processes only).
    """
    result = None
    if acc.is_main_process:
        try:
            result = fn()
        except BaseException as e:
            if acc.num_processes > 1:
                _share_outcome(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            raise
    # Reached by the main process only when fn() succeeded; the others learn here how it went.
    failure = _share_outcome(None) if acc.num_processes > 1 else None
    if failure is not None:
        raise UserError(f"the main process failed: {failure}")
    if everyone and not acc.is_main_process:
        result = fn()
    return result


def _share_outcome(failure: str | None) -> str | None:
    """The main process's failure message (or None) on every rank."""
    from accelerate.utils import broadcast_object_list

    box = [failure]
    broadcast_object_list(box, from_process=0)
    return box[0]


def all_finite(acc: Any, terms: torch.Tensor) -> bool:
    """True if every logged term is finite on every process: one fused reduction on the device, one all-reduce
    with several processes, and one host-device sync (``.item()``) for the decision."""
    bad = (~torch.isfinite(terms)).any().float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    return not bool(bad.item())


def any_process(acc: Any, flag: bool) -> bool:
    """True if ``flag`` is true on any process (all processes must skip an update, or save, together)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)
