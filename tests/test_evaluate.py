"""The evaluation command on the real tiny pipeline and a synthetic held-out folder, and its Pillow chart."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kontext.evaluation.grid import HEADER_HEIGHT, mask_outline
from kontext.evaluation.metrics import pixel_change_mask, sample_metrics
from kontext.evaluation.plot import REFERENCE_COLOR, SERIES_COLORS, bar_chart
from kontext.tools.evaluate import ALL_FIELDS, SAMPLE_COLUMNS, VARIANT_COLUMNS, load_samples, main

SIZE = 64
LIMIT = 3


def make_lora(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """A random tiny-model LoRA (see conftest.make_random_lora)."""
    from conftest import make_random_lora

    return make_random_lora(tiny_model_dir, out, seed).parent


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("eval-loras")
    return make_lora(tiny_model_dir, d / "geo", 1), make_lora(tiny_model_dir, d / "plain", 2)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as fh:
        r = csv.DictReader(fh)
        return list(r.fieldnames or []), list(r)


def _common(data: Path, out: Path) -> list[str]:
    return ["--model", "tiny", "--data", str(data), "--steps", "2", "--max-sequence-length", "64", "--limit", str(LIMIT), "--out", str(out)]


def test_evaluate_two_loras_side_by_side(tiny_model_dir, tiny_dataset_dir, loras, tmp_path, capsys):
    geo, plain = loras
    out = tmp_path / "report"
    args = _common(tiny_dataset_dir, out) + ["--lora", str(geo), "--label-a", "geometry", "--lora-b", str(plain), "--label-b", "plain"]
    assert main(args) == 0
    assert "report:" in capsys.readouterr().out

    # CSV: one row per sample, one set of metric columns per LoRA
    header, rows = _read_csv(out / "metrics.csv")
    assert header == ["sample", "prompt"] + [f"{lab}/{k}" for lab in ("geometry", "plain") for k in ALL_FIELDS]
    samples = load_samples(str(tiny_dataset_dir), None, False, None, LIMIT)
    assert [r["sample"] for r in rows] == [s.name for s in samples]

    # JSON: the same numbers, and means that are the means of the CSV columns
    doc = json.loads((out / "metrics.json").read_text())
    assert [v["label"] for v in doc["variants"]] == ["geometry", "plain"]
    assert len(doc["samples"]) == LIMIT
    for lab in ("geometry", "plain"):
        for k in ("iou", "area_ratio", "psnr_outside", "latent_iou"):
            col = [float(r[f"{lab}/{k}"]) for r in rows]
            assert doc["mean"][lab][k] == pytest.approx(float(np.nanmean(col)), rel=1e-5)
            assert [s["metrics"][lab][k] for s in doc["samples"]] == pytest.approx(col, rel=1e-5)
    assert doc["mean"]["geometry"]["count"] == LIMIT

    # grid: header + one row per sample; context, target, then (result, outline, change) per LoRA
    grid = Image.open(out / "grid.png").convert("RGB")
    ncols = len(SAMPLE_COLUMNS) + 2 * len(VARIANT_COLUMNS)
    assert grid.size == (ncols * SIZE, HEADER_HEIGHT + LIMIT * SIZE)
    a = np.asarray(grid)

    def cell(r, c):
        return a[HEADER_HEIGHT + r * SIZE : HEADER_HEIGHT + (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE]

    # the per-sample metrics are those of the result shown in the grid, against the un-hinted context
    for i, s in enumerate(samples):
        assert np.array_equal(cell(i, 1), np.asarray(s.target))
        m = np.asarray(s.mask) >= 128
        for lab, c in (("geometry", 2), ("plain", 5)):
            ref = sample_metrics(cell(i, c), np.asarray(s.context), m, np.asarray(s.target))
            for k in ("iou", "area_ratio", "psnr_outside", "ssim_outside", "psnr_inside"):
                assert float(rows[i][f"{lab}/{k}"]) == pytest.approx(getattr(ref, k), rel=1e-5, abs=1e-6), (lab, k)
            # the change-mask picture is white exactly where the change mask is (the red mask contour aside)
            changed = pixel_change_mask(cell(i, c), np.asarray(s.context), m).mask
            assert changed.sum() == float(rows[i][f"{lab}/changed_area"])
            ring = mask_outline(m, 1)
            assert np.array_equal((cell(i, c + 2) == 255).all(axis=-1)[~ring], changed[~ring])
    # two different LoRAs give different results
    assert not np.array_equal(cell(0, 2), cell(0, 5))

    plot = Image.open(out / "area_ratio.png")
    assert plot.mode == "RGB" and plot.size[0] >= 320
    report = (out / "report.md").read_text()
    assert "| iou | higher |" in report and "geometry" in report and "plain" in report


def test_evaluate_base_equals_zero_strength_lora(tiny_model_dir, tiny_dataset_dir, loras, tmp_path):
    geo, _ = loras
    out = tmp_path / "base"
    assert main(_common(tiny_dataset_dir, out) + ["--base", "--lora", f"{geo}:0", "--label-a", "zero", "--limit", "2"]) == 0
    header, rows = _read_csv(out / "metrics.csv")
    assert len(rows) == 2 and header[2].startswith("base/")
    for r in rows:
        for k in ALL_FIELDS:
            assert r[f"base/{k}"] == r[f"zero/{k}"], k
    # only --base: the base model alone
    out2 = tmp_path / "base-only"
    assert main(_common(tiny_dataset_dir, out2) + ["--base", "--limit", "1"]) == 0
    header2, rows2 = _read_csv(out2 / "metrics.csv")
    assert header2 == ["sample", "prompt"] + [f"base/{k}" for k in ALL_FIELDS] and len(rows2) == 1
    assert rows2[0]["base/iou"] == rows[0]["base/iou"]


@pytest.mark.parametrize(
    "extra, needle",
    [
        ([], "nothing to evaluate: give --lora PATH"),
        (["--lora-b", "{geo}"], "--lora-b is the second of two LoRAs; give --lora PATH as well"),
        (["--lora", "{geo}", "--lora-b", "{geo}", "--label-b", "A"], "--label-a and --label-b are both 'A'"),
        (["--lora", "{geo}:big"], "the strength 'big' after ':' is not a number"),
        (["--base", "--grid-max-side", "32"], "--grid-max-side must be >= 64 (pixels); got 32"),
    ],
)
def test_evaluate_usage_errors(tiny_dataset_dir, loras, tmp_path, capsys, extra, needle):
    geo, _ = loras
    args = _common(tiny_dataset_dir, tmp_path / "r") + [e.format(geo=geo) for e in extra]
    assert main(args) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_evaluate_bad_data_folder(tmp_path, loras, capsys):
    geo, _ = loras
    assert main(_common(tmp_path / "missing", tmp_path / "r") + ["--lora", str(geo)]) == 2
    assert "--data" in capsys.readouterr().err
    (tmp_path / "broken" / "context").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "broken" / "context" / "a.png")
    assert main(_common(tmp_path / "broken", tmp_path / "r") + ["--lora", str(geo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data") and "target" in err


def test_bar_chart_geometry():
    values = {"A": [0.5, 1.5, float("nan")], "B": [2.0, 0.25, 1.0]}
    img, lay = bar_chart(["s0", "s1", "s2"], values, title="t", y_label="y", reference=1.0)
    a = np.asarray(img)
    assert lay.y_max >= 2.0 and lay.y_of(0.0) == lay.bottom
    # the dashed reference line is at y = 1
    ref_row = a[lay.y_of(1.0)]
    assert (ref_row == np.array(REFERENCE_COLOR)).all(axis=-1).sum() > 50
    for s, (name, vals) in enumerate(values.items()):
        colour = np.array(SERIES_COLORS[s])
        for i, v in enumerate(vals):
            x0, x1 = lay.bars[s][i]
            column = (a[:, (x0 + x1) // 2] == colour).all(axis=-1)
            if math.isnan(v):
                assert column[lay.y_of(0.3) : lay.bottom - 14].sum() == 0
                continue
            top = int(np.argmax(column))  # first coloured row from the top = the bar's top
            assert abs(top - lay.y_of(v)) <= 1, (name, i)
            assert column[top : lay.bottom].all()
    with pytest.raises(ValueError, match="has 2 values for 3 labels"):
        bar_chart(["a", "b", "c"], {"A": [1.0, 2.0]}, title="t", y_label="y")


def test_evaluate_shows_one_progress_bar_over_samples_and_variants(tiny_dataset_dir, loras, tmp_path, monkeypatch, capsys):
    import io

    import kontext.tools.evaluate as ev

    buf = io.StringIO()
    real = ev.tqdm
    monkeypatch.setattr(ev, "tqdm", lambda *a, **k: real(*a, **{**k, "file": buf, "disable": False}))
    args = ["--model", "tiny", "--data", str(tiny_dataset_dir), "--steps", "1", "--max-sequence-length", "64",
            "--limit", "2", "--out", str(tmp_path / "r"), "--lora", str(loras[0]), "--base"]
    assert main(args) == 0
    text = buf.getvalue()
    assert "evaluate" in text and "4/4" in text  # 2 samples x (base, LoRA)
    # the console's means are rounded (4 significant digits at most)
    import re

    means = [line for line in capsys.readouterr().out.splitlines() if "IoU" in line and "verdict" not in line]
    assert len(means) == 2 and not any(re.search(r"[1-9]\d{4}", line) for line in means), means


def _rows(n: int, **metrics: float) -> list[dict[str, float]]:
    base = {"iou": 0.7, "psnr_outside": 24.0, "changed_area": 100.0, "mask_area": 100.0, "threshold_degenerate": 0.0}
    return [dict(base, **metrics) for _ in range(n)]


@pytest.mark.parametrize(
    "rows, label",
    [
        # a LoRA that repaints the whole image would read as "too small" by its area ratio alone
        (_rows(4, iou=0.0, changed_area=3.6, psnr_outside=12.6), "repaints outside the mask"),
        (_rows(2, threshold_degenerate=1.0) + _rows(2), "repaints outside the mask"),  # half the backgrounds moved
        (_rows(4, changed_area=40.0, iou=0.4), "too small"),
        (_rows(4, changed_area=300.0, iou=0.33), "too large"),
        (_rows(4, changed_area=110.0, iou=0.05), "beside the mask"),
        (_rows(4, changed_area=90.0), "on target"),
        (_rows(3, threshold_degenerate=1.0, changed_area=1.0) + _rows(7, changed_area=120.0), "on target"),
    ],
)
def test_each_variant_gets_a_verdict_from_its_metrics(rows, label):
    from kontext.tools.evaluate import variant_verdict

    verdict = variant_verdict(rows)
    assert verdict.label == label, verdict
    assert verdict.line("geo").startswith(f"geo: {label} (")


def test_resolution_keeps_the_runs_aspect_buckets():
    from kontext.tools.evaluate import build_parser, evaluation_buckets

    trained = {"resolution": 128, "aspect_buckets": True}
    assert evaluation_buckets(None, None, trained) == (128, True)
    assert evaluation_buckets(64, None, trained) == (64, True)  # --resolution changes the size, not the bucketing
    assert evaluation_buckets(64, False, trained) == (64, False)
    assert evaluation_buckets(64, None, {}) == (64, False)
    assert evaluation_buckets(None, None, {}) == (None, False)
    ap = build_parser()
    base = ["--data", "d", "--out", "o"]
    assert ap.parse_args(base).aspect_buckets is None
    assert ap.parse_args(base + ["--aspect-buckets"]).aspect_buckets is True
    assert ap.parse_args(base + ["--no-aspect-buckets"]).aspect_buckets is False


def test_evaluate_at_a_resolution_uses_the_trained_aspect_buckets(tiny_model_dir, tmp_path, capsys):
    import json

    import yaml

    from data.synthetic import generate_dataset

    lora = make_lora(tiny_model_dir, tmp_path / "lora", 3)
    run = {"data": {"resolution": 128, "aspect_buckets": True}, "model": {"max_sequence_length": 16},
           "validation": {"guidance_scale": 3.0}}
    (lora / "config.yaml").write_text(yaml.safe_dump(run))
    wide = generate_dataset(tmp_path / "wide", num_samples=1, size=(128, 64), seed=5, progress=False)
    common = ["--model", "tiny", "--data", str(wide), "--steps", "1", "--lora", str(lora), "--resolution", "64"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    settings = json.loads((tmp_path / "a" / "metrics.json").read_text())["settings"]
    assert settings["resolution"] == 64 and settings["aspect_buckets"] is True
    # The run's prompt length and guidance, recorded with the file they came from.
    assert settings["max_sequence_length"] == 16 and settings["guidance"] == 3.0
    assert settings["run_config"] == str(lora / "config.yaml")
    assert "- max_sequence_length: `16`" in (tmp_path / "a" / "report.md").read_text()
    # Every variant's verdict: in the report, in metrics.json and on the console.
    verdict = json.loads((tmp_path / "a" / "metrics.json").read_text())["verdict"]["A"]
    line = f"A: {verdict['label']} ({verdict['reason']})"
    assert f"## Verdict\n\n- {line}" in (tmp_path / "a" / "report.md").read_text()
    assert f"verdict: {line}" in capsys.readouterr().out
    (sample,) = load_samples(str(wide), 64, True, None, None)
    assert sample.context.size == (96, 48)  # the wide bucket of 64 px, as training makes it
    ncols = len(SAMPLE_COLUMNS) + len(VARIANT_COLUMNS)
    assert Image.open(tmp_path / "a" / "grid.png").size == (ncols * 96, HEADER_HEIGHT + 48)
    # switched off explicitly: the square bucket
    assert main(common + ["--no-aspect-buckets", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["settings"]["aspect_buckets"] is False
    assert Image.open(tmp_path / "b" / "grid.png").size == (ncols * 64, HEADER_HEIGHT + 64)


def test_evaluate_grid_is_capped_by_grid_max_side(tiny_dataset_dir, tmp_path):
    from kontext.evaluation.grid import grid_cell_size

    out = tmp_path / "r"
    args = ["--model", "tiny", "--data", str(tiny_dataset_dir), "--steps", "1", "--max-sequence-length", "64",
            "--limit", "2", "--base", "--grid-max-side", "160", "--out", str(out)]
    assert main(args) == 0
    ncols = len(SAMPLE_COLUMNS) + len(VARIANT_COLUMNS)  # 5 columns of 64 px: 320 px wide uncapped
    cw, ch = grid_cell_size((SIZE, SIZE), 2, ncols, HEADER_HEIGHT, 160)
    assert (cw, ch) == (32, 32)
    assert Image.open(out / "grid.png").size == (ncols * cw, HEADER_HEIGHT + 2 * ch)


def _write_sample(root: Path, name: str, size: tuple[int, int], box: tuple[int, int, int, int]) -> None:
    w, h = size
    rng = np.random.default_rng(len(name))
    ctx = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    tgt = ctx.copy()
    mask = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    tgt[y0:y1, x0:x1] = (200, 30, 30)
    mask[y0:y1, x0:x1] = 255
    for folder, arr in (("context", ctx), ("target", tgt), ("mask", mask)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / folder / f"{name}.png")


def test_a_sample_whose_mask_the_bucket_crops_away_is_left_out_not_scored_as_zero(tmp_path):
    """A 1:4 portrait goes to the 3:7 bucket and is centre-cropped: a mask near its top is cut away. Scored, it
    entered the means as IoU 0 (and area ratio NaN) without a word; it is left out with a warning naming it."""
    from data.validate import DatasetWarning
    from kontext.tools.common import InferenceError

    data = tmp_path / "held"
    _write_sample(data, "a_tall", (64, 256), (8, 4, 56, 40))  # mask in the top 16 %: outside the centre crop
    _write_sample(data, "b_square", (96, 96), (24, 24, 72, 72))
    skipped: list[str] = []
    with pytest.warns(DatasetWarning, match=r"1 of 2 samples left out of the evaluation.*a_tall \(64x256 -> "):
        samples = load_samples(str(data), 64, True, "insert it", None, skipped)
    assert [s.name for s in samples] == ["b_square"] and skipped == ["a_tall"]
    args = ["--model", "tiny", "--base", "--data", str(data), "--prompt", "insert it", "--steps", "1",
            "--resolution", "64", "--aspect-buckets", "--out", str(tmp_path / "report")]
    with pytest.warns(DatasetWarning, match="left out of the evaluation"):
        assert main(args) == 0
    doc = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert [s["name"] for s in doc["samples"]] == ["b_square"]
    assert doc["settings"]["left_out"] == "a_tall (mask vanishes at the evaluation size)"
    # Without buckets the tall sample keeps its own size and its mask: it is scored.
    assert [s.name for s in load_samples(str(data), None, False, "insert it", None)] == ["a_tall", "b_square"]
    only_tall = tmp_path / "only_tall"
    _write_sample(only_tall, "a_tall", (64, 256), (8, 4, 56, 40))
    with pytest.raises(InferenceError, match=r"every sample evaluated \(1 of 1\) is unusable"):
        load_samples(str(only_tall), 64, True, "insert it", None)
