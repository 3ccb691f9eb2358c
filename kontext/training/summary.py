"""The few lines a finished training run prints last: what ran, how it ended, where the files are, what next.

``train_kontext_lora.finish`` prints :func:`run_summary` on the main process. Numbers are rounded for the
console (:func:`round_sig`); the exact values stay in ``training_history.json`` and the model card.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.tiny.model import COMMITTED_DIR
from kontext.training.checkpoint import list_checkpoints
from kontext.training.launch import RUN_CLOCK, launched_by_accelerate
from kontext.training.validation import held_out

# The loss terms shown (in this order) when the history has them.
_LOSS_KEYS = ("loss/total", "loss/flow", "loss/geometry")
# Validation metrics shown (in this order) when present.
_METRIC_KEYS = ("val/iou", "val/area_ratio", "val/psnr_outside", "val/latent_iou")


def round_sig(x: float, digits: int = 4) -> str:
    """``x`` with ``digits`` significant digits for the console: ``0.007512`` -> ``0.007512``, ``21.8372`` -> ``21.84``."""
    if x is None:
        return "n/a"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.{digits}g}"


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def _model_argument(base_model: str) -> str:
    """``tiny`` for the committed tiny model (shorter, and valid on any machine), the reference itself otherwise."""
    try:
        return "tiny" if Path(base_model).resolve() == COMMITTED_DIR else base_model
    except (OSError, ValueError):
        return base_model


def final_losses(history: list[dict[str, float]], last: int = 10) -> dict[str, float]:
    """Mean of each loss term over the last ``last`` logged steps (one step's loss is noisy)."""
    tail = history[-last:]
    out: dict[str, float] = {}
    for k in _LOSS_KEYS:
        vals = [float(h[k]) for h in tail if k in h]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def output_files(output_dir: str | Path) -> tuple[list[str], bool]:
    """The artefacts a finished run left in ``output_dir`` (names relative to it, in a fixed order) and whether a
    checkpoint is there to continue from."""
    out = Path(output_dir)
    names = [LORA_WEIGHTS_NAME, "lora_comfyui.safetensors", "README.md", "config.yaml", "training_history.json"]
    files = [n for n in names if (out / n).is_file()]
    ckpts = list_checkpoints(out)
    if ckpts:
        files.append(f"{ckpts[-1].name}/ (last checkpoint)")
    if (out / "validation").is_dir():
        files.append("validation/ (grids)")
    return files, bool(ckpts)


# Samples in the held-out set the summary's command generates for a synthetic run.
HELDOUT_SAMPLES = 8


def held_out_folder(cfg: Any) -> tuple[str, list[str]]:
    """The folder the summary's evaluate command reads, and the lines that say how to make it first.

    ``validation.data_root`` when the run validated on one (it exists); for the synthetic set a command that
    writes new scenes of the same product beside it (another seed); otherwise how to split the user's data.
    """
    if cfg.validation.data_root:
        return str(cfg.validation.data_root), []
    if cfg.data.source != "folder":
        return "<held-out folder>", [
            "Evaluate on samples the LoRA never saw: write some in the folder layout (context/, target/, mask/, "
            "prompts/; docs/data.md), then:"
        ]
    root = Path(str(cfg.data.root))
    folder = str(root.parent / f"{root.name}_heldout")
    if cfg.data.synthetic.enabled:
        synthetic = cfg.data.synthetic
        return folder, [
            "Make a held-out folder (new scenes of the same product: another seed), then evaluate on it:",
            f"  python -m data.synthetic --root {shlex.quote(folder)} --num-samples {HELDOUT_SAMPLES} "
            f"--size {synthetic.size} --seed {synthetic.seed + 1}",
        ]
    layout = "(context/, target/, mask/, prompts/ as in data.root)"
    if cfg.validation.holdout:
        how = (
            f"copy the last {cfg.validation.holdout} samples of {root} in name order (validation.holdout kept them "
            f"out of training) into {folder} {layout}"
        )
    else:
        how = (
            f"put samples the LoRA never saw into {folder} {layout}: no sample of {root} was held out of training "
            "(validation.holdout: N keeps the last N out)"
        )
    return folder, [f"Make a held-out folder: {how}; then evaluate on it:"]


def finished_run_summary(output_dir: Path, cfg: Any, history: list[dict[str, float]], steps: int,
                         metrics: dict[str, float]) -> str:
    """:func:`run_summary` for the run that just finished in this process (its files, clock and launcher)."""
    import time

    files, can_resume = output_files(output_dir)
    heldout, make_heldout = held_out_folder(cfg)
    started = RUN_CLOCK.get("start")
    return run_summary(
        steps=steps,
        wall_seconds=time.perf_counter() - started if started is not None else sum(h.get("step_time_s", 0.0) for h in history),
        history=history,
        metrics=metrics,
        output_dir=output_dir,
        files=files,
        base_model=cfg.model.pretrained_model_name_or_path,
        can_resume=can_resume,
        launcher="accelerate launch" if launched_by_accelerate() else "python",
        validated_on="held-out" if held_out(cfg) else "training",
        heldout=heldout,
        make_heldout=make_heldout,
    )


def run_summary(
    *,
    steps: int,
    wall_seconds: float,
    history: list[dict[str, float]],
    metrics: dict[str, float],
    output_dir: str | Path,
    files: list[str | Path],
    base_model: str,
    can_resume: bool,
    launcher: str = "accelerate launch",
    validated_on: str = "training",
    heldout: str = "<held-out folder>",
    make_heldout: list[str] | None = None,
) -> str:
    """The end-of-run summary as lines of text.

    Args:
        steps: optimiser steps done in total (a resumed run counts the earlier ones).
        wall_seconds: wall time of this process's run (setup, training, export).
        history: ``[{"step": int, "loss/total": float, ...}, ...]`` as in ``training_history.json``.
        metrics: final validation metrics (``val/iou`` ...); may be empty.
        validated_on: ``"held-out"`` or ``"training"``: which samples the metrics come from.
        output_dir: the run's folder; ``files`` are the artefacts written there (names relative to it).
        base_model: the base model as ``kontext.tools.evaluate --model`` takes it.
        can_resume: whether a final checkpoint exists (``checkpoint.every_steps`` > 0).
        launcher: how the resume command starts the trainer.
        heldout: the folder the evaluate command reads; make_heldout: the lines before it that say how to make
            that folder (see :func:`held_out_folder`; default: a plain "Evaluate on a held-out folder:").
    """
    out = Path(output_dir)
    n = min(10, len(history))
    lines = ["", "=" * 72, f"Training finished: {steps} steps in {_duration(wall_seconds)}."]
    losses = final_losses(history)
    if losses:
        shown = ", ".join(f"{k.split('/', 1)[1]} {round_sig(v)}" for k, v in losses.items())
        lines.append(f"Final losses (mean of the last {n} steps): {shown}")
    if metrics:
        keys = [k for k in _METRIC_KEYS if k in metrics] or sorted(k for k in metrics if k != "val/count")
        shown = ", ".join(f"{k.split('/', 1)[-1]} {round_sig(metrics[k])}" for k in keys)
        lines.append(f"Validation ({validated_on} samples): {shown}")
    lines.append(f"Files in {out}:")
    lines += [f"  {f}" for f in files]
    cfg = shlex.quote(str(out / "config.yaml"))
    if can_resume:
        lines += [
            "Continue training (raise train.max_steps):",
            f"  {launcher} train_kontext_lora.py --config {cfg} checkpoint.resume_from=latest train.max_steps={2 * steps}",
        ]
    else:
        lines.append("No checkpoint was kept (checkpoint.every_steps = 0), so this run cannot be continued.")
    lines.append(
        "Or train anew: a new output_dir=..., or checkpoint.overwrite_output_dir=true to replace this run."
    )
    data = heldout if heldout.startswith("<") else shlex.quote(heldout)
    lines += make_heldout if make_heldout else ["Evaluate on a held-out folder:"]
    lines += [
        f"  python -m kontext.tools.evaluate --model {shlex.quote(_model_argument(base_model))} --lora {shlex.quote(str(out))} "
        # beside the run, not in it: a folder the trainer did not write would stop it from being continued
        f"--data {data} --out {shlex.quote(str(out.parent / (out.name + '_eval')))}",
        "=" * 72,
    ]
    return "\n".join(lines)
