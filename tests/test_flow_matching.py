"""Flow-matching pure functions against the installed diffusers helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from losses import (
    FlowStep,
    add_noise,
    calculate_shift,
    flow_matching_loss,
    flow_step,
    loss_weighting,
    masked_flow_weight,
    predicted_clean_latents,
    sample_timestep_density,
    shift_sigmas_for_resolution,
    time_shift,
    timesteps_and_sigmas_from_density,
    velocity_target,
)


def _flux_training_scheduler() -> FlowMatchEulerDiscreteScheduler:
    # FLUX.1's scheduler config (shift 3.0, dynamic shifting on): training uses the unshifted table.
    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)


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
    torch.testing.assert_close(ours, theirs)
    assert ((ours >= 0) & (ours <= 1)).all()


def test_density_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="weighting_scheme must be one of"):
        sample_timestep_density("lognorm", 4)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal"])
def test_loss_weighting_matches_diffusers(scheme):
    sigmas = torch.linspace(0.05, 1.0, 20).view(20, 1, 1, 1)
    torch.testing.assert_close(loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


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
    want_t = sched.timesteps[(u * sched.config.num_train_timesteps).long()]
    torch.testing.assert_close(timesteps, want_t)
    torch.testing.assert_close(sigmas.view(-1, 1, 1, 1), _diffusers_get_sigmas(sched, want_t))
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
    torch.testing.assert_close(got, want)
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


def _flow_step_by_hand(x0, seed, sched, scheme, resolution_shift, v_pred, pixel_weight=None):
    """One rectified-flow step written out in float64 from diffusers' helpers and the formulas: the noise, then
    ``u`` from the seeded generator, the scheduler's training table, FLUX's exponential resolution shift."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    u = compute_density_for_timestep_sampling(scheme, x0.shape[0], 0.0, 1.0, 1.29, generator=g)
    n = sched.config.num_train_timesteps
    index = (u * n).long().clamp(max=len(sched.timesteps) - 1)
    timesteps, sigmas = sched.timesteps[index].double(), sched.sigmas[index].double()
    if resolution_shift:
        mu = diffusers_calculate_shift((x0.shape[-2] // 2) * (x0.shape[-1] // 2))
        sigmas = np.exp(mu) / (np.exp(mu) + (1.0 / sigmas - 1.0))
        timesteps = sigmas * n
    s = sigmas.view(-1, 1, 1, 1)
    x0, noise = x0.double(), noise.double()
    x_t = (1.0 - s) * x0 + s * noise
    target = noise - x0
    weighting = compute_loss_weighting_for_sd3(scheme, s).double()
    if pixel_weight is not None:
        weighting = weighting * pixel_weight.double()
    loss = (weighting * (v_pred.double() - target) ** 2).mean()
    return {"noise": noise, "sigmas": sigmas, "model_timesteps": timesteps / n, "x_t": x_t, "target": target,
            "loss": loss, "z_pred": x_t - s * v_pred.double()}


@pytest.mark.parametrize("resolution_shift", [False, True])
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_flow_step_is_the_rectified_flow_step_written_out(scheme, resolution_shift):
    sched = _flux_training_scheduler()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 16, 8, 12, generator=g)
    v_pred = torch.randn(3, 16, 8, 12, generator=g)
    mask = (torch.rand(3, 1, 8, 12, generator=g) > 0.5).float()
    step = flow_step(x0, torch.Generator().manual_seed(7), sched, scheme, resolution_shift=resolution_shift)
    want = _flow_step_by_hand(x0, 7, sched, scheme, resolution_shift, v_pred)
    assert isinstance(step, FlowStep) and step.x_t.dtype == step.sigmas.dtype == torch.float32
    assert step.sigmas.shape == step.model_timesteps.shape == (3,)
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for name in ("noise", "sigmas", "model_timesteps", "x_t", "target"):
        torch.testing.assert_close(getattr(step, name).double(), want[name], msg=name, **tol)
    torch.testing.assert_close(step.loss(v_pred).double(), want["loss"], **tol)
    torch.testing.assert_close(step.predicted_clean_latents(v_pred).double(), want["z_pred"], **tol)
    masked = _flow_step_by_hand(x0, 7, sched, scheme, resolution_shift, v_pred, masked_flow_weight(mask, 0.1))
    torch.testing.assert_close(step.loss(v_pred, masked_flow_weight(mask, 0.1)).double(), masked["loss"], **tol)


def test_flow_step_draws_only_the_noise_then_u():
    """After flow_step the generator stands where the noise and ``u`` leave it: callers draw on from there."""
    sched = _flux_training_scheduler()
    x0 = torch.randn(2, 16, 4, 4)
    g, ref = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    flow_step(x0, g, sched, "logit_normal")
    torch.randn(x0.shape, generator=ref)
    sample_timestep_density("logit_normal", 2, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


# Two compositions of the same float32 operations: equal up to rounding (another CPU's kernels may round a last bit
# differently), while a different formula, weighting or draw order would differ by far more.
FLOAT32_ROUNDING = {"rtol": 1e-6, "atol": 1e-7}

def _velocity(x_t: torch.Tensor, model_timesteps: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for the transformer: depends on both inputs, so any change in either shows."""
    return torch.tanh(x_t.flip(1)) * (1.0 + model_timesteps.view(-1, 1, 1, 1)) - 0.3 * x_t


@pytest.mark.parametrize("resolution_shift", [False, True])
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"])
def test_flow_step_computes_the_trainers_numbers(scheme, resolution_shift):
    """The trainer's step composed from the single helpers in its draw order, masked and not, to float32 rounding:
    the loss, z_pred, and the noise levels the geometry terms weight by."""
    sched = _flux_training_scheduler()
    x0 = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:6, 3:7] = 1.0
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float32)
    u = sample_timestep_density(scheme, 2, 0.0, 1.0, 1.29, generator=gen)
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, sched)
    if resolution_shift:
        sigmas = shift_sigmas_for_resolution(sigmas, 16)
        timesteps = sigmas * sched.config.num_train_timesteps
    sig = sigmas.view(-1, 1, 1, 1)
    x_t = add_noise(x0.float(), noise, sig)
    t_in = timesteps / sched.config.num_train_timesteps
    v_pred = _velocity(x_t, t_in)
    weighting = loss_weighting(scheme, sig)
    want_plain = flow_matching_loss(v_pred, velocity_target(x0, noise), weighting)
    want_masked = flow_matching_loss(v_pred, velocity_target(x0, noise), weighting * masked_flow_weight(mask, 0.1))
    want_z = predicted_clean_latents(x_t, v_pred, sig)

    step = flow_step(x0, torch.Generator().manual_seed(5), sched, scheme, 0.0, 1.0, 1.29, resolution_shift)
    v = _velocity(step.x_t, step.model_timesteps)
    for got, want in ((step.x_t, x_t), (step.model_timesteps, t_in), (step.sigmas, sigmas), (step.loss(v), want_plain),
                      (step.loss(v, masked_flow_weight(mask, 0.1)), want_masked), (step.predicted_clean_latents(v), want_z)):
        torch.testing.assert_close(got, want, **FLOAT32_ROUNDING)


def test_flow_step_computes_the_tiny_pretraining_numbers():
    """The tiny model's pretraining step composed from the single helpers (uniform density, no loss weighting):
    the same loss (to float32 rounding), and the guidance drawn after it from the same generator position."""
    sched = _flux_training_scheduler()
    x0 = torch.randn(4, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(x0.shape, generator=gen)
    u = sample_timestep_density("none", 4, generator=gen)
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, sched)
    x_t = add_noise(x0, noise, sigmas.view(-1, 1, 1, 1))
    t_in = timesteps / float(sched.config.num_train_timesteps)
    want = flow_matching_loss(_velocity(x_t, t_in), velocity_target(x0, noise))
    want_guidance = float(torch.rand((), generator=gen))

    new_gen = torch.Generator().manual_seed(2)
    step = flow_step(x0, new_gen, sched)
    torch.testing.assert_close(step.model_timesteps, t_in, **FLOAT32_ROUNDING)
    torch.testing.assert_close(step.loss(_velocity(step.x_t, step.model_timesteps)), want, **FLOAT32_ROUNDING)
    assert float(torch.rand((), generator=new_gen)) == want_guidance
