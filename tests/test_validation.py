"""Training-time validation on the real tiny pipeline: the grid, the metrics, the TensorBoard log."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import TripletDataset, open_source
from kontext.config import config_from_dict
from kontext.generation import to_pil
from kontext.grid import mask_outline, outline_width_for
from kontext.metrics import sample_metrics
from kontext.validation import GRID_COLUMNS, run_validation

SIZE = 64
N = 3


@pytest.fixture(scope="module")
def lora_pipe(tiny_model_dir: Path):
    """The tiny pipeline with a random (non-zero) LoRA on its transformer, as the trainer holds it."""
    from diffusers import FluxKontextPipeline

    from kontext.lora import attach_lora, make_lora_config

    pipe = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    torch.manual_seed(0)
    params = attach_lora(pipe.transformer, make_lora_config(4, 4.0, 0.0, "gaussian", ["attn.to_q", "attn.to_v", "proj_mlp"]))
    # PEFT starts lora_B at zero (no effect); a trained LoRA is not zero
    for p in params:
        p.data.normal_(0.0, 0.2)
    return pipe


@pytest.fixture(scope="module")
def dataset(tiny_dataset_dir: Path) -> TripletDataset:
    return TripletDataset(open_source("folder", tiny_dataset_dir), resolution=SIZE, mask_hint="fill", with_geometry=False)


def _cfg(tmp_path: Path):
    return config_from_dict(
        {
            "output_dir": str(tmp_path),
            "model": {"max_sequence_length": 64},
            "validation": {"num_samples": N, "num_inference_steps": 2, "guidance_scale": 2.5, "seed": 7},
        }
    )


def _cells(grid: Image.Image, rows: int, cols: int, w: int, h: int) -> list[list[np.ndarray]]:
    a = np.asarray(grid)
    return [[a[r * h : (r + 1) * h, c * w : (c + 1) * w] for c in range(cols)] for r in range(rows)]


def test_validation_grid_metrics_and_tensorboard(lora_pipe, dataset, tmp_path):
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")),
    )
    acc.init_trackers("val-test")
    cfg = _cfg(tmp_path)
    transformer = lora_pipe.transformer
    metrics = run_validation(lora_pipe, transformer, dataset, cfg, 5, tmp_path, acc)
    acc.end_training()
    assert lora_pipe.transformer is transformer

    # grid: N rows of 64 px, 4 columns
    path = tmp_path / "validation" / "step-5.png"
    grid = Image.open(path).convert("RGB")
    assert grid.size == (len(GRID_COLUMNS) * SIZE, N * SIZE)
    cells = _cells(grid, N, len(GRID_COLUMNS), SIZE, SIZE)

    per_sample = []
    for i in range(N):
        prepared = dataset.prepared_pixels(i, flip=False)
        hinted = np.asarray(to_pil(prepared["context_pixels"])[0], dtype=np.int16)
        target = np.asarray(to_pil(prepared["target_pixels"])[0], dtype=np.int16)
        context_col, result_col, target_col, outline_col = (c.astype(np.int16) for c in cells[i])
        # column 0 is the context with the training hint (same code as the dataset), column 2 the target
        assert np.abs(context_col - hinted).max() <= 1
        assert np.abs(target_col - target).max() <= 1
        # column 3 is column 1 with the mask contour painted red, and nothing else
        m = prepared["mask_px"][0].numpy() >= 0.5
        ring = mask_outline(m, outline_width_for((SIZE, SIZE)))
        assert ring.any()
        assert np.array_equal(outline_col[~ring], result_col[~ring])
        assert (outline_col[ring] == np.array([255, 32, 32])).all()
        # the metrics are computed on the generated image against the UN-hinted context
        raw = dataset.load_raw(i)
        from data import prepare_sample

        p = prepare_sample(raw, (SIZE, SIZE))
        ctx = np.asarray(to_pil(p["context"])[0])
        per_sample.append(sample_metrics(result_col.astype(np.uint8), ctx, m, target.astype(np.uint8)))

    for key in ("iou", "area_ratio", "area_log_error", "boundary_f", "psnr_outside", "ssim_outside", "psnr_inside"):
        expected = float(np.mean([getattr(s, key) for s in per_sample]))
        assert metrics[f"val/{key}"] == pytest.approx(expected, rel=1e-6, abs=1e-9), key
    for key in ("latent_iou", "latent_area_ratio", "latent_boundary_f", "psnr_outside", "iou"):
        assert math.isfinite(metrics[f"val/{key}"]), key
    assert metrics["val/count"] == N

    # TensorBoard: every scalar at step 5 and the grid image
    logs = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert logs and all(p.stat().st_size > 0 for p in logs)
    ea = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    tags = ea.Tags()
    assert "val/iou" in tags["scalars"] and "val/latent_iou" in tags["scalars"]
    (event,) = ea.Scalars("val/iou")
    assert event.step == 5 and event.value == pytest.approx(metrics["val/iou"], rel=1e-5)
    assert "val/grid" in tags["images"]
    (img_event,) = ea.Images("val/grid")
    assert (img_event.width, img_event.height) == grid.size and img_event.step == 5


def test_validation_is_repeatable_and_sees_the_lora(lora_pipe, dataset, tmp_path):
    cfg = _cfg(tmp_path)
    cfg.validation.num_samples = 1
    t = lora_pipe.transformer
    first = run_validation(lora_pipe, t, dataset, cfg, 1, tmp_path, None)
    again = run_validation(lora_pipe, t, dataset, cfg, 2, tmp_path, None)
    a = np.asarray(Image.open(tmp_path / "validation" / "step-1.png"))
    b = np.asarray(Image.open(tmp_path / "validation" / "step-2.png"))
    assert np.array_equal(a, b)
    assert first == pytest.approx(again, nan_ok=True)
    # the same samples with the LoRA switched off give another picture: validation sees the current LoRA
    t.disable_adapters()
    try:
        run_validation(lora_pipe, t, dataset, cfg, 3, tmp_path, None)
    finally:
        t.enable_adapters()
    c = np.asarray(Image.open(tmp_path / "validation" / "step-3.png"))
    assert not np.array_equal(a[:, SIZE : 2 * SIZE], c[:, SIZE : 2 * SIZE])
    assert np.array_equal(a[:, :SIZE], c[:, :SIZE])  # same hinted context
