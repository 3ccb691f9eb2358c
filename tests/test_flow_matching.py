"""Flow-matching pure functions against the installed diffusers helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from losses import (
    add_noise,
    calculate_shift,
    flow_matching_loss,
    loss_weighting,
    predicted_clean_latents,
    sample_timestep_density,
    shift_sigmas_for_resolution,
    time_shift,
    timesteps_and_sigmas_from_density,
    velocity_target,
)


def _flux_training_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1's scheduler config (shift 3.0, dynamic shifting on): training uses the unshifted table.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_density_sampling_matches_diffusers(scheme):
    ours = sample_timestep_density(
        scheme, 64, logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=torch.Generator().manual_seed(5)
    )
    theirs = compute_density_for_timestep_sampling(
        weighting_scheme=scheme,
        batch_size=64,
        logit_mean=0.3,
        logit_std=1.2,
        mode_scale=1.29,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(ours, theirs)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_density_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        sample_timestep_density("lognorm", 4)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.05, 1.0, 20).view(20, 1, 1, 1)
    assert torch.equal(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def _diffusers_get_sigmas(scheduler, timesteps, n_dim=4):
    """The FLUX training script's lookup: each timestep's position in the schedule, then its sigma."""
    sigmas = scheduler.sigmas
    schedule = scheduler.timesteps
    idx = [(schedule == t).nonzero().item() for t in timesteps]
    s = sigmas[idx].flatten()
    while s.ndim < n_dim:
        s = s.unsqueeze(-1)
    return s


def test_timesteps_and_sigmas_match_training_script_lookup():
    sched = _flux_training_scheduler()
    u = compute_density_for_timestep_sampling("logit_normal", 32, 0.0, 1.0, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, sched)
    want_t = sched.timesteps[(u * 1000).long()]
    assert torch.equal(timesteps, want_t)
    assert torch.equal(sigmas.view(-1, 1, 1, 1), _diffusers_get_sigmas(sched, want_t))
    # u = 1 (the "mode" scheme at rand = 0) stays on the table
    t1, s1 = timesteps_and_sigmas_from_density(torch.tensor([1.0]), sched)
    assert t1.item() == sched.timesteps[-1].item() and s1.item() == pytest.approx(sched.sigmas[-1].item())


def test_noising_matches_scheduler_scale_noise_and_inverts():
    sched = _flux_training_scheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 16, 8, 8, generator=g)
    noise = torch.randn(4, 16, 8, 8, generator=g)
    u = torch.rand(4, generator=g)
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, sched)
    x_t = add_noise(x0, noise, sigmas)
    torch.testing.assert_close(x_t, sched.scale_noise(x0, timesteps, noise), rtol=0, atol=1e-6)
    # The path runs from the clean latents (sigma 0) to pure noise (sigma 1).
    torch.testing.assert_close(add_noise(x0, noise, torch.zeros(4)), x0)
    torch.testing.assert_close(add_noise(x0, noise, torch.ones(4)), noise)
    # The velocity target is the path's derivative d x_t / d sigma: a central difference of the noising along sigma.
    v = velocity_target(x0, noise)
    x64, n64, s64 = x0.double(), noise.double(), sigmas.double()
    h = 1e-4
    slope = (add_noise(x64, n64, s64 + h) - add_noise(x64, n64, s64 - h)) / (2 * h)
    torch.testing.assert_close(v.double(), slope, rtol=1e-6, atol=1e-6)
    # The same velocity from any point of the path gives the same clean latents back.
    torch.testing.assert_close(predicted_clean_latents(x_t, v, sigmas), x0, rtol=0, atol=1e-5)
    later = add_noise(x0, noise, (sigmas + 0.3).clamp(max=1.0))
    torch.testing.assert_close(predicted_clean_latents(later, v, (sigmas + 0.3).clamp(max=1.0)), x0, rtol=0, atol=1e-5)


def test_flow_matching_loss_matches_training_script_formula():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(3, 16, 4, 4, generator=g).bfloat16()
    target = torch.randn(3, 16, 4, 4, generator=g)
    sigmas = torch.tensor([0.2, 0.5, 0.9]).view(3, 1, 1, 1)
    weighting = compute_loss_weighting_for_sd3("cosmap", sigmas)
    want = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1).mean()
    got = flow_matching_loss(pred, target, loss_weighting("cosmap", sigmas))
    assert got.dtype == torch.float32
    assert torch.equal(got, want)
    per = flow_matching_loss(pred, target, reduction="none")
    assert per.shape == (3,)
    torch.testing.assert_close(per.mean(), torch.nn.functional.mse_loss(pred.float(), target))


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 1, 9000])
def test_calculate_shift_matches_diffusers(seq_len):
    assert calculate_shift(seq_len) == diffusers_calculate_shift(seq_len)
    assert calculate_shift(seq_len, 128, 2048, 0.3, 1.0) == diffusers_calculate_shift(seq_len, 128, 2048, 0.3, 1.0)


def test_resolution_shift_matches_scheduler_set_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    seq_len = (512 // 16) * (768 // 16)
    mu = diffusers_calculate_shift(seq_len)
    base = np.linspace(1.0, 1 / 28, 28)
    sched.set_timesteps(sigmas=base, mu=mu)
    ours = shift_sigmas_for_resolution(torch.from_numpy(base).float(), seq_len)
    torch.testing.assert_close(ours, sched.sigmas[:-1], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(time_shift(mu, torch.tensor([0.5])), torch.tensor([float(np.exp(mu) / (np.exp(mu) + 1))]))
    assert shift_sigmas_for_resolution(torch.tensor([0.0]), seq_len).item() == 0.0
    lin = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear")
    lin.set_timesteps(sigmas=base, mu=mu)
    torch.testing.assert_close(time_shift(mu, torch.from_numpy(base).float(), kind="linear"), lin.sigmas[:-1])


def test_masked_flow_weight_is_the_normalised_mask_weighted_mean():
    """``flow_matching_loss(..., weighting=masked_flow_weight(m, u))`` = sum(w err) / sum(w) per sample, by hand."""
    from losses import flow_matching_loss, masked_flow_weight

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    m = torch.zeros(2, 1, 4, 4)
    m[0, :, :2] = 1.0
    m[1, :, 1:3, 1:3] = 0.5
    got = flow_matching_loss(pred, target, masked_flow_weight(m, 0.1), reduction="none")
    err = (pred - target) ** 2
    for b in range(2):
        w = 0.1 + 0.9 * m[b]
        want = (w * err[b]).sum() / (w.sum() * 3)
        assert got[b].item() == pytest.approx(want.item(), rel=1e-5)
    # All weight inside with unmasked_weight 0; a uniform map leaves the plain loss unchanged.
    assert flow_matching_loss(pred, target, masked_flow_weight(torch.ones(2, 1, 4, 4), 0.3)).item() == pytest.approx(
        flow_matching_loss(pred, target).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="unmasked_weight"):
        masked_flow_weight(m, 1.5)
