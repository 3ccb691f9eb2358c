"""Scale fidelity: does a product LoRA paint the product at the mask's size? Variants side by side.

Trains product LoRAs on the embedded tiny FLUX.1 Kontext (pretrained on a general insertion task) with the
project's own trainer, then generates on held-out masks and measures where the product landed:

- variants: ``plain`` (flow loss only, what every peer trainer does), ``masked`` (mask-weighted flow loss, as
  kohya, OneTrainer and SimpleTuner offer), ``seed`` (the specification's geometry composition), ``geometry``
  (the default calibrated geometry terms); the base model without a LoRA is measured too;
- the training set's masks lie in a narrow band of sizes (areas 4-8 % of the image, box aspect 0.7-1.4); the
  held-out masks' sides range from 0.5x to 2x those (areas 1-32 %) at aspect ratios 0.35-2.8, so a LoRA that
  paints the product at its habitual size whatever the mask is caught;
- the product is found in every generated image by its known appearance (:func:`data.synthetic.product_box`,
  its box estimated from the orange body, which survives the tiny model's blur; on the ground-truth targets
  it recovers the mask's box, reported as ``oracle``), besides the change-mask metrics of
  :mod:`kontext.tools.metrics`;
- per variant: mean and 95 % confidence interval (normal approximation over samples x seeds) of the
  product box's |log area ratio| and IoU against the mask's box, the change mask's boundary F and IoU, and
  PSNR outside the mask.

Writes ``summary.json``, ``report.md`` and ``area_vs_mask.png`` into ``--out``::

    python benchmarks/scale_fidelity.py --quick              # about 10 minutes on 2 CPU cores
    python benchmarks/scale_fidelity.py                      # the full comparison (about 45 minutes)
    python benchmarks/scale_fidelity.py --heldout DIR        # evaluate on a folder in the training layout
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {"geometry": {"enabled": False}},
    "masked": {"geometry": {"enabled": False}, "masked": {"enabled": True}},
    "seed": {"geometry": {"enabled": True, "formulation": "seed"}},
    "geometry": {"geometry": {"enabled": True, "formulation": "calibrated"}},
    # Ablation, not in the default set: the calibrated terms without the (1 - sigma) noise-level weight.
    "geometry_unweighted": {"geometry": {"enabled": True, "formulation": "calibrated", "noise_weighting": "none"}},
    # Ablation: the size-bearing terms (area, boundary) weighted up to a gradient share comparable to Dice's.
    "geometry_balanced": {"geometry": {"enabled": True, "formulation": "calibrated", "area": 2.0, "boundary": 10.0}},
    # The same, with the geometry total three times the flow loss's gradient scale.
    "geometry_balanced_x3": {
        "geometry": {"enabled": True, "formulation": "calibrated", "area": 2.0, "boundary": 10.0, "weight": 3.0}
    },
}
DEFAULT_VARIANTS = ("plain", "masked", "seed", "geometry")
METRICS = ("area_log_error", "iou", "found", "area_log_error_found", "boundary_f", "psnr_outside", "change_iou")
TRAIN_AREAS, TRAIN_ASPECT = (0.04, 0.08), (0.7, 1.4)
HELDOUT_AREAS = (0.01, 0.32)  # sides 0.5x-2x of the training band's


@dataclass
class Settings:
    train_samples: int
    heldout_samples: int
    seeds: int
    steps: int
    batch_size: int = 4
    rank: int = 16
    learning_rate: float = 1e-3
    inference_steps: int = 12
    guidance: float = 2.5
    size: int = 128


QUICK = Settings(train_samples=24, heldout_samples=16, seeds=2, steps=400)
FULL = Settings(train_samples=48, heldout_samples=40, seeds=3, steps=1200)


def mean_ci(values: np.ndarray) -> dict[str, Any]:
    """Mean and 95 % normal-approximation interval of the finite values: ``{"mean", "ci95": [lo, hi], "n"}``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "ci95": [None, None], "n": 0}
    m = float(v.mean())
    half = 1.96 * float(v.std(ddof=1)) / math.sqrt(v.size) if v.size > 1 else 0.0
    return {"mean": m, "ci95": [m - half, m + half], "n": int(v.size)}


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
    from kontext.training.config import config_from_dict

    t0 = time.perf_counter()
    run = tk.run_training(config_from_dict(cfg_dict))
    if run.stop_reason != "done":
        raise RuntimeError(f"training stopped early ({run.stop_reason}) for {cfg_dict['output_dir']}")
    return time.perf_counter() - t0


def evaluate(pipe: Any, samples: list, prompt: str, s: Settings) -> list[dict[str, float]]:
    """Generate once per held-out sample and measure the product's box and the change mask."""
    from kontext.runtime.generation import generate, quiet_progress

    rows = []
    with quiet_progress(pipe):
        for k, smp in enumerate(samples):
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
    the mask's area share and the change-mask metrics of :mod:`kontext.tools.metrics` against the sample's context."""
    from kontext.tools.metrics import sample_metrics

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
    area 0) and box ``iou``."""
    from data.synthetic import product_box

    ys, xs = np.nonzero(mask)
    mb = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    w, h = mb[2] - mb[0], mb[3] - mb[1]
    found = product_box(image, scene, near=(mb[0] - w, mb[1] - h, mb[2] + w, mb[3] + h))
    a_m = _box_area(mb)
    if found is None:
        return {"area_ratio": 0.0, "area_log_error": abs(math.log(1.0 / (a_m + 1.0))), "iou": 0.0, "found": 0.0,
                "area_log_error_found": math.nan}
    a_p = _box_area(found)
    inter = _box_area((max(found[0], mb[0]), max(found[1], mb[1]), min(found[2], mb[2]), min(found[3], mb[3])))
    return {
        "area_ratio": a_p / a_m,
        "area_log_error": abs(math.log((a_p + 1.0) / (a_m + 1.0))),
        "iou": inter / (a_p + a_m - inter),
        "found": 1.0,
        "area_log_error_found": abs(math.log((a_p + 1.0) / (a_m + 1.0))),
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

    from kontext.tools.grid import font
    from kontext.tools.plot import SERIES_COLORS

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


def write_report(out: Path, summary: dict, timings: dict) -> None:
    lines = [
        "# Scale fidelity",
        "",
        f"Settings: `{json.dumps(summary['settings'])}`",
        "",
        "Mean and 95 % confidence interval over held-out samples x seeds. Product box: the product found by its",
        "orange body in each generated image, against the mask's box; change: `kontext.tools.metrics` change mask.",
        "",
        "| variant | product \\|log area ratio\\| (lower is better) | product box IoU | product found | \\|log area ratio\\| where found | change boundary F | PSNR outside (dB) | change IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in summary["variants"].items():
        cells = []
        for k in METRICS:
            e = m[k]
            cells.append("n/a" if e["mean"] is None else f"{e['mean']:.3f} [{e['ci95'][0]:.3f}, {e['ci95'][1]:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "![area ratio against mask size](area_vs_mask.png)", "", "Timings (s): " + json.dumps(timings)]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, seeds and steps (about 10 minutes)")
    parser.add_argument("--heldout", type=Path, help="held-out folder in the training layout (python -m data.synthetic)")
    parser.add_argument("--out", type=Path, default=Path("outputs/scale_fidelity"))
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, help="training steps per LoRA (overrides the mode's)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (overrides the mode's)")
    parser.add_argument("--heldout-samples", type=int, help="held-out samples (overrides the mode's)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--model", default="tiny")
    args = parser.parse_args(argv)
    import diffusers
    from tqdm.auto import tqdm

    diffusers.utils.logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected here
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    if args.steps:
        s.steps = args.steps
    if args.seeds:
        s.seeds = args.seeds
    if args.heldout_samples:
        s.heldout_samples = args.heldout_samples
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")

    from diffusers import FluxKontextPipeline

    from data.synthetic import generate_dataset
    from kontext.runtime.model_path import resolve_model_path

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = resolve_model_path(args.model, "--model")
    train_dir = generate_dataset(out / "data" / "train", s.train_samples, s.size, seed=0, area_range=TRAIN_AREAS,
                                 aspect_range=TRAIN_ASPECT, progress=False)
    if args.heldout:
        heldout, prompt = load_heldout(args.heldout)
        heldout = heldout[: s.heldout_samples] if args.quick else heldout
    else:
        held = generate_dataset(out / "data" / "heldout", s.heldout_samples, s.size, seed=1, area_range=HELDOUT_AREAS,
                                progress=False)
        heldout, prompt = load_heldout(held)
    oracle = [footprint_row(np.asarray(x.target.convert("RGB")), np.asarray(x.context.convert("RGB")),
                            np.asarray(x.mask.convert("L")) >= 128) for x in heldout]

    runs = [(v, seed) for v in variants for seed in range(s.seeds)]
    timings: dict[str, float] = {}
    bar = tqdm(total=len(runs) * 2 + 1, desc="scale fidelity", unit="job")
    for v, seed in runs:
        bar.set_postfix_str(f"train {v} seed {seed}")
        cfg = run_config(out / "runs" / f"{v}-s{seed}", model, train_dir, out / "cache", s, v, seed)
        timings[f"train/{v}-s{seed}"] = round(train_lora(cfg), 1)
        bar.update(1)

    pipe = FluxKontextPipeline.from_pretrained(model, dtype=torch.float32)
    rows: dict[str, list[dict[str, float]]] = {"vae_oracle": vae_oracle(pipe, heldout)}
    t0 = time.perf_counter()
    bar.set_postfix_str("evaluate base")
    rows["base"] = evaluate(pipe, heldout, prompt, s)
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

    summary = {
        "settings": {**vars(s), "variants": variants, "train_areas": TRAIN_AREAS, "train_aspect": TRAIN_ASPECT,
                     "heldout": str(args.heldout) if args.heldout else f"synthetic, areas {HELDOUT_AREAS}",
                     "threads": torch.get_num_threads()},
        "oracle": {k: mean_ci(np.array([r[k] for r in oracle])) for k in ("area_log_error", "iou")},
        "variants": {name: {k: mean_ci(np.array([r[k] for r in rs])) for k in METRICS} for name, rs in rows.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "per_sample.json").write_text(json.dumps(rows, indent=1))
    scatter_plot({n: [(r["mask_area"], r["area_ratio"]) for r in rs] for n, rs in rows.items()}, out / "area_vs_mask.png")
    write_report(out, summary, timings)
    print((out / "report.md").read_text())
    print(f"oracle (segmenting the targets): {summary['oracle']}")
    return summary


if __name__ == "__main__":
    main()
