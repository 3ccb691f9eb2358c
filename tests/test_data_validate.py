"""Validation finds every kind of broken sample, all at once, naming the file and the fix."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import DatasetError, FolderSource, HFSource, open_source, validate_source


def _save(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def _triplet(root: Path, name: str, size: tuple[int, int] = (48, 32), seed: int = 0) -> None:
    """A valid sample: random context, target = context with a red box, mask = the box."""
    w, h = size
    rng = np.random.default_rng(seed)
    ctx = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    tgt = ctx.copy()
    tgt[mask > 0] = (220, 20, 20)
    _save(root / "context" / f"{name}.png", ctx)
    _save(root / "target" / f"{name}.png", tgt)
    _save(root / "mask" / f"{name}.png", mask)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height greyscale pixels but whose data is a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )


def _problems(source, **kw) -> list[str]:
    with pytest.raises(DatasetError) as info:
        validate_source(source, progress=False, **kw)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err).startswith(f"Dataset {source.describe()} has {len(err.problems)} problem")
    for p in err.problems:
        assert p in str(err)
    return err.problems


def _one(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected exactly one problem with {needles}, got {hits} in:\n" + "\n".join(problems)
    return hits[0]


def test_valid_folder_passes_and_loads(tmp_path: Path) -> None:
    for k in range(3):
        _triplet(tmp_path, f"s{k}", seed=k)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "s1.txt").write_text("  insert the red box  \n")
    src = FolderSource(tmp_path, default_prompt="default words")
    from data.validate import DatasetWarning

    with pytest.warns(DatasetWarning, match=r"2 of 3 samples have no prompt of their own \(s0, s2\)"):
        validate_source(src, progress=False)
    assert src.names == ["s0", "s1", "s2"]
    raw = src.load(1)
    assert raw.prompt == "insert the red box"
    assert src.load(0).prompt == "default words"
    assert (raw.context.mode, raw.target.mode, raw.mask.mode) == ("RGB", "RGB", "L")
    assert raw.context.size == raw.target.size == raw.mask.size == (48, 32)
    assert src.size(2) == (48, 32)


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _triplet(root, "good")
    # missing counterparts
    _triplet(root, "no_mask")
    (root / "mask" / "no_mask.png").unlink()
    _save(root / "context" / "only_context.png", np.zeros((32, 48, 3), np.uint8))
    # non-image file and a file with an image name but text inside
    (root / "context" / "notes.txt").write_text("shot list")
    _triplet(root, "fake")
    (root / "mask" / "fake.png").write_text("this is not a png")
    # corrupt (truncated) image
    _triplet(root, "truncated")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    (root / "target" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # sizes differ
    _triplet(root, "sizes")
    _save(root / "mask" / "sizes.png", np.full((30, 40), 0, np.uint8) | (np.arange(40) > 20).astype(np.uint8) * 255)
    # empty, 0/1-valued, full masks
    _triplet(root, "empty")
    _save(root / "mask" / "empty.png", np.zeros((32, 48), np.uint8))
    _triplet(root, "zero_one")
    m01 = np.zeros((32, 48), np.uint8)
    m01[5:10, 5:10] = 1
    _save(root / "mask" / "zero_one.png", m01)
    _triplet(root, "full")
    _save(root / "mask" / "full.png", np.full((32, 48), 255, np.uint8))
    # colour mask and mask with transparency
    _triplet(root, "colour")
    cm = np.zeros((32, 48, 3), np.uint8)
    cm[8:16, 8:16] = (255, 0, 0)
    _save(root / "mask" / "colour.png", cm)
    _triplet(root, "alpha")
    am = np.zeros((32, 48, 4), np.uint8)
    am[..., 3] = 255
    am[8:16, 8:16] = (255, 255, 255, 128)
    _save(root / "mask" / "alpha.png", am, mode="RGBA")
    # over the pixel limit (checked from the header, nothing decoded)
    _triplet(root, "huge", size=(80, 80))
    # a decompression bomb: the header claims 100000 x 100000
    _triplet(root, "bomb")
    (root / "context" / "bomb.png").write_bytes(_bomb_png(100_000, 100_000))
    # metadata.jsonl: a good line, malformed JSON, a path escaping the folder, a symlink escaping it
    outside = tmp_path / "outside.png"
    _save(outside, np.zeros((32, 48, 3), np.uint8))
    _triplet(root, "escape")
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "link.png").symlink_to(outside)
    _triplet(root, "linked")
    lines = [
        json.dumps({"file_name": "good.png", "prompt": "insert the box"}),
        "{not json",
        json.dumps({"name": "escape", "prompt": "p", "context": "../outside.png"}),
        json.dumps({"name": "linked", "prompt": "p", "target": "elsewhere/link.png"}),
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    # a symlink inside context/ pointing outside
    _triplet(root, "ctxlink")
    (root / "context" / "ctxlink.png").unlink()
    (root / "context" / "ctxlink.png").symlink_to(outside)
    # a prompt file that matches no sample
    (root / "prompts").mkdir()
    (root / "prompts" / "typo.txt").write_text("insert")

    src = FolderSource(root, default_prompt="insert the product")
    problems = _problems(src, max_pixels=70 * 70)

    assert "add mask/no_mask.png" in _one(problems, "'no_mask'", "no mask")
    assert "add target/only_context.png and mask/only_context.png" in _one(problems, "'only_context'")
    assert "remove it or convert it to PNG" in _one(problems, "context/notes.txt", "not an image file")
    assert "re-export" in _one(problems, "mask/fake.png", "not an image Pillow can read")
    assert "re-export" in _one(problems, "target/truncated.png", "truncated or corrupt")
    assert "resize them" in _one(problems, "'sizes'", "mask/sizes.png is 40x30", "target/sizes.png is 48x32")
    assert "paint the insertion region white" in _one(problems, "mask/empty.png", "empty")
    assert "scale it to 0 and 255" in _one(problems, "mask/zero_one.png", "empty")
    assert "paint the area outside the object black" in _one(problems, "mask/full.png", "full")
    assert "greyscale" in _one(problems, "mask/colour.png", "not single-channel")
    assert "opaque greyscale" in _one(problems, "mask/alpha.png", "transparency")
    for role in ("context", "target", "mask"):
        assert "downscale" in _one(problems, f"{role}/huge.png", "80x80 = 6,400 pixels, over the limit of 4,900")
    assert "downscale" in _one(problems, "context/bomb.png", "over the")
    assert "line 2" in _one(problems, "metadata.jsonl line 2", "not valid JSON")
    assert "relative to it" in _one(problems, "metadata.jsonl line 3", "'../outside.png'", "outside the dataset folder")
    assert "relative to it" in _one(problems, "metadata.jsonl line 4", "'elsewhere/link.png'", "outside the dataset folder")
    assert "copy the file into the folder" in _one(problems, "context/ctxlink.png", "links outside")
    assert "matches no sample" in _one(problems, "prompts/typo.txt")
    assert not any("'good'" in p or "good.png" in p for p in problems)
    assert len(problems) == 20


def test_missing_and_empty_folders(tmp_path: Path) -> None:
    problems = _problems(FolderSource(tmp_path / "nope"))
    assert len(problems) == 1 and "does not exist; set data.root" in problems[0]

    for r in ("context", "target", "mask"):
        (tmp_path / "empty" / r).mkdir(parents=True)
    problems = _problems(FolderSource(tmp_path / "empty"))
    assert len(problems) == 1 and "is empty" in problems[0] and "context/NAME.png" in problems[0]

    for k in range(5):
        _triplet(tmp_path / "partial", f"s{k}")
    import shutil

    shutil.rmtree(tmp_path / "partial" / "mask")
    problems = _problems(FolderSource(tmp_path / "partial", default_prompt="p"))
    assert len(problems) == 1 and problems[0].startswith("folder mask/ is missing"), "one line, not one per sample"


def test_prompt_sources_and_missing_prompt(tmp_path: Path) -> None:
    for n in ("a", "b", "c"):
        _triplet(tmp_path, n)
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "b.txt").write_text("from file b")
    (tmp_path / "prompts" / "a.txt").write_text("from file a")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"name": "a", "prompt": "from metadata a"}) + "\n")
    src = FolderSource(tmp_path, default_prompt="dflt")
    assert [src.prompt(i) for i in range(3)] == ["from metadata a", "from file b", "dflt"]
    assert [FolderSource(tmp_path, "dflt", prompts="files").prompt(i) for i in range(3)] == ["from file a", "from file b", "dflt"]
    assert FolderSource(tmp_path, "dflt", prompts="default").prompt(0) == "dflt"
    problems = _problems(FolderSource(tmp_path))
    assert problems == ["sample 'c' has no prompt; write prompts/c.txt, add a metadata.jsonl line for it, or set data.default_prompt"]


def test_samples_that_fall_back_to_the_default_prompt_among_prompted_ones_are_named(tmp_path: Path) -> None:
    """A forgotten prompts/NAME.txt among prompted samples trained silently with data.default_prompt (with the
    tiny example's config: its soda-can prompt); the check names those samples. All on the default: no warning."""
    import warnings

    from data.validate import DatasetWarning

    for n in ("a", "b", "c", "d"):
        _triplet(tmp_path, n)
    (tmp_path / "prompts").mkdir()
    for n in ("a", "c"):
        (tmp_path / "prompts" / f"{n}.txt").write_bytes(b"\xef\xbb\xbfput the box here\r\n")
    src = FolderSource(tmp_path, default_prompt="Insert the soda can")
    assert [src.prompt(i) for i in range(4)] == ["put the box here", "Insert the soda can"] * 2
    with pytest.warns(DatasetWarning, match=r"2 of 4 samples have no prompt of their own \(b, d\) while the others "
                      r"do, so they train with data.default_prompt 'Insert the soda can'"):
        notes = validate_source(src, progress=False)
    assert len(notes) == 1
    for n in ("b", "d"):
        (tmp_path / "prompts" / f"{n}.txt").write_text("put the box here")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        assert validate_source(FolderSource(tmp_path, default_prompt="x"), progress=False) == []
    for f in (tmp_path / "prompts").iterdir():
        f.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)
        assert validate_source(FolderSource(tmp_path, default_prompt="x"), progress=False) == []


def test_hf_rows_that_fall_back_to_the_default_prompt_are_named(tmp_path: Path) -> None:
    import datasets

    from data.validate import DatasetWarning

    img = Image.fromarray(np.full((16, 16, 3), 90, np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 4:10] = 255
    m = Image.fromarray(mask)
    ds = datasets.Dataset.from_dict(
        {"context": [img, img], "target": [img, img], "mask": [m, m], "prompt": ["insert it", ""]},
        features=datasets.Features({"context": datasets.Image(), "target": datasets.Image(), "mask": datasets.Image(),
                                    "prompt": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    with pytest.warns(DatasetWarning, match=r"1 of 2 samples have no prompt of their own \(row 1\)"):
        validate_source(HFSource(tmp_path / "ds", default_prompt="dflt"), progress=False)


def test_metadata_explicit_paths_inside_folder(tmp_path: Path) -> None:
    _triplet(tmp_path / "raw", "x")
    lines = [json.dumps({"name": "item", "prompt": "p", **{r: f"raw/{r}/x.png" for r in ("context", "target", "mask")}})]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    for r in ("context", "target", "mask"):
        (tmp_path / r).mkdir()
    src = FolderSource(tmp_path)
    validate_source(src, progress=False)
    assert src.names == ["item"] and src.load(0).prompt == "p"


def test_hf_source_problems(tmp_path: Path) -> None:
    import datasets

    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    ds = datasets.Dataset.from_dict(
        {"ctx": [img], "target": [img], "mask": [3], "prompt": [""]},
        features=datasets.Features(
            {"ctx": datasets.Image(), "target": datasets.Image(), "mask": datasets.Value("int64"), "prompt": datasets.Value("string")}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    problems = _problems(HFSource(tmp_path / "ds"))
    assert "set data.context_column" in _one(problems, "column 'context'", "not in the dataset")
    assert "datasets.Image" in _one(problems, "column 'mask'", "has type")
    problems = _problems(open_source("hf", tmp_path / "missing_dataset"))
    assert "check data.root" in _one(problems, "could not load")


def test_exif_orientation_is_applied_consistently(tmp_path: Path) -> None:
    _triplet(tmp_path, "phone", size=(48, 32))
    upright = np.asarray(Image.open(tmp_path / "context" / "phone.png"))
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # pixels saved sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that turns them upright again
    stored.save(tmp_path / "context" / "phone.png", exif=exif)
    assert Image.open(tmp_path / "context" / "phone.png").size == (32, 48)
    src = FolderSource(tmp_path, default_prompt="p")
    validate_source(src, progress=False)
    assert src.size(0) == (48, 32)
    np.testing.assert_array_equal(np.asarray(src.load(0).context), upright)


def test_dataset_error_survives_pickling() -> None:
    import pickle

    err = DatasetError("folder /x", ["mask/a.png: is empty; paint it"])
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.problems == err.problems and back.where == "folder /x"
    with pytest.raises(TypeError):  # one form: (where, problems)
        DatasetError("whole message")


# ---------------------------------------------------------------- background agreement outside the mask


def test_background_mismatch_counts_outside_pixels_beyond_the_tolerance() -> None:
    from data.validate import BACKGROUND_TOLERANCE, background_mismatch

    ctx = np.full((10, 20, 3), 100, np.uint8)
    mask = np.zeros((10, 20), np.uint8)
    mask[:, :10] = 255  # 100 pixels inside, 100 outside
    tgt = ctx.copy()
    tgt[:, :10] = 0  # inside: ignored however different
    tgt[0, 10:15, 1] = 100 + BACKGROUND_TOLERANCE  # at the tolerance: agrees
    tgt[1, 10:14, 2] = 100 + BACKGROUND_TOLERANCE + 1  # 4 pixels just beyond it
    tgt[2, 19] = (40, 100, 100)  # one pixel 60 levels off
    b = background_mismatch("x", ctx, tgt, mask)
    assert (b.name, b.outside, b.max_diff) == ("x", 100, 60)
    assert b.share == pytest.approx(5 / 100)
    # the same numbers from PIL images, and a stricter tolerance counts the near-equal ones too
    pil = background_mismatch("x", Image.fromarray(ctx), Image.fromarray(tgt), Image.fromarray(mask), tolerance=0)
    assert pil.share == pytest.approx(10 / 100) and pil.max_diff == 60


def _jpeg_target(root: Path, name: str) -> None:
    """Re-save the sample's target as a (decoded) JPEG: its background now differs from the context."""
    path = root / "target" / f"{name}.png"
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG", quality=60)
    Image.open(buf).save(path)


def test_dataset_check_names_samples_whose_background_differs(tmp_path: Path, caplog) -> None:
    import logging

    from data.validate import BACKGROUND_WARN_SHARE, DatasetWarning, background_mismatch

    for k in range(4):
        _triplet(tmp_path, f"s{k}", seed=k)
    _jpeg_target(tmp_path, "s2")
    # s3: a few outside pixels differ, under the warning share
    tgt = np.asarray(Image.open(tmp_path / "target" / "s3.png")).copy()
    tgt[31, 47] = 255 - tgt[31, 47]
    Image.fromarray(tgt).save(tmp_path / "target" / "s3.png")
    src = FolderSource(tmp_path, default_prompt="p")
    report: list = []
    with pytest.warns(DatasetWarning) as rec, caplog.at_level(logging.INFO, logger="data.validate"):
        notes = validate_source(src, progress=False, background=report)
    (note,) = notes
    assert str(rec[0].message).endswith(note)
    assert note.startswith("1 of 4 samples have a target that differs from its context outside the mask")
    assert "s2 (" in note and "s3" not in note and "s0" not in note

    # per sample: what background_mismatch says about the decoded files
    assert [b.name for b in report] == ["s0", "s1", "s2", "s3"]
    for b in report:
        raw = src.load(src.names.index(b.name))
        assert b == background_mismatch(b.name, raw.context, raw.target, raw.mask)
    s0, _, s2, s3 = report
    assert s0.share == 0.0 and s0.max_diff == 0
    assert s2.share > BACKGROUND_WARN_SHARE and f"{s2.share:.1%} differ, up to {s2.max_diff} levels" in note
    assert 0 < s3.share <= BACKGROUND_WARN_SHARE and s3.max_diff > 100

    # the summary line of the check
    (summary,) = [r.getMessage() for r in caplog.records if "background check of 4 samples" in r.getMessage()]
    assert f"at most {s2.share:.2%} (s2, up to {s2.max_diff} levels)" in summary

    # a stricter share names s3 too; a looser tolerance lets the JPEG noise pass
    with pytest.warns(DatasetWarning):
        (strict,) = validate_source(src, progress=False, background_warn_share=1e-6)
    assert strict.startswith("2 of 4 samples") and "s3 (" in strict
    assert validate_source(src, progress=False, background_tolerance=255) == []


def test_clean_dataset_has_no_background_warning(tmp_path: Path, caplog) -> None:
    import logging
    import warnings

    from data.synthetic import generate_dataset

    root = generate_dataset(tmp_path / "syn", num_samples=4, size=(64, 64), seed=3, progress=False)
    report: list = []
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="data.validate"):
        warnings.simplefilter("error")
        assert validate_source(open_source("folder", root), progress=False, background=report) == []
    assert len(report) == 4 and all(b.share == 0.0 and b.max_diff == 0 for b in report)
    (summary,) = [r.getMessage() for r in caplog.records if "background check of 4 samples" in r.getMessage()]
    assert summary.endswith("target and context agree in every sample (largest difference 0 levels, tolerance 8)")
