"""Validation during training: generate for fixed samples with the current LoRA, save a grid, log mask metrics.

The trainer calls :func:`run_validation` on the main process every ``validation.every_steps`` updates and at the
end. Which samples (:func:`validation_sources`): with ``validation.data_root`` the first ``validation.num_samples``
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

from data import TripletDataset, make_buckets, open_configured_source, validate_source
from data.errors import DatasetError, writing
from data.transforms import prepare_sample
from kontext.evaluation.grid import draw_mask_outline, make_grid
from kontext.evaluation.metrics import aggregate, latent_sample_metrics, sample_metrics
from kontext.runtime.generation import (
    components_on,
    generate,
    image_latents,
    mask_array,
    mask_to_pil,
    quiet_progress,
    to_pil,
)
from kontext.training.signals import busy, uninterrupted

logger = logging.getLogger(__name__)

# Column labels of the grid: the context with the mask hint drawn (what the model sees), the generated result, the
# target, and the overlay (the result with the insertion mask's contour in red).
GRID_COLUMNS = ("context", "result", "target", "overlay")
# Diagnostics that do not belong on a metric curve.
_NOT_LOGGED = ("boundary_tol_px", "count")


class SubsetSource:
    """Samples ``indices`` of a source, re-indexed from 0: the training part, or the held-out part, of one dataset.

    Answers the same questions as ``data.sources.TripletSource`` (the fingerprint is the underlying sample's, so a
    latent cache built on the whole dataset stays valid); ``what`` says which part it is in messages.
    """

    def __init__(self, source: Any, indices: list[int], what: str) -> None:
        if any(not 0 <= i < len(source) for i in indices):
            raise IndexError(f"indices out of range for a dataset of {len(source)} samples")
        self.source = source
        self.indices = list(indices)
        self.what = what
        self.max_pixels = source.max_pixels

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def names(self) -> list[str]:
        names = self.source.names
        return [names[i] for i in self.indices]

    def describe(self) -> str:
        return f"{self.source.describe()} ({self.what})"

    def scan_problems(self) -> list[str]:
        return self.source.scan_problems()

    def image_refs(self, i: int) -> Any:
        return self.source.image_refs(self.indices[i])

    def prompt(self, i: int) -> str:
        return self.source.prompt(self.indices[i])

    def size(self, i: int) -> tuple[int, int]:
        return self.source.size(self.indices[i])

    def fingerprint(self, i: int) -> str:
        return self.source.fingerprint(self.indices[i])

    def load(self, i: int) -> Any:
        return self.source.load(self.indices[i])


def validation_sources(cfg: Any, source: Any) -> tuple[Any, Any | None]:
    """Split off the validation samples: ``(training source, validation source or None)``.

    - ``validation.holdout: N``: the last N samples in name order are withheld from training and validated on.
    - ``validation.data_root``: that dataset (opened as ``data.root`` is: same ``data.source``, split, columns,
      default prompt and pixel limit), checked in full like the training data; samples found in both (same
      image bytes) are named in a warning, since they are not held out.
    - neither: ``(source, None)``; validation then uses the first training samples.

    Raises:
        DatasetError: the holdout leaves nothing to train on, or the validation dataset has problems.
    """
    v, d = cfg.validation, cfg.data
    if v.holdout:
        n = len(source)
        if v.holdout >= n:
            raise DatasetError(
                source.describe(),
                [f"validation.holdout is {v.holdout} but the dataset has {n} sample{'s' if n != 1 else ''}; "
                 "hold out fewer, or give a separate held-out set as validation.data_root"],
            )
        keep = n - v.holdout
        train = SubsetSource(source, list(range(keep)), f"training part: {keep} of {n} samples")
        held = SubsetSource(source, list(range(keep, n)), f"held-out part: the last {v.holdout} of {n} samples")
        logger.info("validation.holdout: %d of %d samples held out for validation (%s)", v.holdout, n,
                    _shown(held.names))
        return train, held
    if not v.data_root:
        return source, None
    held = open_configured_source(d, v.data_root)
    validate_source(held, max_pixels=d.max_pixels, progress=False, buckets=make_buckets(d.resolution, d.aspect_buckets))
    shown = range(min(v.num_samples, len(held)))
    # Same files have the same size: only training samples of a validation sample's size are hashed.
    sizes = {held.size(i) for i in shown}
    training = {source.fingerprint(i) for i in range(len(source)) if source.size(i) in sizes}
    both = [held.names[i] for i in shown if held.fingerprint(i) in training]
    if both:
        logger.warning(
            "validation.data_root: %d of the %d validation samples are also training samples (same files: %s); "
            "their metrics do not measure held-out quality", len(both), len(shown), _shown(both)
        )
    return source, held


def _shown(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def validation_dataset(cfg: Any, source: Any) -> Any:
    """The held-out samples as a ``data.TripletDataset`` with the training buckets and hint (no cache, no geometry)."""
    d = cfg.data
    return TripletDataset(
        source,
        resolution=d.resolution,
        aspect_buckets=d.aspect_buckets,
        mask_hint=d.mask_hint,
        outline_width=d.outline_width,
        seed=cfg.train.seed,
        with_geometry=False,
    )


def held_out(cfg: Any) -> bool:
    """Whether this run validates on samples it does not train on (``validation.data_root`` or ``holdout``)."""
    return bool(cfg.validation.data_root or cfg.validation.holdout)


def validation_samples(dataset: Any, num_samples: int) -> list[dict[str, Any]]:
    """The fixed validation samples: the first ``num_samples`` of ``dataset``, un-flipped, centre-cropped.

    Args:
        dataset: a ``data.TripletDataset`` (``load_raw``, ``buckets``, ``bucket_ids``, ``mask_hint``).

    Returns:
        A list of dicts with ``name``, ``prompt``, ``context`` and ``target`` (RGB PIL at the bucket size, the
        context WITHOUT hint) and ``mask`` (``L`` PIL).
    """
    out = []
    for i in range(min(int(num_samples), len(dataset))):
        raw = dataset.load_raw(i)
        bucket = dataset.buckets[dataset.bucket_ids[i]]
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
    v = cfg.validation
    samples = validation_samples(dataset, v.num_samples)
    if not samples:
        logger.warning("validation skipped: the dataset is empty")
        return {}
    device = next(transformer.parameters()).device
    previous_transformer = pipe.transformer
    pipe.transformer = transformer
    rows: list[list[Image.Image]] = []
    pixel, latent = [], []
    try:
        what = f"the validation at step {step} ({len(samples)} x {v.num_inference_steps} denoising steps)"
        with components_on(pipe, device), quiet_progress(pipe), busy(what):
            for i, s in enumerate(samples):
                gen = generate(
                    pipe,
                    s["context"],
                    s["prompt"],
                    s["mask"],
                    mask_hint=dataset.mask_hint,
                    outline_width=getattr(dataset, "outline_width", None),
                    seed=v.seed + i,
                    num_inference_steps=v.num_inference_steps,
                    guidance_scale=v.guidance_scale,
                    max_sequence_length=cfg.model.max_sequence_length,
                )
                result = gen.images[0]
                m = mask_array(s["mask"])
                pixel.append(sample_metrics(result, s["context"], m, s["target"]))
                latent.append(latent_sample_metrics(gen.latents[0], image_latents(pipe, s["context"]), m))
                rows.append([gen.hinted_context, result, s["target"], draw_mask_outline(result, m)])
    finally:
        pipe.transformer = previous_transformer
    metrics = {f"val/{k}": _finite_or_nan(x) for k, x in aggregate(pixel).items() if k not in _NOT_LOGGED}
    metrics |= {f"val/latent_{k}": _finite_or_nan(x) for k, x in aggregate(latent).items() if k not in _NOT_LOGGED}
    metrics["val/count"] = float(len(samples))
    grid = make_grid(rows, GRID_COLUMNS, max_side=v.grid_max_side)
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
