"""Mask utilities and exact distance transforms against SciPy and hand-derived values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

import losses.distance as distance_mod
from losses import (
    boundary_band,
    dilate,
    distance_transform_edt,
    downsample_mask_area,
    erode,
    signed_distance_map_from_mask,
)


def _random_masks(b: int, h: int, w: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g) < p


def _scipy_sdm(mask: np.ndarray) -> np.ndarray:
    """Half-pixel SDM from SciPy: d_in - 0.5 outside, -(d_out - 0.5) inside."""
    d_in = ndimage.distance_transform_edt(~mask)
    d_out = ndimage.distance_transform_edt(mask)
    return np.where(mask, 0.5 - d_out, d_in - 0.5)


@pytest.mark.parametrize("shape", [(16, 16), (2, 16, 16), (2, 1, 16, 16)])
def test_downsample_accepts_all_layouts_and_preserves_area(shape):
    g = torch.Generator().manual_seed(0)
    m = (torch.rand(*shape, generator=g) > 0.5).float()
    out = downsample_mask_area(m, (4, 4))
    b = 1 if len(shape) == 2 else shape[0]
    assert out.shape == (b, 1, 4, 4)
    assert out.dtype == torch.float32
    # 4x4 blocks of 16 pixels: each latent cell is the block's coverage fraction
    expected = m.reshape(b, 4, 4, 4, 4).mean(dim=(2, 4)).reshape(b, 1, 4, 4)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.sum() * 16, m.sum())


def test_downsample_rejects_multichannel_mask():
    with pytest.raises(ValueError, match=r"M_px must be shaped"):
        downsample_mask_area(torch.zeros(1, 3, 8, 8), (2, 2))


@pytest.mark.parametrize("r", [1, 2])
def test_dilate_erode_match_scipy(r):
    m = _random_masks(3, 13, 11, 0.3, seed=1)
    struct = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)
    for i in range(3):
        mi = m[i, 0].numpy()
        want_d = ndimage.binary_dilation(mi, structure=struct)
        # the image border is not a contour: pixels beyond it count as mask for erosion
        want_e = ndimage.binary_erosion(mi, structure=struct, border_value=1)
        assert np.array_equal(dilate(m.float(), r)[i, 0].numpy() > 0.5, want_d)
        assert np.array_equal(erode(m.float(), r)[i, 0].numpy() > 0.5, want_e)


def test_boundary_band_values_and_degenerate_masks():
    m = torch.zeros(1, 1, 7, 7)
    m[..., 2:5, 2:5] = 1
    band = boundary_band(m, 1)
    expected = torch.zeros(7, 7)
    expected[1:6, 1:6] = 1
    expected[3, 3] = 0  # the single pixel eroded to: the interior
    torch.testing.assert_close(band[0, 0], expected)
    assert boundary_band(torch.zeros(1, 1, 5, 5), 1).sum() == 0
    assert boundary_band(torch.ones(1, 1, 5, 5), 1).sum() == 0


def _scipy_squared_edt(m: torch.Tensor) -> torch.Tensor:
    """Squared EDT of each [H, W] mask from SciPy's nearest-zero indices: exact integers in float64."""
    out = []
    for x in m.numpy():
        idx = ndimage.distance_transform_edt(x, return_distances=False, return_indices=True)
        grid = np.indices(x.shape)
        out.append(((grid - idx) ** 2).sum(0).astype(np.float64))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("h,w,p", [(17, 23, 0.05), (32, 32, 0.5), (9, 40, 0.9), (1, 12, 0.3)])
def test_torch_edt_equals_scipy(h, w, p):
    m = _random_masks(4, h, w, p, seed=h * w)[:, 0]
    m[0] = True
    m[0, h // 2, w // 2] = False  # a single background pixel: distances up to the far corner
    want = np.stack([ndimage.distance_transform_edt(x) for x in m.numpy()]).astype(np.float32)
    # The squared distances are integers: exact on any hardware.
    assert torch.equal(distance_mod._squared_edt_torch(~m).double(), _scipy_squared_edt(m))
    # float32 sqrt is not correctly rounded on every CPU: compare the distances to within a few ulps.
    got_torch = distance_transform_edt(m, backend="torch")
    got_scipy = distance_transform_edt(m, backend="scipy")
    torch.testing.assert_close(got_torch, torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_scipy, torch.from_numpy(want), rtol=1e-6, atol=1e-6)


def test_torch_edt_chunked_path_is_exact(monkeypatch):
    monkeypatch.setattr(distance_mod, "_CHUNK_ELEMENTS", 100)
    m = _random_masks(2, 21, 19, 0.2, seed=5)[:, 0]
    want = np.stack([ndimage.distance_transform_edt(x) for x in m.numpy()]).astype(np.float32)
    assert torch.equal(distance_mod._squared_edt_torch(~m), _scipy_squared_edt(m).float())
    torch.testing.assert_close(distance_transform_edt(m, backend="torch"), torch.from_numpy(want), rtol=1e-6, atol=1e-6)


def test_sdm_hand_derived_half_pixel_convention():
    m = torch.zeros(1, 1, 1, 7, dtype=torch.bool)
    m[..., 2:5] = True  # inside pixels 2, 3, 4
    phi = signed_distance_map_from_mask(m)[0, 0, 0]
    torch.testing.assert_close(phi, torch.tensor([1.5, 0.5, -0.5, -1.5, -0.5, 0.5, 1.5]))
    # diagonal neighbour: sqrt(2) from the nearest inside pixel
    sq = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    sq[..., 2, 2] = True
    phi2 = signed_distance_map_from_mask(sq)[0, 0]
    assert phi2[2, 2] == -0.5
    assert phi2[0, 0].item() == pytest.approx(math.sqrt(8) - 0.5)
    assert phi2[1, 2].item() == pytest.approx(0.5)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_sdm_matches_scipy_reference_and_is_antisymmetric(backend):
    m = _random_masks(5, 24, 20, 0.4, seed=7)
    phi = signed_distance_map_from_mask(m, backend=backend)
    want = np.stack([_scipy_sdm(x) for x in m[:, 0].numpy()])[:, None].astype(np.float32)
    torch.testing.assert_close(phi, torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(signed_distance_map_from_mask(~m, backend=backend), -phi)
    assert (phi[m] < 0).all() and (phi[~m] > 0).all()


def test_sdm_float_input_threshold_and_layouts():
    m = _random_masks(2, 10, 10, 0.5, seed=3)
    soft = m.float() * 0.8 + 0.1  # 0.9 inside, 0.1 outside
    torch.testing.assert_close(signed_distance_map_from_mask(soft), signed_distance_map_from_mask(m))
    assert signed_distance_map_from_mask(m[0, 0]).shape == (1, 1, 10, 10)


def test_sdm_normalize_is_per_sample():
    m = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    m[0, 0, 7:9, 7:9] = True
    m[1, 0, 1:15, 1:15] = True
    raw = signed_distance_map_from_mask(m)
    norm = signed_distance_map_from_mask(m, normalize=True)
    for i in range(2):
        torch.testing.assert_close(norm[i], raw[i] / raw[i].abs().max())
        assert norm[i].abs().max().item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["scipy", "torch"])
def test_sdm_empty_and_full_masks_are_finite(backend):
    m = torch.zeros(2, 1, 6, 8, dtype=torch.bool)
    m[1] = True
    phi = signed_distance_map_from_mask(m, backend=backend)
    diag = math.sqrt(6**2 + 8**2)
    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi[0], torch.full((1, 6, 8), diag))
    torch.testing.assert_close(phi[1], torch.full((1, 6, 8), -diag))
    norm = signed_distance_map_from_mask(m, normalize=True, backend=backend)
    torch.testing.assert_close(norm[0], torch.ones(1, 6, 8))
    torch.testing.assert_close(norm[1], -torch.ones(1, 6, 8))


def test_sdm_backend_choice_and_validation():
    assert distance_mod._resolve_backend("auto", torch.device("cpu")) == "scipy"
    assert distance_mod._resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="backend must be"):
        signed_distance_map_from_mask(torch.zeros(1, 1, 4, 4), backend="cupy")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_sdm_torch_on_gpu_matches_scipy():
    m = _random_masks(4, 64, 64, 0.3, seed=11)
    phi_gpu = signed_distance_map_from_mask(m.cuda())
    assert phi_gpu.device.type == "cuda"
    torch.testing.assert_close(phi_gpu.cpu(), signed_distance_map_from_mask(m, backend="scipy"), rtol=1e-6, atol=1e-6)
