"""Training-time validation on the real tiny pipeline: the grid, the metrics, the TensorBoard log."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data import TripletDataset, open_source, validation_split
from kontext.evaluation.grid import HEADER_HEIGHT, mask_outline, outline_width_for
from kontext.evaluation.metrics import METRIC_FIELDS, sample_metrics
from kontext.evaluation.score import generate_and_score
from kontext.runtime.generation import mask_array, to_pil
from kontext.training.config import config_from_dict
from kontext.training.validation import GRID_COLUMNS, run_validation, validation_samples

SIZE = 64
N = 3


@pytest.fixture(scope="module")
def lora_pipe(tiny_model_dir: Path):
    """The tiny pipeline with a random (non-zero) LoRA on its transformer, as the trainer holds it."""
    from diffusers import FluxKontextPipeline

    from kontext.runtime.lora import attach_lora, make_lora_config

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


def _cells(grid: Image.Image, rows: int, cols: int, w: int, h: int, top: int = HEADER_HEIGHT) -> list[list[np.ndarray]]:
    a = np.asarray(grid)
    return [[a[top + r * h : top + (r + 1) * h, c * w : (c + 1) * w] for c in range(cols)] for r in range(rows)]


def _tensorboard_accelerator(tmp_path, run_name: str):
    """An accelerator logging to TensorBoard under ``tmp_path/logs``, its trackers started as ``run_name``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    acc = Accelerator(
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")),
    )
    acc.init_trackers(run_name)
    return acc


def test_validation_grid_metrics_and_tensorboard(lora_pipe, dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = _tensorboard_accelerator(tmp_path, "val-test")
    cfg = _cfg(tmp_path)
    transformer = lora_pipe.transformer
    metrics = run_validation(lora_pipe, transformer, dataset, cfg, 5, tmp_path, acc)
    acc.end_training()
    assert lora_pipe.transformer is transformer

    # grid: a header naming the 4 columns, then N rows of 64 px
    assert GRID_COLUMNS == ("context", "result", "target", "overlay")
    path = tmp_path / "validation" / "step-5.png"
    grid = Image.open(path).convert("RGB")
    assert grid.size == (len(GRID_COLUMNS) * SIZE, HEADER_HEIGHT + N * SIZE)
    header = np.asarray(grid)[:HEADER_HEIGHT]
    for c in range(len(GRID_COLUMNS)):  # every column has its label (dark text on white)
        assert (header[:, c * SIZE : (c + 1) * SIZE] < 128).any(), GRID_COLUMNS[c]
    cells = _cells(grid, N, len(GRID_COLUMNS), SIZE, SIZE)

    per_sample = []
    for i in range(N):
        prepared = dataset.prepared_pixels(i, flip=False)
        hinted = np.asarray(to_pil(prepared.context)[0], dtype=np.int16)
        target = np.asarray(to_pil(prepared.target)[0], dtype=np.int16)
        context_col, result_col, target_col, outline_col = (c.astype(np.int16) for c in cells[i])
        # column 0 is the context with the training hint (same code as the dataset), column 2 the target
        assert np.abs(context_col - hinted).max() <= 1
        assert np.abs(target_col - target).max() <= 1
        # column 3 is column 1 with the mask contour painted red, and nothing else
        m = prepared.mask[0].numpy() >= 0.5
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
    assert np.array_equal(a[:, :SIZE], c[:, :SIZE])  # same hinted context (and header)


# ---------------------------------------------------------------- grid size cap


def test_generate_and_score_measures_as_sample_metrics_does(lora_pipe, dataset):
    # Validation and `evaluate` both score through generate_and_score, which keeps the change mask for pictures:
    # its metrics must be those sample_metrics computes on its own, threshold included.
    sample = validation_samples(dataset, 1)[0]
    scored = generate_and_score(
        lora_pipe, sample["context"], sample["prompt"], sample["mask"], sample["target"], mask_hint="fill", seed=3,
        num_inference_steps=2, guidance_scale=2.5, max_sequence_length=64,
    )
    plain = sample_metrics(scored.result, sample["context"], mask_array(sample["mask"]), sample["target"])
    assert scored.pixel.as_dict() == pytest.approx(plain.as_dict(), nan_ok=True)
    assert float(scored.change.mask.sum()) == plain.changed_area
    assert list(scored.row())[: len(METRIC_FIELDS)] == list(METRIC_FIELDS)
    assert all(k.startswith("latent_") for k in list(scored.row())[len(METRIC_FIELDS):])
    assert scored.generation.hinted_context.size == scored.outline.size == sample["context"].size


def test_grid_is_downscaled_to_the_cap_and_keeps_its_layout():
    from kontext.evaluation.grid import grid_cell_size, make_grid

    rng = np.random.default_rng(0)
    big = [[Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)) for _ in range(4)] for _ in range(3)]
    full = make_grid(big, GRID_COLUMNS)
    assert full.size == (4 * 128, HEADER_HEIGHT + 3 * 96)
    capped = make_grid(big, GRID_COLUMNS, max_side=256)
    assert max(capped.size) <= 256
    cw, ch = grid_cell_size((128, 96), 3, 4, HEADER_HEIGHT, 256)
    assert (cw, ch) == (64, 48)  # the wide side decides: 4 * 128 -> 256
    assert capped.size == (4 * cw, HEADER_HEIGHT + 3 * ch)
    # each cell is its image downscaled (Lanczos), in the same place
    cell = np.asarray(capped)[HEADER_HEIGHT + ch : HEADER_HEIGHT + 2 * ch, 2 * cw : 3 * cw]
    expect = np.asarray(big[1][2].resize((cw, ch), Image.Resampling.LANCZOS))
    assert np.array_equal(cell, expect)
    # a grid that fits is untouched; a tall grid is bounded by its height (header included)
    assert np.array_equal(np.asarray(make_grid(big, GRID_COLUMNS, max_side=4096)), np.asarray(full))
    tall = make_grid([[im] for im in (big[0][0],) * 6], ["x"], max_side=200)
    assert tall.size[1] <= 200 and tall.size[1] > 190
    with pytest.raises(ValueError, match="does not fit"):
        make_grid(big, GRID_COLUMNS, max_side=HEADER_HEIGHT + 2)


def test_validation_grid_respects_grid_max_side(lora_pipe, dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = _tensorboard_accelerator(tmp_path, "val-cap")
    cfg = _cfg(tmp_path)
    cfg.validation.num_samples = 2
    cfg.validation.grid_max_side = 128  # 4 x 64 px columns -> 32 px cells
    run_validation(lora_pipe, lora_pipe.transformer, dataset, cfg, 1, tmp_path, acc)
    acc.end_training()
    grid = Image.open(tmp_path / "validation" / "step-1.png")
    assert grid.size == (128, HEADER_HEIGHT + 2 * 32)
    logs = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    ea = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0})
    ea.Reload()
    (img_event,) = ea.Images("val/grid")
    assert (img_event.width, img_event.height) == grid.size


# ---------------------------------------------------------------- held-out samples


def test_holdout_withholds_the_last_samples_from_training(tiny_dataset_dir):
    from kontext.training.validation import held_out, validation_dataset

    source = open_source("folder", tiny_dataset_dir)
    cfg = config_from_dict({"data": {"root": str(tiny_dataset_dir), "resolution": SIZE}, "validation": {"holdout": 3}})
    assert held_out(cfg)
    train, held = validation_split(source, cfg.data, cfg.validation)
    n = len(source)
    assert len(train) == n - 3 and len(held) == 3
    assert train.names == source.names[: n - 3] and held.names == source.names[n - 3 :]
    assert not set(train.names) & set(held.names)
    # the parts answer for the underlying samples (same bytes, same cache fingerprints)
    assert held.fingerprint(0) == source.fingerprint(n - 3)
    assert held.load(2).name == source.names[-1] and held.prompt(1) == source.prompt(n - 2)
    assert train.size(0) == source.size(0) and "held-out" in held.describe()
    ds = validation_dataset(cfg, held)
    assert len(ds) == 3 and ds.mask_hint == cfg.data.mask_hint and ds.buckets == [(SIZE, SIZE)]
    assert ds.load_raw(0).name == source.names[n - 3]


def test_holdout_must_leave_training_samples(tiny_dataset_dir):
    from data import DatasetError

    source = open_source("folder", tiny_dataset_dir)
    cfg = config_from_dict({"data": {"root": str(tiny_dataset_dir)}, "validation": {"holdout": len(source)}})
    with pytest.raises(DatasetError, match=f"validation.holdout is {len(source)} but the dataset has {len(source)}"):
        validation_split(source, cfg.data, cfg.validation)


def test_without_holdout_or_data_root_validation_uses_training_samples(tiny_dataset_dir):
    from kontext.training.validation import held_out

    source = open_source("folder", tiny_dataset_dir)
    cfg = config_from_dict({"data": {"root": str(tiny_dataset_dir)}})
    assert not held_out(cfg)
    assert validation_split(source, cfg.data, cfg.validation) == (source, None)


def test_data_root_is_a_separate_checked_set_and_overlap_is_named(tiny_dataset_dir, tmp_path, caplog):
    import logging
    import shutil

    from data import DatasetError
    from data.synthetic import generate_dataset

    source = open_source("folder", tiny_dataset_dir)
    other = generate_dataset(tmp_path / "heldout", num_samples=3, size=(SIZE, SIZE), seed=11)
    cfg = config_from_dict({"data": {"root": str(tiny_dataset_dir)}, "validation": {"data_root": str(other)}})
    with caplog.at_level(logging.WARNING, logger="kontext.training.validation"):
        train, held = validation_split(source, cfg.data, cfg.validation)
    assert train is source and len(held) == 3 and not caplog.records
    assert {held.fingerprint(i) for i in range(3)}.isdisjoint({source.fingerprint(i) for i in range(len(source))})

    # a validation folder that copies a training sample: named in a warning
    dup = tmp_path / "dup"
    shutil.copytree(other, dup)
    name = source.names[0]
    assert name in open_source("folder", dup).names  # both sets name their samples 00000, 00001, ...
    for role in ("context", "target", "mask"):
        (path,) = [p for p in (Path(tiny_dataset_dir) / role).iterdir() if p.stem == name]
        shutil.copy(path, dup / role / path.name)  # replaces the held-out sample of the same name
    cfg.validation.data_root = str(dup)
    with caplog.at_level(logging.WARNING, logger="kontext.training.validation"):
        validation_split(source, cfg.data, cfg.validation)
    assert any(name in r.getMessage() and "also training samples" in r.getMessage() for r in caplog.records)

    # a broken validation folder is reported like training data
    broken = tmp_path / "broken"
    shutil.copytree(other, broken)
    next((broken / "mask").iterdir()).unlink()
    cfg.validation.data_root = str(broken)
    with pytest.raises(DatasetError):
        validation_split(source, cfg.data, cfg.validation)


def test_data_root_and_holdout_together_are_a_config_error():
    from kontext.training.config import ConfigError

    with pytest.raises(ConfigError, match="set only one") as info:
        config_from_dict({"validation": {"data_root": "heldout", "holdout": 2}})
    assert set(info.value.keys) == {"validation.data_root", "validation.holdout"}


def test_validation_log_line_is_rounded_and_says_which_samples(lora_pipe, dataset, tmp_path, caplog):
    import logging
    import re

    cfg = _cfg(tmp_path)
    cfg.validation.num_samples = 1
    with caplog.at_level(logging.INFO, logger="kontext.training.validation"):
        run_validation(lora_pipe, lora_pipe.transformer, dataset, cfg, 4, tmp_path, None)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation at step 4")]
    assert "on 1 training sample:" in line
    numbers = re.findall(r"-?\d+\.\d+", line.split("->")[0])
    assert numbers and all(len(x.lstrip("-").replace(".", "").lstrip("0")) <= 4 for x in numbers), line


def test_training_with_holdout_validates_on_held_out_samples(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    import logging

    from conftest import tiny_run_dict

    from train_kontext_lora import run_training

    d = tiny_run_dict(
        tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
        train={"max_steps": 1, "batch_size": 2, "learning_rate": 1e-3, "lr_warmup_steps": 0},
        checkpoint={"every_steps": 0},
        validation={"every_steps": 0, "holdout": 2, "num_samples": 2, "num_inference_steps": 1},
    )
    cfg = config_from_dict(d)
    with caplog.at_level(logging.INFO, logger="kontext.training.validation"):
        run = run_training(cfg)
    names = open_source("folder", tiny_dataset_dir).names
    assert run.dataset.source.names == names[:-2]  # the held-out samples were never trained on
    assert run.validation_dataset.source.names == names[-2:]
    assert any("on 2 held-out samples" in r.getMessage() for r in caplog.records)
    grid = Image.open(Path(cfg.output_dir) / "validation" / "step-1.png")
    assert grid.size == (len(GRID_COLUMNS) * SIZE, HEADER_HEIGHT + 2 * SIZE)


def test_trainer_refuses_a_holdout_that_leaves_nothing_to_train(tmp_path, tiny_model_dir, tiny_dataset_dir):
    from conftest import tiny_run_dict

    from train_kontext_lora import UserError, setup

    n = len(open_source("folder", tiny_dataset_dir))
    d = tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", validation={"holdout": n})
    with pytest.raises(UserError, match=f"validation.holdout is {n}"):
        setup(config_from_dict(d))
    assert not (tmp_path / "out" / "config.yaml").exists()  # refused before anything was written


def test_validation_passes_over_a_sample_whose_mask_its_bucket_crops_away(tmp_path, caplog):
    """The first training sample is a 1:4 portrait whose mask sits at the top: the 3:7 bucket's centre crop cuts
    it away. Validating on it scored IoU 0 (area ratio NaN) into val/* without a word; the next sample is taken."""
    import logging

    rng = np.random.default_rng(0)
    for name, (w, h), (x0, y0, x1, y1) in (("a_tall", (64, 256), (8, 4, 56, 40)), ("b_square", (96, 96), (24, 24, 72, 72)),
                                            ("c_square", (96, 96), (30, 30, 60, 60))):
        ctx = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        tgt, mask = ctx.copy(), np.zeros((h, w), np.uint8)
        tgt[y0:y1, x0:x1], mask[y0:y1, x0:x1] = (200, 30, 30), 255
        for folder, arr in (("context", ctx), ("target", tgt), ("mask", mask)):
            (tmp_path / folder).mkdir(exist_ok=True)
            Image.fromarray(arr).save(tmp_path / folder / f"{name}.png")
    ds = TripletDataset(open_source("folder", tmp_path, default_prompt="insert it"), resolution=64, aspect_buckets=True,
                        mask_hint="fill", with_geometry=False)
    with caplog.at_level(logging.INFO, logger="kontext.training.validation"):
        samples = validation_samples(ds, 2)
    assert [s["name"] for s in samples] == ["b_square", "c_square"]
    assert all(np.asarray(s["mask"]).max() >= 128 for s in samples)
    assert "passes over 1 sample(s) whose mask vanishes at the training size (a_tall)" in caplog.text
