"""Scale fidelity: does a product LoRA paint the product at the mask's size? Variants paired per held-out sample.

Trains product LoRAs on the embedded tiny FLUX.1 Kontext (pretrained on a general insertion task) with the
project's own trainer, then generates on held-out masks and measures where the product landed. The design is
fixed in this file before any variant runs:

- resolution 256 px (``--size``): the resolution at which the committed VAE renders the product in every size
  bucket (at 128 px it loses a third of the 1-2 % masks, and every mean becomes a count of misses);
- buckets of mask area (share of the image): ``in_band``, the training band's sizes (4-8 %: the "cheating by
  shrinking" the geometry terms are for), and ``extrapolation``, sides 0.5x-2x beyond it (1-4 % and 8-32 %).
  The VAE oracle (the true targets through the VAE, measured like a generation) is run per bucket first; a
  bucket where it finds the product in under 95 % of samples is dropped from the design before any training;
- variants (:data:`VARIANTS`): ``plain`` (flow loss only, what every peer trainer does), ``masked`` (the
  mask-weighted flow loss kohya, OneTrainer and SimpleTuner offer: the strongest simple alternative, and the
  reference every variant is paired against), ``masked_geometry`` (masked + the calibrated geometry terms),
  ``default`` (exactly the trainer's schema defaults for ``loss.*``: what a user gets), and the formulations
  that act where the size is decided (``*_inverse_sigma``: the push at high noise; ``*_on_policy``: the terms
  judge the model's own samples);
- the held-out sample is the unit: each sample's metrics are averaged over seeds first, intervals are
  Student-t over samples, and ``paired`` holds each variant minus ``masked`` per sample. The found-rate is
  reported apart from the signed log area ratio where found (too small and too large are different failures).

The product is found in every generated image by its known appearance (:func:`data.synthetic.product_box`,
its box from the orange body, which survives the tiny model's blur), besides the change-mask metrics of
:mod:`kontext.evaluation.metrics`. Writes ``summary.json``, ``report.md``, ``per_sample.json`` and
``area_vs_mask.png`` into ``--out``::

    python benchmarks/scale_fidelity.py --quick              # at most 30 minutes on 2 CPU cores
    python benchmarks/scale_fidelity.py                      # the full comparison (at most 2 hours)
    python benchmarks/scale_fidelity.py --heldout DIR        # evaluate on a folder in the training layout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.synthetic import generate_dataset  # noqa: E402  (the repository root is on the path only now)
from kontext.training.config import config_from_dict, config_to_dict  # noqa: E402

# Every variant's `loss` section, each term on or off explicitly; `default` is empty: the schema's defaults,
# whatever they are.
MASKED, UNMASKED = {"enabled": True}, {"enabled": False}
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"geometry": {"enabled": False}, "masked": UNMASKED},
    "masked": {"geometry": {"enabled": False}, "masked": MASKED},
    "default": {},
    "masked_geometry": {"geometry": {"enabled": True}, "masked": MASKED},
    # The push at high noise, where the sampler sets the extent, and of the flow loss's order (docs/losses.md).
    "masked_geometry_inverse_sigma": {"geometry": {"enabled": True, "noise_weighting": "inverse_sigma"}, "masked": MASKED},
    # The terms judge the model's own samples at sigma 0.55-0.9 (ReFL/DRaFT-style).
    "masked_on_policy": {"geometry": {"enabled": True}, "masked": MASKED, "on_policy": {"enabled": True}},
    # Ablations, not in the default set.
    "geometry": {"geometry": {"enabled": True}, "masked": UNMASKED},
    "reference": {"geometry": {"enabled": True, "formulation": "reference"}, "masked": UNMASKED},
    "geometry_unweighted": {"geometry": {"enabled": True, "noise_weighting": "none"}, "masked": UNMASKED},
}
DEFAULT_VARIANTS = (
    "plain", "masked", "default", "masked_geometry", "masked_geometry_inverse_sigma", "masked_on_policy",
)
REFERENCE = "masked"
METRICS = (
    "area_log_error", "found", "log_area_ratio_found", "area_log_error_found", "iou", "boundary_f", "psnr_outside",
    "change_iou",
)
PAIRED_METRICS = ("area_log_error", "found", "log_area_ratio_found", "area_log_error_found", "psnr_outside")
TRAIN_AREAS, TRAIN_ASPECT = (0.04, 0.08), (0.7, 1.4)
# Fixed before any run: the training band, and sides 0.5x-2x beyond it (areas 0.25x-4x).
BUCKETS: dict[str, list[tuple[float, float]]] = {
    "in_band": [TRAIN_AREAS],
    "extrapolation": [(0.01, 0.04), (0.08, 0.32)],
}
ORACLE_MIN_FOUND = 0.95


@dataclass
class Settings:
    train_samples: int
    heldout_per_bucket: int
    seeds: int
    steps: int
    batch_size: int = 4
    rank: int = 16
    learning_rate: float = 1e-3
    inference_steps: int = 12
    guidance: float = 2.5
    size: int = 256


QUICK = Settings(train_samples=24, heldout_per_bucket=12, seeds=1, steps=400)
FULL = Settings(train_samples=48, heldout_per_bucket=40, seeds=2, steps=1200)


def mean_ci(values: Any) -> dict[str, Any]:
    """Mean and 95 % Student-t interval of the finite values (one per held-out sample): ``{"mean", "ci95", "n"}``."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    m = float(v.mean())
    if v.size == 1:
        return {"mean": m, "ci95": [None, None], "n": 1}
    half = float(stats.t.ppf(0.975, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return {"mean": m, "ci95": [m - half, m + half], "n": int(v.size)}


def per_sample(rows: list[dict[str, float]], n_samples: int, metric: str) -> np.ndarray:
    """``[n_samples]`` seed-averaged values of ``metric`` from rows ordered seed-major (``seed * n + sample``).

    The finite values of a sample are averaged (NaN where it has none, e.g. the size error where the
    product was never found)."""
    if len(rows) % n_samples:
        raise ValueError(f"{len(rows)} rows are not whole seeds of {n_samples} samples")
    v = np.array([r[metric] for r in rows], dtype=np.float64).reshape(-1, n_samples)
    finite = np.isfinite(v)
    total = np.where(finite, v, 0.0).sum(0)
    count = finite.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def paired(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """``a - b`` per sample (samples finite in both), with its :func:`mean_ci`."""
    return mean_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def summarise(rows: dict[str, list[dict[str, float]]], buckets: list[str], reference: str = REFERENCE) -> dict[str, Any]:
    """Per variant (seed-averaged per sample, then over samples) and paired against ``reference``, overall and per
    bucket. ``buckets[i]`` is held-out sample ``i``'s bucket."""
    n = len(buckets)
    labels = np.array(buckets)
    names = sorted(set(buckets), key=list(BUCKETS).index)
    means = {v: {k: per_sample(rs, n, k) for k in METRICS} for v, rs in rows.items()}
    out: dict[str, Any] = {"variants": {}, "variants_by_bucket": {}, "paired": {}}
    for v, m in means.items():
        out["variants"][v] = {k: mean_ci(m[k]) for k in METRICS}
        out["variants_by_bucket"][v] = {b: {k: mean_ci(m[k][labels == b]) for k in METRICS} for b in names}
    if reference in means:
        ref = means[reference]
        for v, m in means.items():
            if v == reference or v in ("vae_oracle",):
                continue
            entry = {"vs": reference, **{k: paired(m[k], ref[k]) for k in PAIRED_METRICS}}
            entry["by_bucket"] = {
                b: {k: paired(m[k][labels == b], ref[k][labels == b]) for k in PAIRED_METRICS} for b in names
            }
            out["paired"][v] = entry
    return out


def run_config(out: Path, model: str, data: Path, cache: Path, s: Settings, variant: str, seed: int) -> dict:
    """The trainer config of one LoRA run (a plain dict, as a YAML file would give it)."""
    loss = VARIANTS[variant]
    return {
        "output_dir": str(out),
        "model": {"pretrained_model_name_or_path": model, "dtype": "float32", "max_sequence_length": 32},
        "data": {"root": str(data), "resolution": s.size, "mask_hint": "fill", "cache_dir": str(cache)},
        "lora": {"rank": s.rank, "alpha": s.rank},
        "train": {
            "max_steps": s.steps,
            "batch_size": s.batch_size,
            "learning_rate": s.learning_rate,
            "lr_scheduler": "constant_with_warmup",
            "lr_warmup_steps": 10,
            "seed": seed,
        },
        "loss": loss,
        "checkpoint": {"every_steps": 0, "overwrite_output_dir": True},
        "validation": {"every_steps": -1},
        "logging": {"report_to": "none"},
    }


def train_lora(cfg_dict: dict) -> float:
    """Train one LoRA with the project's trainer; returns the seconds it took."""
    import train_kontext_lora as tk

    t0 = time.perf_counter()
    run = tk.run_training(config_from_dict(cfg_dict))
    if run.stop_reason != "done":
        raise RuntimeError(f"training stopped early ({run.stop_reason}) for {cfg_dict['output_dir']}")
    return time.perf_counter() - t0


def resolved_loss(loss: dict[str, Any]) -> dict[str, Any]:
    """A variant's ``loss`` section with every schema default filled in (``{}`` is the trainer's default)."""
    return config_to_dict(config_from_dict({"loss": loss}))["loss"]


def finished_run(cfg_dict: dict) -> bool:
    """Whether ``cfg_dict``'s output folder holds a finished LoRA trained with the same loss, LoRA, schedule and
    data (its ``config.yaml``): an interrupted benchmark then trains only what is missing."""
    import yaml

    out = Path(cfg_dict["output_dir"])
    if not (out / "pytorch_lora_weights.safetensors").is_file() or not (out / "config.yaml").is_file():
        return False
    done = yaml.safe_load((out / "config.yaml").read_text())
    want = config_to_dict(config_from_dict(cfg_dict))
    same = done["loss"] == want["loss"] and done["lora"] == want["lora"]
    same &= all(done["train"][k] == want["train"][k] for k in ("max_steps", "batch_size", "learning_rate", "seed"))
    return same and all(done["data"][k] == want["data"][k] for k in ("root", "resolution", "mask_hint"))


def evaluate(pipe: Any, samples: list, prompt: str, s: Settings) -> list[dict[str, float]]:
    """Generate once per held-out sample and measure the product's box and the change mask."""
    from kontext.runtime.generation import generate, quiet_progress

    rows = []
    with quiet_progress(pipe):
        for k, smp in enumerate(samples):  # sample k uses seed 1000 + k, whatever the LoRA
            g = generate(
                pipe, smp.context, prompt, smp.mask, mask_hint="fill", seed=1000 + k,
                num_inference_steps=s.inference_steps, guidance_scale=s.guidance, max_sequence_length=32,
            )
            rows.append(measure(np.asarray(g.images[0]), smp))
    return rows


@torch.no_grad()
def vae_oracle(pipe: Any, samples: list) -> list[dict[str, float]]:
    """The targets after a VAE round trip, measured like a generation: the best any LoRA can score through this
    VAE (its blur and colour shifts reach the product detector and the change mask as well)."""
    from kontext.runtime.flux import decode_latents, encode_images
    from kontext.runtime.generation import pil_to_tensor, to_pil

    return [
        measure(np.asarray(to_pil(decode_latents(pipe.vae, encode_images(pipe.vae, pil_to_tensor(smp.target))))[0]), smp)
        for smp in samples
    ]


def measure(result: np.ndarray, smp: Any) -> dict[str, float]:
    """One result ``[H, W, 3]`` (0..255) for held-out sample ``smp``: the product's box (:func:`footprint_row`),
    the mask's area share and the change-mask metrics of :mod:`kontext.evaluation.metrics` against the sample's context."""
    from kontext.evaluation.metrics import sample_metrics

    ctx = np.asarray(smp.context.convert("RGB"))
    mask = np.asarray(smp.mask.convert("L")) >= 128
    cm = sample_metrics(result / 255.0, ctx / 255.0, mask)
    return footprint_row(result, ctx, mask) | {
        "mask_area": float(mask.mean()), "psnr_outside": cm.psnr_outside, "change_iou": cm.iou,
        "boundary_f": cm.boundary_f,
    }


def _box_area(b: tuple[float, float, float, float]) -> float:
    return max(b[2] - b[0], 0.0) * max(b[3] - b[1], 0.0)


def footprint_row(image: np.ndarray, scene: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """The product's box in ``image`` (:func:`data.synthetic.product_box`, searched within the mask's box widened
    by its own size on every side, so a product up to 3x too large is still found) against the mask's box:
    ``area_ratio``, ``area_log_error`` (|ln((A_product + 1) / (A_mask + 1))|, a missing product counts as
    area 0), box ``iou``, ``found`` (0/1) and, where found, the signed ``log_area_ratio_found`` (negative: too
    small) and its absolute value ``area_log_error_found`` (NaN where not found)."""
    from data.synthetic import product_box

    ys, xs = np.nonzero(mask)
    mb = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    w, h = mb[2] - mb[0], mb[3] - mb[1]
    found = product_box(image, scene, near=(mb[0] - w, mb[1] - h, mb[2] + w, mb[3] + h))
    a_m = _box_area(mb)
    if found is None:
        return {"area_ratio": 0.0, "area_log_error": abs(math.log(1.0 / (a_m + 1.0))), "iou": 0.0, "found": 0.0,
                "area_log_error_found": math.nan, "log_area_ratio_found": math.nan}
    a_p = _box_area(found)
    inter = _box_area((max(found[0], mb[0]), max(found[1], mb[1]), min(found[2], mb[2]), min(found[3], mb[3])))
    log_ratio = math.log((a_p + 1.0) / (a_m + 1.0))
    return {
        "area_ratio": a_p / a_m,
        "area_log_error": abs(log_ratio),
        "iou": inter / (a_p + a_m - inter),
        "found": 1.0,
        "area_log_error_found": abs(log_ratio),
        "log_area_ratio_found": log_ratio,
    }


def load_heldout(folder: Path) -> tuple[list, str]:
    """Held-out samples of a folder in the training layout (validated), and their prompt."""
    from data import open_source, validate_source
    from data.synthetic import PRODUCT_PROMPT

    src = open_source("folder", str(folder), default_prompt=PRODUCT_PROMPT)
    validate_source(src, progress=False)
    samples = [src.load(i) for i in range(len(src))]
    return samples, src.prompt(0)


def scatter_plot(series: dict[str, list[tuple[float, float]]], path: Path) -> None:
    """Footprint area ratio against mask area (log-log) per variant, drawn with Pillow."""
    from PIL import Image, ImageDraw

    from kontext.evaluation.grid import font
    from kontext.evaluation.plot import SERIES_COLORS

    W, H, L, R, T, B = 760, 460, 70, 150, 30, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    f = font(12)
    xlo, xhi, ylo, yhi = math.log(0.008), math.log(0.4), math.log(0.1), math.log(4.0)

    def xy(x: float, y: float) -> tuple[float, float]:
        px = L + (math.log(x) - xlo) / (xhi - xlo) * (W - L - R)
        py = H - B - (math.log(min(max(y, 0.1), 4.0)) - ylo) / (yhi - ylo) * (H - T - B)
        return px, py

    for yv in (0.25, 0.5, 1.0, 2.0):
        _, py = xy(0.01, yv)
        d.line([(L, py), (W - R, py)], fill=(200, 0, 0) if yv == 1.0 else (225, 225, 225))
        d.text((L - 40, py - 7), f"{yv:g}", fill="black", font=f)
    for xv in (0.01, 0.02, 0.05, 0.1, 0.2):
        px, _ = xy(xv, 1.0)
        d.line([(px, T), (px, H - B)], fill=(235, 235, 235))
        d.text((px - 10, H - B + 6), f"{xv:.0%}", fill="black", font=f)
    for lo, hi in (TRAIN_AREAS,):
        (x0, _), (x1, _) = xy(lo, 1.0), xy(hi, 1.0)
        d.rectangle([x0, H - B - 4, x1, H - B], fill=(180, 180, 180))
    d.rectangle([L, T, W - R, H - B], outline="black")
    d.text((L, 8), "product box area / mask box area vs mask area (grey: training band)", fill="black", font=f)
    d.text((W // 2 - 40, H - 22), "mask area (share of image)", fill="black", font=f)
    for i, (name, pts) in enumerate(series.items()):
        c = SERIES_COLORS[i % len(SERIES_COLORS)]
        for x, y in pts:
            if x > 0 and np.isfinite(y):
                px, py = xy(x, max(y, 1e-3))
                d.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=c)
        d.rectangle([W - R + 12, T + 18 * i + 4, W - R + 22, T + 18 * i + 14], fill=c)
        d.text((W - R + 28, T + 18 * i + 2), name, fill="black", font=f)
    img.save(path)


def _cell(e: dict[str, Any], fmt: str = ".3f") -> str:
    if e["mean"] is None:
        return "n/a"
    if e["ci95"][0] is None:
        return f"{e['mean']:{fmt}} (n={e['n']})"
    return f"{e['mean']:{fmt}} [{e['ci95'][0]:{fmt}}, {e['ci95'][1]:{fmt}}]"


def write_report(out: Path, summary: dict, timings: dict) -> None:
    """``report.md``: the design, the oracle per bucket, each variant per bucket, and the paired differences."""
    st = summary["settings"]
    lines = [
        "# Scale fidelity",
        "",
        f"Settings: `{json.dumps(st)}`",
        "",
        "The held-out sample is the unit: each sample's metrics are averaged over seeds first, then the mean and "
        "its 95 % Student-t interval over samples. Product: the product found by its orange body in each "
        "generated image, against the mask's box. `|log area|`: |ln(product box area / mask box area)|, a miss "
        "counting as area 0; `found`: share of samples x seeds where the product was found; `log area where "
        "found`: signed (negative = too small).",
        "",
        "## VAE oracle per bucket (the true targets through the VAE)",
        "",
        r"| bucket | mask areas | found | \|log area\| | kept |",
        "|---|---|---|---|---|",
    ]
    for b, o in summary["oracle_by_bucket"].items():
        kept = "yes" if b in summary["buckets_kept"] else f"no (found < {ORACLE_MIN_FOUND})"
        lines.append(f"| {b} | {summary['buckets'][b]} | {_cell(o['found'])} | {_cell(o['area_log_error'])} | {kept} |")
    cols = ("area_log_error", "found", "log_area_ratio_found", "psnr_outside", "iou", "change_iou")
    head = r"| variant | \|log area\| | found | log area where found | PSNR outside (dB) | box IoU | change IoU |"
    for b in summary["buckets_kept"]:
        lines += ["", f"## Bucket `{b}` ({summary['buckets'][b]})", "", head, "|---|---|---|---|---|---|---|"]
        for name, m in summary["variants_by_bucket"].items():
            lines.append(f"| {name} | " + " | ".join(_cell(m[b][k]) for k in cols) + " |")
    lines += [
        "",
        f"## Paired: each variant minus `{REFERENCE}`, per held-out sample",
        "",
        r"Negative \|log area\| is better; positive found is better; PSNR outside: negative is more drift.",
        "",
        r"| variant | bucket | \|log area\| | found | log area where found | PSNR outside (dB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in summary["paired"].items():
        lines.append(f"| {name} | all | " + " | ".join(_cell(p[k]) for k in ("area_log_error", "found", "log_area_ratio_found", "psnr_outside")) + " |")
        for b, pb in p["by_bucket"].items():
            lines.append(f"| {name} | {b} | " + " | ".join(_cell(pb[k]) for k in ("area_log_error", "found", "log_area_ratio_found", "psnr_outside")) + " |")
    lines += ["", "![area ratio against mask size](area_vs_mask.png)", "", "Timings (s): " + json.dumps(timings)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def heldout_design(out: Path, s: Settings) -> tuple[list, list[str], str]:
    """The held-out samples of every bucket (``s.heldout_per_bucket`` each, split evenly over a bucket's area
    ranges) and each sample's bucket name, written under ``out/data/heldout-*``; and their prompt."""
    samples, labels, prompt = [], [], ""
    for bi, (name, ranges) in enumerate(BUCKETS.items()):
        per = [s.heldout_per_bucket // len(ranges) + (i < s.heldout_per_bucket % len(ranges)) for i in range(len(ranges))]
        for ri, (rng, n) in enumerate(zip(ranges, per)):
            folder = generate_dataset(out / "data" / f"heldout-{name}-{ri}", n, s.size, seed=1 + 10 * bi + ri,
                                      area_range=rng, progress=False)
            got, prompt = load_heldout(folder)
            samples += got
            labels += [name] * len(got)
    return samples, labels, prompt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, seeds and steps (at most 30 minutes)")
    parser.add_argument("--heldout", type=Path, help="held-out folder in the training layout (python -m data.synthetic); one bucket")
    parser.add_argument("--out", type=Path, default=Path("outputs/scale_fidelity"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--size", type=int, help="resolution in pixels (default 256)")
    parser.add_argument("--steps", type=int, help="training steps per LoRA (overrides the mode's)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (overrides the mode's)")
    parser.add_argument("--heldout-per-bucket", type=int, help="held-out samples per bucket (overrides the mode's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    import diffusers
    from tqdm.auto import tqdm

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected here
    torch.set_num_threads(args.threads)
    s = dataclasses.replace(QUICK if args.quick else FULL)
    for key in ("size", "steps", "seeds", "heldout_per_bucket"):
        if getattr(args, key):
            setattr(s, key, getattr(args, key))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    from diffusers import FluxKontextPipeline

    from kontext.tiny.model import resolve_model_path

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model_path(args.model, "--model")
    train_dir = generate_dataset(out / "data" / "train", s.train_samples, s.size, seed=0, area_range=TRAIN_AREAS,
                                 aspect_range=TRAIN_ASPECT, progress=False)
    if args.heldout:
        heldout, prompt = load_heldout(args.heldout)
        labels = ["in_band"] * len(heldout)
    else:
        heldout, labels, prompt = heldout_design(out, s)

    # The design is settled before any variant runs: buckets the VAE cannot render are dropped here.
    pipe = FluxKontextPipeline.from_pretrained(model, dtype=torch.float32)
    oracle_rows = vae_oracle(pipe, heldout)
    oracle_by_bucket = {}
    for b in sorted(set(labels), key=list(BUCKETS).index):
        idx = [i for i, lab in enumerate(labels) if lab == b]
        oracle_by_bucket[b] = {k: mean_ci([oracle_rows[i][k] for i in idx]) for k in ("found", "area_log_error")}
    kept = [b for b, o in oracle_by_bucket.items() if o["found"]["mean"] >= ORACLE_MIN_FOUND]
    keep = [i for i, lab in enumerate(labels) if lab in kept]
    heldout, labels, oracle_rows = [heldout[i] for i in keep], [labels[i] for i in keep], [oracle_rows[i] for i in keep]
    if not heldout:
        raise SystemExit(f"the VAE oracle finds the product in under {ORACLE_MIN_FOUND:.0%} of every bucket at {s.size} px")

    runs = [(v, seed) for seed in range(s.seeds) for v in variants]  # interleaved: a load change hits every variant
    timings: dict[str, float] = {}
    bar = tqdm(total=len(runs) * 2 + 1, desc="scale fidelity", unit="job")
    for v, seed in runs:
        bar.set_postfix_str(f"train {v} seed {seed}")
        cfg = run_config(out / "runs" / f"{v}-s{seed}", model, train_dir, out / "cache", s, v, seed)
        if not finished_run(cfg):
            timings[f"train/{v}-s{seed}"] = round(train_lora(cfg), 1)
        bar.update(1)

    rows: dict[str, list[dict[str, float]]] = {"vae_oracle": oracle_rows * s.seeds}
    t0 = time.perf_counter()
    bar.set_postfix_str("evaluate base")
    rows["base"] = evaluate(pipe, heldout, prompt, s) * s.seeds  # no LoRA: the same images under every seed
    timings["eval/base"] = round(time.perf_counter() - t0, 1)
    bar.update(1)
    for v, seed in runs:
        bar.set_postfix_str(f"evaluate {v} seed {seed}")
        t0 = time.perf_counter()
        name = f"{v}_s{seed}"
        pipe.load_lora_weights(str(out / "runs" / f"{v}-s{seed}"), adapter_name=name)
        pipe.set_adapters([name], [1.0])
        rows.setdefault(v, []).extend(evaluate(pipe, heldout, prompt, s))
        pipe.delete_adapters(name)
        timings[f"eval/{v}-s{seed}"] = round(time.perf_counter() - t0, 1)
        bar.update(1)
    bar.close()

    n = len(heldout)
    summary = {
        "settings": {**vars(s), "variants": variants, "reference": REFERENCE, "train_areas": TRAIN_AREAS,
                     "train_aspect": TRAIN_ASPECT, "heldout": str(args.heldout) if args.heldout else "synthetic, per bucket",
                     "heldout_samples": n, "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                     # Resolved through the schema: `default` is spelled out as what a user gets.
                     "variant_losses": {v: resolved_loss(VARIANTS[v]) for v in variants}},
        "buckets": {"in_band": list(BUCKETS["in_band"][0]), "extrapolation": [list(r) for r in BUCKETS["extrapolation"]]},
        "buckets_kept": kept,
        "oracle_by_bucket": oracle_by_bucket,
        "oracle": {k: mean_ci(per_sample(rows["vae_oracle"], n, k)) for k in ("area_log_error", "iou", "found")},
        **summarise(rows, labels),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "per_sample.json").write_text(json.dumps({"buckets": labels, "rows": rows}, indent=1))
    scatter_plot({n_: [(r["mask_area"], r["area_ratio"]) for r in rs] for n_, rs in rows.items()}, out / "area_vs_mask.png")
    write_report(out, summary, timings)
    print((out / "report.md").read_text())
    return summary


if __name__ == "__main__":
    main()
