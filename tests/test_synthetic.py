"""Tests for the synthetic triplet generator: determinism, the target/context/mask contract, the folder format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.synthetic import (
    MANIFEST_NAME,
    PRODUCT_PROMPT,
    draw_scene,
    generate_dataset,
    main,
    make_triplet,
    render_product,
)


def _names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "context").glob("*.png"))


def _load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ctx = np.asarray(Image.open(root / "context" / f"{name}.png"))
    tgt = np.asarray(Image.open(root / "target" / f"{name}.png"))
    mask_img = Image.open(root / "mask" / f"{name}.png")
    assert mask_img.mode == "L"
    return ctx, tgt, np.asarray(mask_img)


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }


@pytest.fixture(scope="module")
def dataset64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "set", num_samples=64, seed=0, progress=False)


def test_contract_over_64_samples(dataset64: Path) -> None:
    names = _names(dataset64)
    assert len(names) == 64
    areas = []
    for name in names:
        ctx, tgt, mask = _load(dataset64, name)
        assert ctx.shape == tgt.shape == (128, 128, 3)
        assert mask.shape == (128, 128)
        assert set(np.unique(mask).tolist()) <= {0, 255}, "masks are binary"
        inside = mask >= 128
        # The region where target and context differ is exactly inside the mask.
        np.testing.assert_array_equal(tgt[~inside], ctx[~inside])
        # ... and the product really is painted there (not a no-op target).
        changed = np.any(tgt[inside] != ctx[inside], axis=-1).mean()
        assert changed > 0.8, f"{name}: only {changed:.2f} of the mask changed"
        areas.append(inside.mean())
        assert (dataset64 / "prompts" / f"{name}.txt").read_text().strip() == PRODUCT_PROMPT
    assert min(areas) <= 0.03 and max(areas) >= 0.4, (min(areas), max(areas))
    assert min(areas) >= 0.015 and max(areas) <= 0.55


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", num_samples=6, size=(64, 64), seed=3, progress=False)
    b = generate_dataset(tmp_path / "b", num_samples=6, size=(64, 64), seed=3, progress=False)
    c = generate_dataset(tmp_path / "c", num_samples=6, size=(64, 64), seed=4, progress=False)
    bytes_a, bytes_b, bytes_c = _all_bytes(a), _all_bytes(b), _all_bytes(c)
    assert len(bytes_a) == 6 * 4
    assert bytes_a == bytes_b
    assert bytes_a.keys() == bytes_c.keys()
    differing = [k for k in bytes_a if k.startswith("context/") and bytes_a[k] != bytes_c[k]]
    assert len(differing) == 6


def test_samples_do_not_depend_on_dataset_length(tmp_path: Path) -> None:
    """Sample i's scene is drawn from its own child generator, so adding samples does not shift earlier ones."""
    a = generate_dataset(tmp_path / "a", num_samples=3, size=64, seed=0, progress=False)
    b = generate_dataset(tmp_path / "b", num_samples=5, size=64, seed=0, progress=False)
    for name in _names(a):
        assert (a / "context" / f"{name}.png").read_bytes() == (b / "context" / f"{name}.png").read_bytes()


def test_second_call_is_noop_and_new_arguments_regenerate(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "set", num_samples=4, size=64, progress=False)
    stamp = (root / "context" / "00000.png").stat().st_mtime_ns
    os.utime(root / "context" / "00000.png", ns=(stamp - 10**9, stamp - 10**9))
    stamp = (root / "context" / "00000.png").stat().st_mtime_ns
    assert generate_dataset(root, num_samples=4, size=64, progress=False) == root
    assert (root / "context" / "00000.png").stat().st_mtime_ns == stamp

    generate_dataset(root, num_samples=7, size=64, progress=False)
    assert len(_names(root)) == 7
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["arguments"]["num_samples"] == 7

    # A deleted file makes the set incomplete: regenerate rather than trust the manifest.
    (root / "mask" / "00003.png").unlink()
    generate_dataset(root, num_samples=7, size=64, progress=False)
    assert (root / "mask" / "00003.png").is_file()
    assert not list(tmp_path.glob(".set.tmp-*")), "temporary folders are cleaned up"


def test_refuses_to_overwrite_a_real_dataset(tmp_path: Path) -> None:
    root = tmp_path / "real"
    (root / "context").mkdir(parents=True)
    (root / "context" / "photo.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="real"):
        generate_dataset(root, num_samples=2, size=64, progress=False)
    assert (root / "context" / "photo.png").read_bytes() == b"not ours"


def test_several_sizes_cycle(tmp_path: Path) -> None:
    root = generate_dataset(tmp_path / "s", num_samples=4, size=[(96, 64), (64, 128)], progress=False)
    sizes = [Image.open(root / "target" / f"{n}.png").size for n in _names(root)]
    assert sizes == [(96, 64), (64, 128), (96, 64), (64, 128)]
    for n in _names(root):
        assert Image.open(root / "mask" / f"{n}.png").size == Image.open(root / "context" / f"{n}.png").size


@pytest.mark.parametrize("area", [0.02, 0.1, 0.3, 0.5])
def test_requested_area_is_met(area: float) -> None:
    rng = np.random.default_rng(11)
    for _ in range(5):
        t = make_triplet(rng, 128, 96, area=area)
        assert abs(t.mask_area - area) / area < 0.12, (area, t.mask_area)
        x, y, w, h = t.box
        m = np.asarray(t.mask) >= 128
        assert 0 <= x and 0 <= y and x + w <= 128 and y + h <= 96
        assert not m[:, :x].any() and not m[:, x + w :].any() and not m[:y].any() and not m[y + h :].any()


def test_product_identity_survives_aspect_ratio() -> None:
    """The product keeps its colours (orange body, white band, blue disc, yellow star) at any aspect."""
    for w, h in [(30, 90), (90, 30), (60, 60)]:
        rgb, mask = render_product(w, h)
        assert rgb.shape == (h, w, 3) and mask.shape == (h, w)
        assert 0.9 < mask.mean() < 1.0  # rounded corners only
        px = rgb[mask].astype(int)

        def share(colour: tuple[int, int, int]) -> float:
            return float((np.abs(px - np.array(colour)).sum(axis=1) < 30).mean())

        assert share((242, 107, 29)) > 0.15  # orange body
        assert share((250, 250, 245)) > 0.05  # white band
        assert share((24, 56, 160)) > 0.02  # blue logo disc / stripe
        assert share((255, 214, 0)) > 0.002  # yellow star


def test_scene_is_deterministic_and_varied() -> None:
    a = np.asarray(draw_scene(np.random.default_rng(1), 64, 48))
    b = np.asarray(draw_scene(np.random.default_rng(1), 64, 48))
    c = np.asarray(draw_scene(np.random.default_rng(2), 64, 48))
    assert a.shape == (48, 64, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).mean() > 5
    assert a.reshape(-1, 3).std(axis=0).mean() > 5, "scenes are not flat"


def test_invalid_arguments_raise_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="area_range"):
        generate_dataset(tmp_path / "x", area_range=(0.5, 0.2), progress=False)
    with pytest.raises(ValueError, match="num_samples"):
        generate_dataset(tmp_path / "x", num_samples=0, progress=False)
    with pytest.raises(ValueError, match="at least 16x16"):
        generate_dataset(tmp_path / "x", size=(8, 8), progress=False)


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--root", str(tmp_path / "cli"), "--num-samples", "3", "--size", "64x48", "--seed", "5"])
    root = Path(capsys.readouterr().out.strip())
    assert root == (tmp_path / "cli").resolve()
    assert len(_names(root)) == 3
    assert Image.open(root / "context" / "00000.png").size == (64, 48)


def test_product_box_recovers_the_mask_box_and_its_scale():
    """On targets the product's box is the mask's; on the product painted at 0.6x / 1.4x it scales with it."""
    from data.synthetic import product_box, scaled_insertions

    rng = np.random.default_rng(11)
    ratios = {0.6: [], 1.0: [], 1.4: []}
    for child in rng.spawn(8):
        t, variants = scaled_insertions(child, 128, 128, 0.08, list(ratios), drift=0.0)
        x, y, w, h = t.box
        near = (x - w, y - h, x + 2 * w, y + 2 * h)
        for s, img in variants.items():
            b = product_box(np.asarray(img), np.asarray(t.context), near)
            assert b is not None
            ratios[s].append((b[2] - b[0]) * (b[3] - b[1]) / (w * h))
    for s, r in ratios.items():
        assert np.median(r) == pytest.approx(s * s, rel=0.12), (s, r)
    blank = np.zeros((32, 32, 3), np.uint8)
    assert product_box(blank, blank) is None
