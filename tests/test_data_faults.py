"""Faults in the user's data end in the dataset report (one DatasetError naming the file and the fix), never a traceback.

Classes covered: unreadable paths (symlink loops) among the data files, 16-bit greyscale PNGs,
non-text prompt columns, a synthetic root that holds real data, and masks that vanish at the
training resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from data import DatasetError, FolderSource, HFSource, validate_source
from data.images import decode_mask, decode_rgb, open_header, ImageRef
from data.validate import DatasetWarning


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _triplet(root: Path, name: str, size: tuple[int, int] = (48, 32), box: tuple[int, int, int, int] | None = None) -> None:
    """context, target (a red box pasted) and mask (the box, default: the middle quarter) at ``size`` = (w, h)."""
    w, h = size
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    ctx = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box if box is not None else (w // 4, h // 4, w // 2 + w // 4, h // 2 + h // 4)
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    tgt = ctx.copy()
    tgt[mask > 0] = (220, 20, 20)
    _save(root / "context" / f"{name}.png", ctx)
    _save(root / "target" / f"{name}.png", tgt)
    _save(root / "mask" / f"{name}.png", mask)


def _problems(source, **kw) -> list[str]:
    with pytest.raises(DatasetError) as info:
        validate_source(source, progress=False, **kw)
    return info.value.problems


def _one(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {hits} in {problems}"
    return hits[0]


# ---------------------------------------------------------------- 1. unreadable paths


def test_symlink_loops_are_reported_by_name(tmp_path: Path) -> None:
    _triplet(tmp_path, "good")
    _triplet(tmp_path, "a")
    (tmp_path / "context" / "a.png").unlink()
    os.symlink("a.png", tmp_path / "context" / "a.png")  # points at itself
    os.symlink("y.png", tmp_path / "mask" / "x.png")  # x -> y -> x
    os.symlink("x.png", tmp_path / "mask" / "y.png")
    (tmp_path / "prompts").mkdir()
    os.symlink("p.txt", tmp_path / "prompts" / "p.txt")
    problems = _problems(FolderSource(tmp_path, default_prompt="insert it"))
    for label in ("context/a.png", "mask/x.png", "mask/y.png", "prompts/p.txt"):
        assert "symlink loop" in _one(problems, label)
    # The looped sample is reported once, not again as missing its context.
    assert not [p for p in problems if "'a'" in p], problems
    assert len(problems) == 4, problems


def test_symlink_loop_in_metadata_and_hf_paths(tmp_path: Path) -> None:
    _triplet(tmp_path, "good")
    os.symlink("loop.png", tmp_path / "loop.png")
    (tmp_path / "metadata.jsonl").write_text('{"name": "good", "mask": "loop.png"}\n')
    problems = _problems(FolderSource(tmp_path, default_prompt="insert it"))
    assert "symlink loop" in _one(problems, "metadata.jsonl line 1", "'mask'", "loop.png")

    import datasets

    ds = datasets.Dataset.from_dict(
        {"context": ["context/good.png"], "target": ["target/good.png"], "mask": ["loop.png"], "prompt": ["insert it"]}
    )
    ds.to_json(str(tmp_path / "rows.jsonl"))
    problems = _problems(HFSource(tmp_path / "rows.jsonl"))
    assert "symlink loop" in _one(problems, "column 'mask'", "loop.png")


def test_open_header_reports_a_loop_not_a_traceback(tmp_path: Path) -> None:
    os.symlink("self.png", tmp_path / "self.png")
    with pytest.raises(Exception) as info:
        open_header(ImageRef("self.png", path=tmp_path / "self.png"))
    assert "symlink loop" in str(info.value) and type(info.value).__name__ == "ImageProblem"


# ---------------------------------------------------------------- 2. 16-bit greyscale


def _save16(path: Path, arr16: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr16.astype(np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I"), "Pillow should open this as 16-bit greyscale"


def test_16bit_greyscale_images_and_masks_decode_faithfully(tmp_path: Path) -> None:
    h, w = 32, 48
    grad = np.tile(np.linspace(0, 65535, w), (h, 1)).round()
    _save16(tmp_path / "context" / "s.png", grad)
    _save16(tmp_path / "target" / "s.png", grad[:, ::-1])
    mask = np.zeros((h, w))
    mask[8:24, 12:36] = 65535
    mask[0, 0] = 30000  # below half: stays outside
    _save16(tmp_path / "mask" / "s.png", mask)
    src = FolderSource(tmp_path, default_prompt="insert it")
    validate_source(src, progress=False)
    raw = src.load(0)
    ctx = np.asarray(raw.context).astype(np.int32)
    assert raw.context.mode == "RGB"
    expect = np.round(grad / 257.0)
    assert np.abs(ctx[..., 0] - expect).max() <= 1 and (ctx[..., 0] == ctx[..., 2]).all()
    assert 120 < ctx.mean() < 135, "a 16-bit gradient must not decode to pure white"
    m = np.asarray(raw.mask)
    assert m[8:24, 12:36].min() == 255 and m[0, 0] == round(30000 / 257) and m[30, 40] == 0
    # decode_rgb / decode_mask directly, from mode I;16 files
    assert np.asarray(decode_rgb(Image.open(tmp_path / "context" / "s.png"))).max() == 255
    assert np.asarray(decode_mask(Image.open(tmp_path / "mask" / "s.png"))).max() == 255


# ---------------------------------------------------------------- 3. non-text prompt column


def _hf_rows(tmp_path: Path, prompts: list, feature) -> Path:
    import datasets

    h, w = 32, 48
    rng = np.random.default_rng(0)
    ctx = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    m = np.zeros((h, w), np.uint8)
    m[8:24, 12:36] = 255
    n = len(prompts)
    ds = datasets.Dataset.from_dict(
        {"context": [ctx] * n, "target": [ctx] * n, "mask": [Image.fromarray(m)] * n, "prompt": prompts},
        features=datasets.Features(
            {"context": datasets.Image(), "target": datasets.Image(), "mask": datasets.Image(), "prompt": feature}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    return tmp_path / "ds"


def test_integer_prompt_column_is_reported_with_its_type(tmp_path: Path) -> None:
    import datasets

    problems = _problems(HFSource(_hf_rows(tmp_path, [7, 42, 3], datasets.Value("int64"))))
    msg = _one(problems, "column 'prompt'", "int64", "not text")
    assert "7" in msg and "cast_column" in msg and "data.prompt_column" in msg
    assert not [p for p in problems if "is empty" in p], problems
    assert len(problems) == 1, problems


def test_list_prompt_column_is_reported_with_its_type(tmp_path: Path) -> None:
    import datasets

    problems = _problems(HFSource(_hf_rows(tmp_path, [["a"], ["b"]], datasets.Sequence(datasets.Value("string")))))
    assert "not text" in _one(problems, "column 'prompt'")


# ---------------------------------------------------------------- 4. synthetic root holding real data


def test_synthetic_generator_refuses_real_data_in_one_clear_message(tmp_path: Path) -> None:
    from data.synthetic import generate_dataset

    _triplet(tmp_path / "photos", "mine")
    before = {p: p.read_bytes() for p in (tmp_path / "photos").rglob("*.png")}
    with pytest.raises(FileExistsError) as info:
        generate_dataset(tmp_path / "photos", num_samples=2, size=64, progress=False)
    msg = str(info.value)
    assert "untouched" in msg and "data.synthetic.enabled=false" in msg and "data.root" in msg
    assert {p: p.read_bytes() for p in (tmp_path / "photos").rglob("*.png")} == before


def test_trainer_reports_synthetic_root_with_real_data_as_a_user_error(tmp_path: Path, tiny_model_dir, capsys, monkeypatch) -> None:
    from diffusers import FluxKontextPipeline

    import train_kontext_lora as tk
    from conftest import tiny_run_dict

    def refuse(*a, **k):
        raise AssertionError("the model was loaded although the data root was refused")

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", refuse)
    _triplet(tmp_path / "photos", "mine", size=(64, 64))
    before = {p: p.read_bytes() for p in (tmp_path / "photos").rglob("*") if p.is_file()}
    d = tiny_run_dict(tmp_path / "out", tiny_model_dir, tmp_path / "photos", tmp_path / "cache",
                      data={"synthetic": {"enabled": True, "num_samples": 2, "size": 64}})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d, sort_keys=False))
    capsys.readouterr()
    rc = tk.main(["--config", str(cfg)])
    out = capsys.readouterr()
    assert rc == 2, out.err
    assert "Traceback" not in out.err + out.out and "FileExistsError" not in out.err
    msg = out.err[out.err.index("error: "):]
    assert "untouched" in msg and "data.synthetic.enabled=false" in msg and str(tmp_path / "photos") in msg
    assert {p: p.read_bytes() for p in (tmp_path / "photos").rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- 5. masks that vanish at the training size


def test_masks_that_vanish_at_the_bucket_are_warned_about(tmp_path: Path) -> None:
    _triplet(tmp_path, "fine", size=(256, 256))
    _triplet(tmp_path, "tiny", size=(256, 256), box=(100, 100, 102, 102))  # 2x2 px: 1/16 of a latent cell
    _triplet(tmp_path, "wide", size=(2000, 64), box=(10, 10, 60, 54))  # outside the centre crop
    src = FolderSource(tmp_path, default_prompt="insert it")
    assert validate_source(src, progress=False) == []  # without buckets: unchanged behaviour
    with pytest.warns(DatasetWarning) as rec:
        notes = validate_source(src, progress=False, buckets=[(64, 64)])
    assert len(notes) == 1 and len(rec) == 1
    note = notes[0]
    assert "2 of 3 masks" in note and "mask/tiny.png" in note and "mask/wide.png" in note and "fine" not in note
    assert "centre" in note and "remove these samples" in note


def test_all_masks_vanishing_is_an_error(tmp_path: Path) -> None:
    _triplet(tmp_path, "tiny", size=(256, 256), box=(100, 100, 102, 102))
    _triplet(tmp_path, "wide", size=(2000, 64), box=(1900, 10, 1990, 54))
    problems = _problems(FolderSource(tmp_path, default_prompt="insert it"), buckets=[(64, 64)])
    msg = _one(problems, "every mask (2 of 2)")
    assert "mask/tiny.png" in msg and "mask/wide.png" in msg


def test_a_mask_at_the_resolution_limit_survives(tmp_path: Path) -> None:
    _triplet(tmp_path, "ok", size=(256, 256), box=(96, 96, 128, 128))  # 32 px -> 8 px = exactly one latent cell
    src = FolderSource(tmp_path, default_prompt="insert it")
    assert validate_source(src, progress=False, buckets=[(64, 64)]) == []


def test_trainer_dataset_check_warns_about_masks_that_vanish_at_the_training_size(tmp_path):
    """The trainer's own dataset check passes its buckets, so a mask too small for the bucket is named."""
    from data.validate import DatasetWarning
    from kontext.training import inputs
    from kontext.training.config import config_from_dict

    from PIL import Image

    root = tmp_path / "set"
    rng = np.random.default_rng(0)
    for name, box in (("big", (100, 100, 400, 400)), ("tiny", (250, 250, 254, 254))):
        ctx = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        mask = np.zeros((512, 512), np.uint8)
        x0, y0, x1, y1 = box
        mask[y0:y1, x0:x1] = 255
        for role, arr in (("context", ctx), ("target", ctx), ("mask", mask)):
            (root / role).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / role / f"{name}.png")
    cfg = config_from_dict({"data": {"root": str(root), "resolution": 64, "default_prompt": "insert"}})
    with pytest.warns(DatasetWarning, match="tiny"):
        inputs.open_sources(cfg)


def test_a_palette_image_with_transparency_decodes_without_a_pillow_warning(tmp_path: Path) -> None:
    """A palette PNG with a tRNS chunk (GIF-style exports) decoded to its palette colours, but Pillow warned on every
    load ("Palette images with Transparency expressed in bytes should be converted to RGBA images")."""
    import warnings

    from data.images import ImageRef, decode_rgb, open_header

    idx = (np.arange(32 * 24).reshape(24, 32) % 4).astype(np.uint8)
    pal = Image.fromarray(idx).convert("P")
    pal.putpalette([10, 20, 30, 200, 40, 40, 40, 200, 40, 40, 40, 200] + [0] * (3 * 252))
    pal.save(tmp_path / "p.png", transparency=bytes([0, 128, 255, 255]))  # partial alpha: kept as bytes
    assert isinstance(Image.open(tmp_path / "p.png").info.get("transparency"), bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rgb = decode_rgb(open_header(ImageRef("context/p.png", path=tmp_path / "p.png")))
    lut = np.array([[10, 20, 30], [200, 40, 40], [40, 200, 40], [40, 40, 200]], np.uint8)
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), lut[idx])
