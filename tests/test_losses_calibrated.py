"""The calibrated geometry formulation: minimal at the target, worse at every wrong size, no push to shrink.

Predictions are real VAE latents of the synthetic product painted at other sizes over the scene (the rest of
the mask shows the scene's background) with a slight background drift, so the terms are judged on the
latents the trainer actually sees, not on hand-made tensors.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data.synthetic import scaled_insertions
from kontext.runtime.flux import encode_images
from kontext.runtime.generation import pil_to_tensor
from losses import LOSS_TERMS, compute_mask_targets, geometry_loss
from losses.combined import calibrated_change_stats

SCALES = (0.7, 0.85, 1.0, 1.15, 1.3)


@pytest.fixture(scope="module")
def vae(tiny_model_dir):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(tiny_model_dir), subfolder="vae").eval()


def _samples(vae, areas, drift, seed=0):
    """Per sample: latents of target, scene and each scaled variant, and the mask targets."""
    rng = np.random.default_rng(seed)
    out = []
    for area, child in zip(areas, rng.spawn(len(areas))):
        t, variants = scaled_insertions(child, 128, 128, area, SCALES, drift=drift)
        mask = torch.from_numpy(np.asarray(t.mask, dtype=np.float32) / 255.0)[None, None]
        with torch.no_grad():  # one VAE call per sample (a third of the time of one per image)
            z = encode_images(vae, torch.cat([pil_to_tensor(im) for im in (t.target, t.context, *variants.values())]))
        z = z.float().split(1)
        z_tgt, z_scene, preds = z[0], z[1], dict(zip(variants, z[2:]))
        out.append((z_tgt, z_scene, preds, compute_mask_targets(mask, tuple(z_tgt.shape[-2:]))))
    return out


def test_every_term_is_zero_with_zero_gradient_at_the_target(vae):
    for z_tgt, z_scene, preds, targets in _samples(vae, [0.02, 0.1, 0.3], drift=0.0):
        at = z_tgt.clone().requires_grad_(True)
        total, parts = geometry_loss(at, z_tgt, z_scene, targets)
        for k in LOSS_TERMS:
            assert parts[k].item() == pytest.approx(0.0, abs=1e-6), k
        total.backward()
        wrong = preds[0.85].clone().requires_grad_(True)
        geometry_loss(wrong, z_tgt, z_scene, targets)[0].backward()
        assert wrong.grad.norm() > 1e-3
        assert at.grad.norm() <= 1e-6 * wrong.grad.norm() + 1e-9


@pytest.mark.parametrize("area", [0.015, 0.06, 0.25])
def test_shrunk_and_grown_predictions_score_worse_on_every_term(vae, area):
    """Shrunk and grown products (rest of the mask showing the scene, background drift) score worse than the
    target on every term; with the same drift on every variant, the size terms and the total still rank the
    true size best, and without drift so does the background term."""
    (z_tgt, z_scene, preds, targets), = _samples(vae, [area], drift=3.0, seed=int(area * 1000))
    _, at_target = geometry_loss(z_tgt, z_tgt, z_scene, targets)
    scores = {s: geometry_loss(z, z_tgt, z_scene, targets) for s, z in preds.items()}
    for k in LOSS_TERMS:
        for s in (0.7, 0.85, 1.15, 1.3):
            assert scores[s][1][k] > at_target[k] + 1e-7, (k, s)
    for k in ("mse", "dice", "area", "boundary"):
        for s in (0.7, 1.3):
            assert scores[s][1][k] > scores[1.0][1][k], (k, s, {x: float(v[1][k]) for x, v in scores.items()})
    for s in (0.7, 0.85, 1.15, 1.3):
        assert scores[s][0] > scores[1.0][0], s
    # The geometry terms grow with the size error on both sides.
    for k in ("dice", "boundary"):
        v = {s: float(scores[s][1][k]) for s in SCALES}
        assert v[0.7] > v[0.85] > v[1.0] < v[1.15] < v[1.3], (k, v)
    (z_tgt, z_scene, preds, targets), = _samples(vae, [area], drift=0.0, seed=int(area * 1000))
    bg = {s: float(geometry_loss(z, z_tgt, z_scene, targets)[1]["bg"]) for s, z in preds.items()}
    assert bg[0.7] > bg[1.0] < bg[1.3], bg


def test_small_masks_carry_no_push_to_shrink(vae):
    """Masks of 1-3 % of the image: the total over a size sweep is lowest at the true size for every sample.

    The loss, as a function of the size factor, has its minimum at 1.0 (a one-sided push would move it), and
    so does each of its change-mask terms.
    """
    samples = _samples(vae, list(np.linspace(0.01, 0.03, 6)), drift=2.0, seed=3)
    for z_tgt, z_scene, preds, targets in samples:
        scored = {s: geometry_loss(z, z_tgt, z_scene, targets) for s, z in preds.items()}
        total = {s: float(v[0]) for s, v in scored.items()}
        assert min(total, key=total.get) == 1.0, total
        assert total[0.85] > total[1.0] < total[1.15]
        for k in ("dice", "boundary"):
            term = {s: float(v[1][k]) for s, v in scored.items()}
            assert min(term, key=term.get) == 1.0, (k, term)


def test_calibrated_stats_from_the_target_contrast():
    D = torch.zeros(2, 1, 4, 4)
    D[0, 0, :2] = 3.0  # inside change 3, outside 0
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1.0
    outside = 1.0 - mask
    outside[:, :, 2] = 0.0  # the margin row is neither
    stats = calibrated_change_stats(D, mask, outside, temperature=0.25)
    assert stats.tau[0].item() == pytest.approx(1.5) and stats.s[0].item() == pytest.approx(0.75)
    # Sample 1: the target does not differ from the scene at all -> the temperature floors, no NaN.
    assert stats.tau[1].item() == pytest.approx(0.0) and stats.s[1].item() == pytest.approx(1e-3)
    empty = calibrated_change_stats(D, torch.zeros_like(mask), torch.ones_like(mask))
    assert torch.isfinite(empty.tau).all() and torch.isfinite(empty.s).all()


def test_calibrated_terms_by_hand():
    """Two-pixel example: dice, area and boundary as written in the docstring."""
    z_ctx = torch.zeros(1, 1, 1, 4)
    z_tgt = torch.tensor([[[[2.0, 2.0, 0.0, 0.0]]]])
    z_pred = torch.tensor([[[[2.0, 0.0, 0.0, 0.0]]]])  # half the object
    m_px = torch.zeros(1, 1, 8, 32)
    m_px[..., :16] = 1.0
    targets = compute_mask_targets(m_px, (1, 4), band_r=0)
    _, parts = geometry_loss(z_pred, z_tgt, z_ctx, targets, w_band=1.0, dice_smooth=1.0, area_eps=1.0)
    # tau = (2 + 0) / 2 = 1, s = 0.25 * 2 = 0.5
    sig = lambda d: 1.0 / (1.0 + math.exp(-(d - 1.0) / 0.5))  # noqa: E731
    p = [sig(2.0), sig(0.0), sig(0.0), sig(0.0)]
    t = [sig(2.0), sig(2.0), sig(0.0), sig(0.0)]
    err = [(a - b) ** 2 for a, b in zip(p, t)]
    assert parts["dice"].item() == pytest.approx(sum(err) / (sum(a * a for a in p) + sum(b * b for b in t) + 1.0), rel=1e-5)
    near = [1.0 - o for o in targets.outside[0, 0, 0].tolist()]
    a_p, a_t = sum(n * a for n, a in zip(near, p)), sum(n * b for n, b in zip(near, t))
    assert parts["area"].item() == pytest.approx(math.log((a_p + 1.0) / (a_t + 1.0)) ** 2, rel=1e-5)
    phi = targets.sdm[0, 0, 0].tolist()
    assert parts["boundary"].item() == pytest.approx(sum(abs(f) * e for f, e in zip(phi, err)) / 4, rel=1e-5)
