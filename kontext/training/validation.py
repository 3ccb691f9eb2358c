"""Validation during training: generate for fixed samples with the current LoRA, save a grid, log mask metrics.

The trainer calls :func:`run_validation` on the main process every ``validation.every_steps`` updates and at the
end. Which samples (``data.split.validation_split``): with ``validation.data_root`` the first ``validation.num_samples``
of that held-out dataset; with ``validation.holdout: N`` the last N samples (in name order) of ``data.root``, which
are then withheld from training; with neither (the default) the first ``validation.num_samples`` TRAINING samples,
which shows what the LoRA learned but not how it generalises. They are used un-flipped and centre-cropped at
their bucket size, each with its own fixed seed (``validation.seed + index``), so the grids of successive steps
differ only by the LoRA. The metrics (``kontext.evaluation.metrics``) compare the result with the ORIGINAL context (the
hint is not part of the scene), in pixel space and in latent space (``val/latent_*``; meaningful even when the
base model's VAE reconstructs poorly, as the tiny model's does).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data import TripletDataset, dataset_from_config
from data.errors import writing
from data.transforms import prepare_sample
from data.validate import mask_vanishes
from kontext.evaluation.grid import make_grid
from kontext.evaluation.metrics import aggregate
from kontext.evaluation.score import generate_and_score
from kontext.runtime.generation import components_on, mask_to_pil, quiet_progress, to_pil
from kontext.training.signals import busy, uninterrupted

logger = logging.getLogger(__name__)

# Column labels of the grid: the context with the mask hint drawn (what the model sees), the generated result, the
# target, and the overlay (the result with the insertion mask's contour in red).
GRID_COLUMNS = ("context", "result", "target", "overlay")
# Diagnostics that do not belong on a metric curve.
_NOT_LOGGED = ("boundary_tol_px", "count")


def validation_dataset(cfg: Any, source: Any) -> TripletDataset:
    """The held-out samples as a ``data.TripletDataset`` built as the training one (buckets, hint), without cache or
    geometry; :func:`validation_samples` reads them un-flipped and centre-cropped."""
    return dataset_from_config(cfg.data, source, cfg.train.seed, with_geometry=False)


def held_out(cfg: Any) -> bool:
    """Whether this run validates on samples it does not train on (``validation.data_root`` or ``holdout``)."""
    return bool(cfg.validation.data_root or cfg.validation.holdout)


def validation_samples(dataset: Any, num_samples: int) -> list[dict[str, Any]]:
    """The fixed validation samples: the first ``num_samples`` of ``dataset``, un-flipped, centre-cropped.

    A sample whose mask vanishes in its bucket (``data.validate.mask_vanishes``: the centre crop cuts the mask
    away, or it is smaller than a latent cell) is passed over for the next one: it has nothing to score, and its
    IoU 0 would pull the ``val/*`` means down while its area ratio is NaN. The dataset check already warned about it.

    Args:
        dataset: a ``data.TripletDataset`` (``load_raw``, ``buckets``, ``bucket_ids``, ``mask_hint``).

    Returns:
        A list of dicts with ``name``, ``prompt``, ``context`` and ``target`` (RGB PIL at the bucket size, the
        context WITHOUT hint) and ``mask`` (``L`` PIL).
    """
    out = []
    passed_over = []
    for i in range(len(dataset)):
        if len(out) >= int(num_samples):
            break
        raw = dataset.load_raw(i)
        bucket = dataset.buckets[dataset.bucket_ids[i]]
        if mask_vanishes(raw.mask, [bucket]):
            passed_over.append(raw.name)
            continue
        # centre crop even when training crops at random: validation must see the same pixels every time
        p = prepare_sample(raw, bucket, flip=False, crop="center")
        out.append(
            {
                "name": raw.name,
                "prompt": raw.prompt,
                "context": to_pil(p["context"])[0],
                "target": to_pil(p["target"])[0],
                "mask": mask_to_pil(p["mask"]),
            }
        )
    if passed_over:
        logger.info(
            "validation passes over %d sample(s) whose mask vanishes at the training size (%s)",
            len(passed_over),
            ", ".join(passed_over),
        )
    return out


def _finite_or_nan(x: float) -> float:
    return float(x) if math.isfinite(float(x)) else float("nan")


def log_to_trackers(accelerator: Any, scalars: dict[str, float], images: dict[str, Image.Image], step: int) -> None:
    """Log scalars through ``accelerator.log`` and images where the tracker supports them.

    TensorBoard gets ``add_image`` (HWC uint8), Weights & Biases a ``wandb.Image``; other trackers with a
    ``log_images`` method get a one-image batch. Does nothing without trackers.
    """
    trackers = list(getattr(accelerator, "trackers", []) or [])
    if not trackers:
        return
    accelerator.log(scalars, step=step)
    for tracker in trackers:
        name = getattr(tracker, "name", "")
        for tag, img in images.items():
            arr = np.asarray(img.convert("RGB"))
            if name == "tensorboard":
                writer = tracker.writer
                writer.add_image(tag, arr, global_step=step, dataformats="HWC")
                writer.flush()
            elif name == "wandb":
                import wandb

                tracker.log({tag: wandb.Image(arr)}, step=step)
            elif hasattr(tracker, "log_images"):
                try:
                    tracker.log_images({tag: [arr]}, step=step)
                except Exception as e:  # a third-party tracker that cannot take images must not stop training
                    logger.warning("tracker %s could not log image %s: %s", name, tag, e)


@torch.no_grad()
def run_validation(
    pipe: Any,
    transformer: torch.nn.Module,
    dataset: Any,
    cfg: Any,
    step: int,
    output_dir: str | Path,
    accelerator: Any = None,
) -> dict[str, float]:
    """Generate for the fixed validation samples, write ``validation/step-<step>.png``, log and return metrics.

    Args:
        pipe: the ``FluxKontextPipeline`` whose transformer carries the trained LoRA. Its VAE and text encoders may
            sit on another device than the transformer; they are moved to the transformer's device for the call
            and back afterwards.
        transformer: the (unwrapped) transformer being trained; used in place of ``pipe.transformer`` for the call.
        dataset: the ``data.TripletDataset`` to validate on: the held-out one of :func:`validation_dataset` when
            the run has one (:func:`held_out`), else the training dataset.
        cfg: the run's ``Config`` (``validation.*``, ``model.max_sequence_length``).
        step: the optimiser step, used in the file name and as the tracker step.
        output_dir: the run's output folder.
        accelerator: the ``accelerate.Accelerator`` whose trackers receive ``val/<metric>`` scalars and the grid
            (``val/grid``); None to skip logging.

    Returns:
        Mean metrics over the samples: the pixel metrics of ``kontext.evaluation.metrics.SampleMetrics`` as ``val/<name>``,
        the latent ones as ``val/latent_<name>``, and ``val/count``.

    The grid has a header row naming the columns of :data:`GRID_COLUMNS`, then one row per sample; each cell is the
    sample's size, downscaled so that the grid's longer side is at most ``validation.grid_max_side`` pixels (the
    same picture goes to the PNG and the trackers).
    """
    settings = cfg.validation
    samples = validation_samples(dataset, settings.num_samples)
    if not samples:
        logger.warning(
            "validation skipped: the dataset is empty" if len(dataset) == 0 else
            "validation skipped: every sample's mask vanishes at the training size (the centre crop to its bucket "
            "leaves no latent cell more than half white); crop the images around the object or paint larger masks"
        )
        return {}
    device = next(transformer.parameters()).device
    previous_transformer = pipe.transformer
    pipe.transformer = transformer
    rows: list[list[Image.Image]] = []
    pixel, latent = [], []
    try:
        what = f"the validation at step {step} ({len(samples)} x {settings.num_inference_steps} denoising steps)"
        with components_on(pipe, device), quiet_progress(pipe), busy(what):
            for i, sample in enumerate(samples):
                scored = generate_and_score(
                    pipe,
                    sample["context"],
                    sample["prompt"],
                    sample["mask"],
                    sample["target"],
                    mask_hint=dataset.mask_hint,
                    outline_width=getattr(dataset, "outline_width", None),
                    seed=settings.seed + i,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    max_sequence_length=cfg.model.max_sequence_length,
                )
                pixel.append(scored.pixel)
                latent.append(scored.latent)
                rows.append([scored.generation.hinted_context, scored.result, sample["target"], scored.outline])
    finally:
        pipe.transformer = previous_transformer
    metrics = {f"val/{k}": _finite_or_nan(x) for k, x in aggregate(pixel).items() if k not in _NOT_LOGGED}
    metrics |= {f"val/latent_{k}": _finite_or_nan(x) for k, x in aggregate(latent).items() if k not in _NOT_LOGGED}
    metrics["val/count"] = float(len(samples))
    grid = make_grid(rows, GRID_COLUMNS, max_side=settings.grid_max_side)
    path = Path(output_dir) / "validation" / f"step-{step}.png"
    # A stop that ends the final validation early (``signals``) never leaves a half-written grid.
    with uninterrupted(), writing(path, "the validation grid", partial=[path]):
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
    if accelerator is not None:
        log_to_trackers(accelerator, metrics, {"val/grid": grid}, step)
    which = "held-out" if held_out(cfg) else "training"
    logger.info(
        "validation at step %d on %d %s sample%s: IoU %.4g, area ratio %.4g, PSNR outside %.4g dB, latent IoU %.4g -> %s",
        step,
        len(samples),
        which,
        "s" if len(samples) != 1 else "",
        metrics.get("val/iou", float("nan")),
        metrics.get("val/area_ratio", float("nan")),
        metrics.get("val/psnr_outside", float("nan")),
        metrics.get("val/latent_iou", float("nan")),
        path,
    )
    return metrics
