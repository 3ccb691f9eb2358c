"""Does the object land in the mask at the right size? ``python -m kontext.tools.evaluate`` on a held-out folder.

    python -m kontext.tools.evaluate --model black-forest-labs/FLUX.1-Kontext-dev --lora outputs/bottle \\
        --data datasets/bottle_heldout --out reports/bottle

    # two LoRAs side by side (say, trained with and without the geometry losses), plus the base model
    python -m kontext.tools.evaluate --model tiny --lora outputs/geo --label-a geometry \\
        --lora-b outputs/plain --label-b plain --base --data heldout/ --steps 8 --out reports/geo-vs-plain

For every sample of the folder (same layout as training: ``context/``, ``target/``, ``mask/``, prompts) and every
model variant, it generates with the training mask hint and fixed seeds, computes the metrics of
``kontext.evaluation.metrics`` against the un-hinted context, and writes into ``--out``: ``metrics.csv`` (one row per sample,
one set of columns per variant), ``metrics.json`` (per sample and means), ``grid.png``, ``area_ratio.png`` and
``report.md`` (settings and the table of means). See ``docs/evaluation.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from data import DatasetError, make_buckets, nearest_bucket, open_source, validate_source
from data.errors import write_text_atomic, writing
from data.hint import MASK_HINT_MODES, apply_mask_hint_pil
from data.transforms import prepare_sample
from data.validate import DatasetWarning, mask_vanishes
from kontext.evaluation.grid import make_grid
from kontext.evaluation.metrics import MAX_THRESHOLD, METRIC_FIELDS, LatentMetrics, aggregate
from kontext.evaluation.plot import bar_chart
from kontext.evaluation.score import generate_and_score
from kontext.runtime.generation import mask_to_pil, quiet_progress, to_pil
from kontext.tools.common import (
    InferenceError,
    LoraSpec,
    add_model_argument,
    add_runtime_arguments,
    check_out_folder,
    cli_main,
    guidance_setting,
    mask_hint_settings,
    open_pipeline,
    parse_lora_spec,
    prompt_length_setting,
    trained_settings,
)

logger = logging.getLogger(__name__)

LATENT_FIELDS = tuple("latent_" + f.name for f in dataclasses.fields(LatentMetrics))
ALL_FIELDS = METRIC_FIELDS + LATENT_FIELDS
# The columns of the comparison table in report.md, with the direction that is better.
HEADLINE = (
    ("iou", "higher"),
    ("area_ratio", "closer to 1"),
    ("area_log_error", "lower"),
    ("boundary_f", "higher"),
    ("psnr_outside", "higher"),
    ("ssim_outside", "higher"),
    ("psnr_inside", "higher"),
    ("latent_iou", "higher"),
    ("latent_area_ratio", "closer to 1"),
    ("latent_area_log_error", "lower"),
    ("latent_boundary_f", "higher"),
)
# The verdict (:func:`variant_verdict`). PSNR outside the mask below this: the background was repainted. The
# committed tiny base keeps 21.7-22.8 dB (17.8 dB with 512-token prompts, which it was not trained with); a LoRA
# that repainted the whole image scored 12.6 dB.
REPAINT_PSNR_DB = 16.0
# ... or at least this share of samples whose change-mask threshold had to be bounded (the background changed
# about as much as an object would, so their IoU and area ratio do not measure the insertion).
REPAINT_DEGENERATE_SHARE = 0.5
# The right size: the geometric mean of the area ratios within [1 / SIZE_TOLERANCE, SIZE_TOLERANCE].
SIZE_TOLERANCE = 1.25
# The right place: mean IoU at least this (with the right size, less means the change is beside the mask).
MIN_IOU_ON_TARGET = 0.3
SAMPLE_COLUMNS = ("context", "target")
# Longest side of grid.png by default (32 rows of 1024 px samples would be 32 k pixels tall).
GRID_MAX_SIDE = 8192
VARIANT_COLUMNS = ("result", "outline", "change")


@dataclass
class Variant:
    """One column set of the report: a LoRA (or none, for the base model) under a label."""

    label: str
    lora: LoraSpec | None
    adapter: str | None = None
    rows: list[dict[str, float]] = field(default_factory=list)


@dataclass
class EvalSample:
    """A held-out sample at evaluation size: un-hinted ``context`` and ``target`` (RGB) and ``mask`` (``L``)."""

    name: str
    prompt: str
    context: Image.Image
    target: Image.Image
    mask: Image.Image


def load_samples(
    data: str,
    resolution: int | None,
    aspect_buckets: bool,
    default_prompt: str | None,
    limit: int | None,
    skipped: list[str] | None = None,
) -> list[EvalSample]:
    """Open and validate a dataset folder and bring its samples to evaluation size.

    With ``resolution`` each sample goes to its training bucket (``data.make_buckets``), centre-cropped as
    training does; without, it keeps its own size floored to a multiple of 16.

    A sample whose mask vanishes at its evaluation size (no latent cell more than half white after the resize
    and centre crop, e.g. a mask near the top of a 1:4 portrait in a 3:7 bucket) cannot be scored: its IoU would
    enter the means as 0 and its area ratio as NaN. It is left out with a :class:`DatasetWarning` naming it, and
    its name is appended to ``skipped`` when a list is given; an error if every sample vanishes.
    """
    if not Path(data).expanduser().is_dir():
        raise InferenceError(f"--data {data!r} is not a folder; give a dataset folder with context/, target/ and mask/")
    try:
        source = open_source("folder", Path(data).expanduser(), default_prompt=default_prompt)
        validate_source(source, progress=False)
    except DatasetError as e:
        raise InferenceError(f"--data {data!r}: {e}") from None
    try:
        buckets = make_buckets(resolution, aspect_buckets) if resolution is not None else None
    except ValueError as e:
        raise InferenceError(f"--resolution: {e}") from None
    n = len(source) if limit is None else min(limit, len(source))
    out = []
    vanished: list[tuple[str, str]] = []  # (name, mask size -> bucket)
    for i in range(n):
        raw = source.load(i)
        if buckets is not None:
            bucket = buckets[nearest_bucket(*source.size(i), buckets)]
        else:
            w, h = raw.context.size
            bucket = (max(16, w // 16 * 16), max(16, h // 16 * 16))
        if mask_vanishes(raw.mask, [bucket]):
            vanished.append((raw.name, f"{raw.mask.size[0]}x{raw.mask.size[1]} -> {bucket[0]}x{bucket[1]}"))
            continue
        p = prepare_sample(raw, bucket, flip=False, crop="center")
        out.append(
            EvalSample(raw.name, raw.prompt, to_pil(p["context"])[0], to_pil(p["target"])[0], mask_to_pil(p["mask"]))
        )
    if vanished:
        shown = ", ".join(f"{name} ({sizes})" for name, sizes in vanished)
        why = (
            f"the mask vanishes at the evaluation size: after resizing and centre cropping to the bucket no latent "
            f"cell (8x8 pixels) is more than half white, so there is nothing to score ({shown}); "
            "crop the images around the object, paint larger masks, or evaluate at another --resolution"
        )
        if not out:
            raise InferenceError(f"--data {data!r}: every sample evaluated ({n} of {n}) is unusable: {why}")
        warnings.warn(
            DatasetWarning(f"--data {data!r}: {len(vanished)} of {n} samples left out of the evaluation: {why}"),
            stacklevel=2,
        )
        if skipped is not None:
            skipped.extend(name for name, _ in vanished)
    return out


def evaluation_buckets(
    resolution: int | None, aspect_buckets: bool | None, trained: dict[str, Any]
) -> tuple[int | None, bool]:
    """``(resolution, aspect_buckets)`` of an evaluation: each given value, else the LoRA run's (``trained``).

    ``--resolution`` changes only the size: the aspect buckets stay as the run trained (``data.aspect_buckets``),
    so a portrait sample is evaluated in a portrait bucket unless ``--no-aspect-buckets`` says otherwise.
    Without any resolution, samples keep their own size and the buckets do not apply.
    """
    res = resolution if resolution is not None else trained.get("resolution")
    aspect = aspect_buckets if aspect_buckets is not None else bool(trained.get("aspect_buckets", False))
    return res, aspect


def _clean(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


def evaluate_variant(
    pipe: Any,
    variant: Variant,
    samples: Sequence[EvalSample],
    *,
    mask_hint: str,
    outline_width: int | None,
    composite: bool,
    seed: int,
    steps: int,
    guidance: float,
    max_sequence_length: int,
    progress: Any = None,
) -> list[list[Image.Image]]:
    """Generate and measure every sample with one variant active; fills ``variant.rows``.

    Sample ``i`` uses seed ``seed + i`` in every variant, so variants differ only by their LoRA.
    ``progress`` (a ``tqdm`` bar, optional) advances by one per sample.

    Returns:
        Per sample, the pictures of :data:`VARIANT_COLUMNS` (result, result with mask outline, change mask).
    """
    if variant.adapter is None:
        if getattr(pipe.transformer, "peft_config", None):
            pipe.disable_lora()
    else:
        pipe.enable_lora()
        pipe.set_adapters([variant.adapter], adapter_weights=[variant.lora.strength if variant.lora else 1.0])
    pictures = []
    variant.rows = []
    for i, s in enumerate(samples):
        scored = generate_and_score(
            pipe,
            s.context,
            s.prompt,
            s.mask,
            s.target,
            mask_hint=mask_hint,
            outline_width=outline_width,
            composite=composite,
            seed=seed + i,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=max_sequence_length,
        )
        variant.rows.append(scored.row())
        pictures.append([scored.result, scored.outline, scored.change_image()])
        logger.info(
            "%s | %s: IoU %.4g, area ratio %.4g", variant.label, s.name, scored.pixel.iou, scored.pixel.area_ratio
        )
        if progress is not None:
            progress.set_postfix_str(f"{variant.label} | {s.name}", refresh=False)
            progress.update(1)
    return pictures


@dataclass(frozen=True)
class Verdict:
    """What a variant's metrics say, in one word and one line: ``label`` is ``repaints outside the mask``,
    ``too small``, ``too large``, ``beside the mask`` or ``on target``; ``reason`` gives the numbers."""

    label: str
    reason: str

    def line(self, variant: str) -> str:
        """``<variant>: <label> (<reason>)``, the line printed and written into report.md."""
        return f"{variant}: {self.label} ({self.reason})"


def variant_verdict(rows: Sequence[dict[str, float]]) -> Verdict:
    """The verdict of one variant from its per-sample metrics (``Variant.rows``).

    In this order: the background first (mean ``psnr_outside`` below :data:`REPAINT_PSNR_DB`, or at least
    :data:`REPAINT_DEGENERATE_SHARE` of the samples with a bounded change-mask threshold: the region metrics then
    measure the repainting, not the object, and a whole-image repaint reads as "too small"); then the size, from
    the geometric mean of ``(changed + 1) / (mask + 1)`` over the other samples (outside
    ``[1 / SIZE_TOLERANCE, SIZE_TOLERANCE]``: too small or too large); then the place (mean IoU below
    :data:`MIN_IOU_ON_TARGET`: beside the mask); else on target.
    """
    if not rows:
        return Verdict("no samples", "nothing was generated")
    mean = aggregate(rows)
    n = len(rows)
    kept = [r for r in rows if r.get("threshold_degenerate", 0.0) != 1.0]
    degenerate = n - len(kept)
    psnr_out = mean["psnr_outside"]
    if psnr_out < REPAINT_PSNR_DB or degenerate >= REPAINT_DEGENERATE_SHARE * n:
        return Verdict(
            "repaints outside the mask",
            f"PSNR outside {psnr_out:.1f} dB (below {REPAINT_PSNR_DB:g} dB means repainted); {degenerate} of {n} "
            "samples changed their background as much as an object, so IoU and area ratio do not measure the insertion",
        )
    logs = [math.log((r["changed_area"] + 1.0) / (r["mask_area"] + 1.0)) for r in kept]
    ratio = math.exp(sum(logs) / len(logs))
    iou = sum(r["iou"] for r in kept) / len(kept)
    numbers = f"area {ratio:.2f}x the mask (geometric mean), IoU {iou:.2f}, PSNR outside {psnr_out:.1f} dB"
    if ratio < 1.0 / SIZE_TOLERANCE:
        return Verdict("too small", numbers)
    if ratio > SIZE_TOLERANCE:
        return Verdict("too large", numbers)
    if iou < MIN_IOU_ON_TARGET:
        return Verdict("beside the mask", f"{numbers}: the right size, but not where the mask is")
    return Verdict("on target", numbers)


def write_report(
    out: Path,
    samples: Sequence[EvalSample],
    variants: Sequence[Variant],
    hinted: Sequence[Image.Image],
    pictures: dict[str, list[list[Image.Image]]],
    settings: dict[str, Any],
    grid_limit: int,
    grid_max_side: int | None = GRID_MAX_SIDE,
) -> dict[str, Path]:
    """Write metrics.csv, metrics.json, grid.png, area_ratio.png and report.md into ``out``; returns their paths."""
    with writing(out, "the evaluation folder"):
        out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("csv", "metrics.csv"), ("json", "metrics.json"), ("grid", "grid.png"),
                                      ("plot", "area_ratio.png"), ("report", "report.md"))}
    means = {v.label: aggregate(v.rows) for v in variants}

    # metrics.csv: one row per sample, "<label>/<metric>" columns per variant
    with writing(paths["csv"]), open(paths["csv"], "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["sample", "prompt"] + [f"{v.label}/{k}" for v in variants for k in ALL_FIELDS])
        for i, s in enumerate(samples):
            w.writerow([s.name, s.prompt] + [f"{v.rows[i][k]:.6g}" for v in variants for k in ALL_FIELDS])

    doc = {
        "settings": settings,
        "variants": [
            {
                "label": v.label,
                "lora": str(v.lora.path) if v.lora else None,
                "strength": v.lora.strength if v.lora else None,
            }
            for v in variants
        ],
        "samples": [
            {
                "name": s.name,
                "prompt": s.prompt,
                "metrics": {v.label: {k: _clean(v.rows[i][k]) for k in ALL_FIELDS} for v in variants},
            }
            for i, s in enumerate(samples)
        ],
        "mean": {label: {k: _clean(x) for k, x in m.items()} for label, m in means.items()},
        "verdict": {v.label: dataclasses.asdict(variant_verdict(v.rows)) for v in variants},
    }
    write_text_atomic(paths["json"], json.dumps(doc, indent=1))

    rows = []
    for i in range(min(len(samples), grid_limit)):
        row = [hinted[i], samples[i].target]
        for v in variants:
            row += pictures[v.label][i]
        rows.append(row)
    labels = list(SAMPLE_COLUMNS) + [f"{v.label}: {c}" for v in variants for c in VARIANT_COLUMNS]
    with writing(paths["grid"]):
        make_grid(rows, labels, max_side=grid_max_side).save(paths["grid"])

    chart, _ = bar_chart(
        [s.name for s in samples],
        {v.label: [r["area_ratio"] for r in v.rows] for v in variants},
        title="Area ratio per sample (changed area / mask area)",
        y_label="area ratio",
        reference=1.0,
        reference_label="ratio 1: right size",
    )
    with writing(paths["plot"]):
        chart.save(paths["plot"])

    lines = ["# Evaluation report", ""]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    for v in variants:
        what = f"`{v.lora.path}` at strength {v.lora.strength:g}" if v.lora else "base model, no LoRA"
        lines.append(f"- variant `{v.label}`: {what}")
    lines += ["", "## Verdict", ""]
    lines += [f"- {variant_verdict(v.rows).line(v.label)}" for v in variants]
    lines += ["", "## Means over samples", "", "| metric | better | " + " | ".join(v.label for v in variants) + " |"]
    lines.append("|---|---|" + "---|" * len(variants))
    for k, better in HEADLINE:
        vals = " | ".join(f"{means[v.label][k]:.4f}" for v in variants)
        lines.append(f"| {k} | {better} | {vals} |")
    lines += degenerate_threshold_lines(samples, variants)
    lines += ["", f"Per-sample numbers: `metrics.csv`, `metrics.json`. Grid (first {len(rows)} samples):", "",
              "![grid](grid.png)", "", "![area ratio](area_ratio.png)", ""]
    write_text_atomic(paths["report"], "\n".join(lines))
    return paths


def degenerate_threshold_lines(samples: Sequence[EvalSample], variants: Sequence[Variant]) -> list[str]:
    """The report's note on samples whose change-mask threshold had to be bounded (``threshold_degenerate``)."""
    bad = {
        v.label: [s.name for s, r in zip(samples, v.rows) if r.get("threshold_degenerate", 0.0) == 1.0]
        for v in variants
    }
    if not any(bad.values()):
        return ["", "Change-mask thresholds: none degenerate (every sample's threshold came from its background's drift)."]
    lines = [
        "",
        "## Degenerate change-mask thresholds",
        "",
        f"On these samples the background changed so much that the change-mask threshold (mean + k std of the "
        f"background's colour distance) exceeded {MAX_THRESHOLD:.3f} (half the largest possible RGB distance, "
        "sqrt(3)) and was bounded to it. Their IoU, area ratio and boundary F do not measure the insertion; "
        "look at their grid rows and change masks instead (the latent metrics are computed separately).",
        "",
    ]
    lines += [f"- `{label}`: {', '.join(names)} ({len(names)} of {len(samples)})" for label, names in bad.items() if names]
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kontext.tools.evaluate`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m kontext.tools.evaluate",
        description="Measure whether generated objects land in the insertion mask at the right size "
        "(docs/evaluation.md).",
    )
    add_model_argument(ap)
    ap.add_argument(
        "--lora", metavar="PATH[:STRENGTH]", help="the LoRA to evaluate (training output folder or .safetensors)"
    )
    ap.add_argument("--lora-b", metavar="PATH[:STRENGTH]", help="a second LoRA, reported side by side")
    ap.add_argument("--label-a", default="A", help="name of --lora in the report")
    ap.add_argument("--label-b", default="B", help="name of --lora-b in the report")
    ap.add_argument("--base", action="store_true", help="also evaluate the base model without any LoRA (label `base`)")
    ap.add_argument("--data", required=True, help="held-out dataset folder (training layout)")
    ap.add_argument(
        "--prompt", help="prompt for samples without their own (default: the LoRA run's data.default_prompt)"
    )
    ap.add_argument(
        "--mask-hint", choices=MASK_HINT_MODES, help="default: as the first LoRA was trained (`fill` otherwise)"
    )
    ap.add_argument("--outline-width", type=int, help="band width in pixels of the `outline` hint")
    ap.add_argument("--resolution", type=int, help="evaluation bucket size (default: the LoRA run's data.resolution; "
                    "without one, each sample's own size floored to 16)")
    ap.add_argument(
        "--aspect-buckets",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bucket by aspect ratio at --resolution, as training does (default: the LoRA run's data.aspect_buckets, "
        "also when --resolution is given; off without a config.yaml)",
    )
    ap.add_argument("--composite", action="store_true", help="composite results inside the mask before measuring")
    ap.add_argument("--steps", type=int, default=28, help="sampler steps")
    ap.add_argument(
        "--guidance", type=float, help="guidance embedding value (default: the LoRA run's validation.guidance_scale, else 2.5)"
    )
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i (the same for every variant)")
    ap.add_argument("--limit", type=int, help="evaluate only the first N samples")
    ap.add_argument("--grid-limit", type=int, default=32, help="rows of grid.png at most")
    ap.add_argument(
        "--grid-max-side", type=int, default=GRID_MAX_SIDE,
        help=f"longest side of grid.png in pixels; larger grids are downscaled cell by cell (default {GRID_MAX_SIDE})",
    )
    add_runtime_arguments(ap)
    ap.add_argument("--out", required=True, help="report folder")
    return ap


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Run an evaluation from parsed arguments; returns the written files."""
    if args.lora is None and args.lora_b is None and not args.base:
        raise InferenceError("nothing to evaluate: give --lora PATH (and optionally --lora-b PATH), or --base")
    if args.lora_b is not None and args.lora is None:
        raise InferenceError("--lora-b is the second of two LoRAs; give --lora PATH as well")
    if args.lora_b is not None and args.label_a == args.label_b:
        raise InferenceError(f"--label-a and --label-b are both {args.label_a!r}; give the two LoRAs different labels")
    if "base" in (args.label_a, args.label_b) and args.base:
        raise InferenceError("the label `base` is taken by --base; choose another --label-a/--label-b")
    for opt in ("steps", "limit", "grid_limit"):
        v = getattr(args, opt)
        if v is not None and v < 1:
            raise InferenceError(f"--{opt.replace('_', '-')} must be >= 1; got {v}")
    if args.grid_max_side < 64:
        raise InferenceError(f"--grid-max-side must be >= 64 (pixels); got {args.grid_max_side}")
    check_out_folder(args.out)
    variants: list[Variant] = []
    if args.lora is not None:
        variants.append(Variant(args.label_a, parse_lora_spec(args.lora, "--lora")))
    if args.lora_b is not None:
        variants.append(Variant(args.label_b, parse_lora_spec(args.lora_b, "--lora-b")))
    if args.base:
        variants.insert(0, Variant("base", None))
    with_lora = [v for v in variants if v.lora is not None]
    trained = trained_settings(with_lora[0].lora if with_lora else None)
    mask_hint, outline_width = mask_hint_settings(args.mask_hint, args.outline_width, trained)
    guidance = guidance_setting(args.guidance, trained)
    resolution, aspect = evaluation_buckets(args.resolution, args.aspect_buckets, trained)
    skipped: list[str] = []
    samples = load_samples(
        args.data, resolution, aspect, args.prompt or trained.get("default_prompt"), args.limit, skipped
    )

    opened = open_pipeline(args.model, [v.lora for v in with_lora], args.device, args.dtype, prefix="eval")
    model, pipe = opened.model, opened.pipe
    max_sequence_length = prompt_length_setting(args.max_sequence_length, trained, model)
    for v, name in zip(with_lora, opened.adapters):
        v.adapter = name
    pictures: dict[str, list[list[Image.Image]]] = {}
    # One bar over every generation (samples x variants); the pipeline's per-step bars stay hidden.
    bar = tqdm(total=len(samples) * len(variants), desc="evaluate", unit="image", disable=None, dynamic_ncols=True)
    with quiet_progress(pipe), torch.no_grad(), bar, logging_redirect_tqdm():
        for v in variants:
            pictures[v.label] = evaluate_variant(
                pipe,
                v,
                samples,
                mask_hint=mask_hint,
                outline_width=outline_width,
                composite=args.composite,
                seed=args.seed,
                steps=args.steps,
                guidance=guidance,
                max_sequence_length=max_sequence_length,
                progress=bar,
            )
    hinted = [apply_mask_hint_pil(s.context, s.mask, mask_hint, outline_width) for s in samples]
    settings = {
        "model": model,
        "run_config": trained.get("config"),
        "data": str(Path(args.data).expanduser().resolve()),
        "samples": len(samples),
        **({"left_out": ", ".join(skipped) + " (mask vanishes at the evaluation size)"} if skipped else {}),
        "mask_hint": mask_hint,
        "resolution": resolution if resolution is not None else "own size",
        "aspect_buckets": aspect if resolution is not None else None,
        "composite": bool(args.composite),
        "steps": args.steps,
        "guidance": guidance,
        "max_sequence_length": max_sequence_length,
        "seed": args.seed,
    }
    return write_report(
        Path(args.out).expanduser(), samples, variants, hinted, pictures, settings, args.grid_limit, args.grid_max_side
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for a usage error, with the message on stderr)."""
    return cli_main(build_parser(), run, _print_summary, argv)


def _print_summary(paths: dict[str, Path]) -> None:
    """Each variant's headline means and verdict, and the report's path, on stdout."""
    report = json.loads(paths["json"].read_text(encoding="utf-8"))
    for label, m in report["mean"].items():
        print(f"{label}: IoU {m['iou']:.4g}, area ratio {m['area_ratio']:.4g}, latent IoU {m['latent_iou']:.4g}")
        print(f"  verdict: {Verdict(**report['verdict'][label]).line(label)}")
    print(f"report: {paths['report']}")


if __name__ == "__main__":
    sys.exit(main())
