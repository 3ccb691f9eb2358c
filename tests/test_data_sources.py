"""Folder and Hugging Face sources give the same samples through the same path; fingerprints follow content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import FolderSource, HFSource, open_source, validate_source

# Their samples mix own prompts and the default on purpose (the fallback is what they test).
pytestmark = pytest.mark.filterwarnings("ignore:.*have no prompt of their own:data.validate.DatasetWarning")


def _arrays(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    ctx = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    mask = np.zeros((24, 40), np.uint8)
    mask[4 + k : 14 + k, 6:20] = 255
    tgt = ctx.copy()
    tgt[mask > 0] = (10, 200, 30)
    return ctx, tgt, mask


def _hf_dataset():
    import datasets

    rows = [_arrays(k) for k in range(3)]
    return datasets.Dataset.from_dict(
        {
            "name": [f"s{k}" for k in range(3)],
            "scene": [Image.fromarray(c) for c, _, _ in rows],
            "edited": [Image.fromarray(t) for _, t, _ in rows],
            "region": [Image.fromarray(m) for _, _, m in rows],
            "text": ["insert the green box", "", "insert it small"],
        },
        features=datasets.Features(
            {
                "name": datasets.Value("string"),
                "scene": datasets.Image(),
                "edited": datasets.Image(),
                "region": datasets.Image(),
                "text": datasets.Value("string"),
            }
        ),
    )


COLUMNS = dict(context_column="scene", target_column="edited", mask_column="region", prompt_column="text")


def _check_rows(src) -> None:
    validate_source(src, progress=False)
    assert len(src) == 3 and src.names == ["s0", "s1", "s2"]
    for k in range(3):
        raw = src.load(k)
        ctx, tgt, mask = _arrays(k)
        np.testing.assert_array_equal(np.asarray(raw.context), ctx)
        np.testing.assert_array_equal(np.asarray(raw.target), tgt)
        np.testing.assert_array_equal(np.asarray(raw.mask), mask)
        assert src.size(k) == (40, 24)
    assert [src.prompt(k) for k in range(3)] == ["insert the green box", "fallback prompt", "insert it small"]


def test_hf_save_to_disk_and_parquet_load_through_same_path(tmp_path: Path) -> None:
    import datasets

    ds = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))

    fps = []
    for where in ("disk", "dict", "pq", "pq/train-00000.parquet"):
        src = open_source("hf", tmp_path / where, default_prompt="fallback prompt", **COLUMNS)
        assert isinstance(src, HFSource)
        _check_rows(src)
        fps.append([src.fingerprint(k) for k in range(3)])
    assert all(f == fps[0] for f in fps), "the row hash depends on content only, not on the storage format"
    assert len(set(fps[0])) == 3


def test_hf_missing_split_is_reported(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": _hf_dataset()}).save_to_disk(str(tmp_path / "dict"))
    src = HFSource(tmp_path / "dict", split="validation", default_prompt="p", **COLUMNS)
    with pytest.raises(ValueError, match=r"split 'validation' not found \(available: \['train'\]\); set data.split"):
        validate_source(src, progress=False)


def test_hf_path_columns_are_confined(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for r in ("c", "t", "m"):
        (root / r).mkdir(parents=True)
    ctx, tgt, mask = _arrays(0)
    Image.fromarray(ctx).save(root / "c" / "a.png")
    Image.fromarray(tgt).save(root / "t" / "a.png")
    Image.fromarray(mask).save(root / "m" / "a.png")
    Image.fromarray(mask).save(tmp_path / "secret.png")
    rows = [
        {"context": "c/a.png", "target": "t/a.png", "mask": "m/a.png", "prompt": "ok"},
        {"context": "c/a.png", "target": "t/a.png", "mask": "../secret.png", "prompt": "escapes"},
    ]
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = HFSource(root / "train.jsonl")
    with pytest.raises(ValueError) as info:
        validate_source(src, progress=False)
    msg = str(info.value)
    assert "has 1 problem" in msg
    assert "row 1, column 'mask': path '../secret.png' resolves outside the dataset folder" in msg
    np.testing.assert_array_equal(np.asarray(src.load(0).mask), mask)


def _folder(root: Path) -> None:
    for k in range(3):
        ctx, tgt, mask = _arrays(k)
        for role, arr in (("context", ctx), ("target", tgt), ("mask", mask)):
            (root / role).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / role / f"s{k}.png")


def test_folder_fingerprint_follows_content_not_position(tmp_path: Path) -> None:
    _folder(tmp_path)
    src = FolderSource(tmp_path, default_prompt="p")
    before = {src.names[i]: src.fingerprint(i) for i in range(3)}
    # Renaming a sample changes its position, not its fingerprint.
    for role in ("context", "target", "mask"):
        (tmp_path / role / "s0.png").rename(tmp_path / role / "z9.png")
    moved = FolderSource(tmp_path, default_prompt="p")
    after = {moved.names[i]: moved.fingerprint(i) for i in range(3)}
    assert moved.names == ["s1", "s2", "z9"]
    assert after["z9"] == before["s0"] and after["s1"] == before["s1"]
    # One changed mask pixel changes that sample's fingerprint only.
    m = np.asarray(Image.open(tmp_path / "mask" / "s1.png")).copy()
    m[0, 0] = 255
    Image.fromarray(m).save(tmp_path / "mask" / "s1.png")
    edited = FolderSource(tmp_path, default_prompt="p")
    assert edited.fingerprint(0) != before["s1"]
    assert edited.fingerprint(1) == before["s2"]


def test_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="data.source must be 'folder' or 'hf', got 'imagefolder'"):
        open_source("imagefolder", tmp_path)


def test_public_names_are_reexported_from_the_package() -> None:
    # data/sources/ is one module per source plus what they share; callers import from data.sources or data.
    import data
    import data.sources as sources
    from data.sources import base, folder, huggingface

    assert sources.FolderSource is data.FolderSource is folder.FolderSource
    assert sources.HFSource is data.HFSource is huggingface.HFSource
    assert sources.RawSample is data.RawSample is base.RawSample
    assert sources.open_source is data.open_source and sources.open_configured_source is data.open_configured_source
    assert sources.TripletSource is base.TripletSource and sources.ROLES == ("context", "target", "mask")
    assert sources.PROMPT_MODES == ("auto", "files", "metadata", "default")
    assert set(sources.__all__) <= set(dir(sources))


def test_image_and_prompt_folders_are_walked_alike_but_judged_apart(tmp_path: Path, monkeypatch) -> None:
    import os

    _folder(tmp_path)
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for folder in (tmp_path / "context", prompts):
        (folder / ".DS_Store").write_text("x")  # hidden files are skipped in both
    (prompts / "s0.txt").write_text("insert s0")
    os.symlink("s1.txt", prompts / "s1.txt")  # a loop in prompts/ is reported, the sample stays (default prompt)
    os.symlink("s9.png", tmp_path / "mask" / "s9.png")  # a loop in mask/: reported once, not as "no context"
    (prompts / "notes").mkdir()  # a sub-folder of prompts/ is ignored, of context/ reported
    (tmp_path / "context" / "extra").mkdir()
    src = FolderSource(tmp_path, default_prompt="p")
    assert src.scan_problems() == [
        "context/extra/ is a folder; context/ must hold image files only, move it out",
        "mask/s9.png is a symlink loop (the link points back at itself); replace it with the file or remove it",
        "prompts/s1.txt is a symlink loop (the link points back at itself); replace it with the file or remove it",
    ]
    assert src.names == ["s0", "s1", "s2"]
    assert [src.prompt(i) for i in range(3)] == ["insert s0", "p", "p"]

    real_iterdir = Path.iterdir

    def unlistable(self: Path):
        if self.name in ("target", "prompts"):
            raise PermissionError(13, "Permission denied")
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", unlistable)
    problems = FolderSource(tmp_path, default_prompt="p").scan_problems()
    for sub in ("target", "prompts"):
        assert f"folder {sub}/ cannot be listed (Permission denied); check that it is a readable folder" in problems
