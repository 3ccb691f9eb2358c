"""Buckets, resize/crop/flip alignment, area-preserving mask resampling, and the mask hint."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from scipy import ndimage

from data import (
    MASK_HINT_MODES,
    RawSample,
    apply_mask_hint,
    apply_mask_hint_pil,
    area_resize,
    crop_box,
    make_buckets,
    nearest_bucket,
    prepare_sample,
    sample_rng,
)
from data.buckets import kontext_preferred_resolutions
from data.hint import default_outline_width


# ------------------------------------------------------------------ buckets


def test_buckets_divisible_by_16_near_target_area_and_sorted() -> None:
    preferred = kontext_preferred_resolutions()
    assert make_buckets(1024, aspect_buckets=True) == sorted(preferred, key=lambda wh: wh[0] / wh[1])
    for res in (128, 256, 512, 768):
        b = make_buckets(res, aspect_buckets=True)
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in b)
        assert len(set(b)) == len(b) >= 5
        ratios = [w / h for w, h in b]
        assert ratios == sorted(ratios)
        for w, h in b:
            assert abs(w * h / res**2 - 1) < 0.2
    assert make_buckets(512, aspect_buckets=False) == [(512, 512)]
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(500, aspect_buckets=False)


def test_nearest_bucket_by_aspect_ratio() -> None:
    b = make_buckets(1024, aspect_buckets=True)
    assert b[nearest_bucket(3000, 3000, b)] == (1024, 1024)
    assert b[nearest_bucket(1568 * 3, 672 * 3, b)] == (1568, 672)
    assert b[nearest_bucket(672, 1568, b)] == (672, 1568)
    assert b[nearest_bucket(4000, 3000, b)] == (1184, 880)  # 4:3 = 1.333, 1184/880 = 1.345
    assert b[nearest_bucket(100, 1000, b)] == (672, 1568)  # more extreme than any bucket
    for w, h in [(640, 480), (480, 640), (1920, 1080), (1000, 1500)]:
        k = nearest_bucket(w, h, b)
        best = min(abs(math.log((bw / bh) / (w / h))) for bw, bh in b)
        assert abs(math.log((b[k][0] / b[k][1]) / (w / h))) == pytest.approx(best)


# ------------------------------------------------------------------ area resize


def test_area_resize_preserves_area_and_matches_block_mean() -> None:
    rng = np.random.default_rng(0)
    m = rng.random((37, 53))
    for out in [(20, 11), (53, 37), (100, 70), (7, 3), (131, 29)]:
        r = area_resize(m, out)
        assert r.shape == (out[1], out[0])
        assert r.mean() == pytest.approx(m.mean(), abs=1e-12)
        assert r.min() >= m.min() - 1e-12 and r.max() <= m.max() + 1e-12
    # Integer factor: exactly the 2x2 block mean.
    even = rng.random((24, 36))
    np.testing.assert_allclose(area_resize(even, (18, 12)), even.reshape(12, 2, 18, 2).mean(axis=(1, 3)), atol=1e-12)
    # A box: the area of the covered part is preserved too.
    box = (3.5, 2.25, 40.5, 30.75)
    r = area_resize(m, (16, 16), box)
    x = m.repeat(8, axis=0).repeat(8, axis=1)  # 1/8-pixel grid, where the box edges fall on whole cells
    sub = x[int(2.25 * 8) : int(30.75 * 8), int(3.5 * 8) : int(40.5 * 8)]
    assert r.mean() == pytest.approx(sub.mean(), abs=1e-12)


def test_mask_resize_is_area_averaging_not_nearest() -> None:
    mask = np.zeros((30, 30), np.uint8)
    mask[10:13, 10:13] = 255  # 9 of 900 pixels
    raw = RawSample("m", Image.new("RGB", (30, 30)), Image.new("RGB", (30, 30)), Image.fromarray(mask), "p")
    out = prepare_sample(raw, (16, 16))["mask"]
    assert out.shape == (1, 16, 16)
    assert float(out.mean()) == pytest.approx(9 / 900, abs=1e-6)
    assert 0 < float(out[out > 0].min()) < 1, "partially covered pixels carry their covered fraction"


# ------------------------------------------------------------------ alignment


def _block_pattern(h: int, w: int, cell: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 2, (h // cell + 1, w // cell + 1))
    return np.kron(cells, np.ones((cell, cell)))[:h, :w].astype(bool)


@pytest.mark.parametrize("crop,flip", [("center", False), ("center", True), ("random", False), ("random", True)])
def test_context_target_mask_stay_aligned(crop: str, flip: bool) -> None:
    h, w = 150, 230
    pattern = _block_pattern(h, w, cell=20, seed=3)  # random blocks: a mirror or shift shows up
    ctx = np.where(pattern[..., None], 255, 0).astype(np.uint8).repeat(3, axis=2)
    tgt = np.where(pattern[..., None], (255, 255, 255), (0, 0, 0)).astype(np.uint8)
    tgt[..., 1] = 255 - tgt[..., 1]  # different colours, same geometry
    raw = RawSample("cb", Image.fromarray(ctx), Image.fromarray(tgt), Image.fromarray(pattern.astype(np.uint8) * 255), "p")
    bucket = (96, 64)
    out = prepare_sample(raw, bucket, flip=flip, crop=crop, rng=sample_rng(5, 0, 0))
    assert out["context"].shape == (3, 64, 96) and out["target"].shape == (3, 64, 96) and out["mask"].shape == (1, 64, 96)
    assert out["context"].dtype == torch.float32 and -1 <= float(out["context"].min()) and float(out["context"].max()) <= 1
    mask = out["mask"][0]
    c01 = (out["context"][0] + 1) / 2
    t01 = 1 - (out["target"][1] + 1) / 2
    assert float((c01 - mask).abs().mean()) < 0.03
    assert float((t01 - mask).abs().mean()) < 0.03
    # The comparison has teeth: a one-pixel shift or a mirror is clearly worse.
    assert float((c01[:, 1:] - mask[:, :-1]).abs().mean()) > 0.05
    assert float((c01 - mask.flip(-1)).abs().mean()) > 0.2
    # Flip is a pure mirror of the unflipped result (same window).
    other = prepare_sample(raw, bucket, flip=not flip, crop=crop, rng=sample_rng(5, 0, 0))
    for k in out:
        torch.testing.assert_close(out[k], other[k].flip(-1))


def test_random_crop_is_deterministic_per_seed_epoch_index() -> None:
    pattern = _block_pattern(100, 300, cell=10, seed=1)
    img = Image.fromarray(pattern.astype(np.uint8) * 255)
    raw = RawSample("r", img.convert("RGB"), img.convert("RGB"), img, "p")
    a = prepare_sample(raw, (64, 64), crop="random", rng=sample_rng(1, 2, 3))["mask"]
    b = prepare_sample(raw, (64, 64), crop="random", rng=sample_rng(1, 2, 3))["mask"]
    c = prepare_sample(raw, (64, 64), crop="random", rng=sample_rng(1, 3, 3))["mask"]
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


# ------------------------------------------------------------------ crop window


def _solid_triplet(w: int, h: int) -> RawSample:
    return RawSample(f"{w}x{h}", Image.new("RGB", (w, h), (9, 9, 9)), Image.new("RGB", (w, h)), Image.new("L", (w, h), 255), "p")


# Sizes whose float window fell a rounding error outside the image (Pillow: "box offset can't be negative").
@pytest.mark.parametrize(
    "size,resolution,aspect", [((1000, 872), 128, True), ((1920, 1080), 512, False), ((412, 421), 128, False), ((412, 421), 1024, True)]
)
def test_crop_window_of_sizes_that_failed_in_floats(size: tuple[int, int], resolution: int, aspect: bool) -> None:
    buckets = make_buckets(resolution, aspect)
    bucket = buckets[nearest_bucket(*size, buckets)]
    out = prepare_sample(_solid_triplet(*size), bucket)
    assert out["mask"].shape == (1, bucket[1], bucket[0])
    assert float(out["mask"].min()) == 1.0, "a white mask stays white: the window lies inside the image"


_BUCKET_LISTS = {(res, aspect): make_buckets(res, aspect) for res in (16, 64, 128, 512) for aspect in (False, True)}


def test_crop_window_is_whole_pixels_inside_the_image_at_the_bucket_aspect() -> None:
    for w in range(300, 1401, 7):
        for h in range(300, 1401, 23):
            for (res, _), buckets in _BUCKET_LISTS.items():
                bw, bh = buckets[nearest_bucket(w, h, buckets)]
                for box in (crop_box((w, h), (bw, bh)), crop_box((w, h), (bw, bh), "random", sample_rng(w, h, res))):
                    x0, y0, x1, y1 = box
                    assert all(type(v) is int for v in box) and 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (w, h, bw, bh, box)
                    assert x1 - x0 == w or y1 - y0 == h, "as large as fits"
                    # The bucket's aspect ratio to the nearest whole pixel along the cropped side.
                    assert abs((x1 - x0) * bh - (y1 - y0) * bw) <= max(bw, bh) / 2, (w, h, bw, bh, box)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    w=st.integers(1, 400),
    h=st.integers(1, 400),
    bucket_list=st.sampled_from([k for k in sorted(_BUCKET_LISTS) if k[0] <= 128]),  # small outputs keep it fast
    crop=st.sampled_from(("center", "random")),
    flip=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_whole_transform_accepts_every_size(w: int, h: int, bucket_list: tuple[int, bool], crop: str, flip: bool, seed: int) -> None:
    buckets = _BUCKET_LISTS[bucket_list]
    bw, bh = buckets[nearest_bucket(w, h, buckets)]
    out = prepare_sample(_solid_triplet(w, h), (bw, bh), flip=flip, crop=crop, rng=sample_rng(seed, 0, 0))
    assert out["context"].shape == (3, bh, bw) and out["mask"].shape == (1, bh, bw)
    assert out["mask"].numpy().min() == 1.0
    np.testing.assert_allclose(out["context"].numpy(), 9 / 127.5 - 1, atol=1e-6)  # numpy: cheaper than torch per call


# ------------------------------------------------------------------ hint


def _soft_mask(h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    r = torch.sqrt((yy - h * 0.45) ** 2 + (xx - w * 0.6) ** 2)
    m = (1.0 - (r - 14) / 3).clamp(0, 1)  # soft-edged disc
    m[:, : w // 8] = 1.0  # a region touching the image border
    return m[None]


@pytest.mark.parametrize("mode", MASK_HINT_MODES)
def test_hint_changes_pixels_only_inside_mask(mode: str) -> None:
    torch.manual_seed(0)
    h, w = 48, 64
    image = torch.rand(2, 3, h, w) * 2 - 1
    mask = torch.stack([_soft_mask(h, w), _soft_mask(h, w).flip(-1)])
    out = apply_mask_hint(image, mask, mode, outline_width=3)
    changed = (out != image).any(dim=1, keepdim=True)
    inside = mask >= 0.5
    assert not (changed & ~inside).any()
    assert torch.equal(image, image.clone()), "input untouched"
    if mode == "none":
        assert not changed.any()
    elif mode == "fill":
        assert torch.equal(changed, inside) and torch.all(out.masked_select(inside.expand_as(out)) == 0)
    else:
        # Independent computation: inside pixels within chessboard distance 3 of a pixel outside.
        for b in range(2):
            ins = inside[b, 0].numpy()
            dist = ndimage.distance_transform_cdt(ins, metric="chessboard")
            band = ins & (dist <= 3)
            assert np.array_equal(changed[b, 0].numpy(), band)
            assert not band[:, 0].any(), "the image border is not a boundary"
        # unbatched input gives the same result
        torch.testing.assert_close(apply_mask_hint(image[1], mask[1], mode, outline_width=3), out[1])


def test_hint_region_difference_is_exactly_the_mask() -> None:
    h, w = 40, 40
    ctx = torch.rand(3, h, w) * 2 - 1
    mask = _soft_mask(h, w)
    tgt = torch.where(mask >= 0.5, torch.tensor(0.7), ctx)  # target = context outside the mask
    hinted = apply_mask_hint(ctx, mask, "fill")
    assert torch.equal((hinted != tgt).any(0, keepdim=True), mask >= 0.5)


def test_hint_pil_matches_tensor_version() -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    m = Image.fromarray((_soft_mask(48, 64)[0].numpy() * 255).round().astype(np.uint8))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    mt = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255)[None]
    for mode in MASK_HINT_MODES:
        pil = np.asarray(apply_mask_hint_pil(img, m, mode), dtype=np.float32)
        ten = ((apply_mask_hint(x, mt, mode) + 1) * 127.5).permute(1, 2, 0).numpy()
        assert np.abs(pil - ten).max() <= 0.5 + 1e-4
    assert default_outline_width(1024, 768) == 12 and default_outline_width(128, 128) == 8
    with pytest.raises(ValueError, match="data.mask_hint must be one of"):
        apply_mask_hint(x, mt, "blur")
