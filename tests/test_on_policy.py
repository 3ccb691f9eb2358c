"""Geometry on the model's own samples (``loss.on_policy``) and the noise placement of the geometry terms.

The rollout follows the pipeline's own schedule without gradient; one prediction from where it stops is
judged by the geometry terms; the flow loss is untouched.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as pipeline_shift

from kontext.runtime.flux import predict_velocity
from kontext.training.config import ConfigError, config_from_dict
from losses import GeometryLossWeights, geometry_loss, noise_level_weight
from losses import flow_matching as fm
from test_train_step import _batch, _loss
from train_kontext_lora import on_policy_rollout


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    pipe = FluxKontextPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe.transformer.eval(), sched


@pytest.mark.parametrize("steps,seq_len", [(12, 256), (28, 4096), (8, 1024), (2, 64)])
def test_sampling_sigmas_are_the_pipelines_schedule(tiny, steps, seq_len):
    """The schedule the rollout follows is what FluxKontextPipeline hands its scheduler (set_timesteps(sigmas, mu))."""
    _, sched = tiny
    c = sched.config
    ref = FlowMatchEulerDiscreteScheduler.from_config(c)
    mu = pipeline_shift(seq_len, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = fm.sampling_sigmas(steps, seq_len, c)
    assert ours.shape == (steps + 1,) and float(ours[-1]) == 0.0
    torch.testing.assert_close(ours, ref.sigmas.float(), rtol=1e-5, atol=1e-6)


def test_euler_step_is_the_schedulers_step(tiny):
    _, sched = tiny
    ref = FlowMatchEulerDiscreteScheduler.from_config(sched.config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4), mu=0.5)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    want = ref.step(v, ref.timesteps[1], x, return_dict=False)[0]
    torch.testing.assert_close(fm.euler_step(x, v, ref.sigmas[1], ref.sigmas[2]), want)


def test_inverse_sigma_pushes_the_velocity_in_proportion_to_sigma():
    """Through z_pred = x_t - sigma v a squared term has curvature sigma^2 in v: weight * sigma^2 is the push."""
    sig = torch.tensor([0.05, 0.1, 0.3, 0.6, 0.9, 1.0])
    w = noise_level_weight(sig, "inverse_sigma")
    torch.testing.assert_close(w, torch.tensor([10.0, 10.0, 1 / 0.3, 1 / 0.6, 1 / 0.9, 1.0]))
    push = w * sig.square()
    torch.testing.assert_close(push[1:], sig[1:])  # above the floor the push is sigma itself
    old = noise_level_weight(sig, "one_minus_sigma") * sig.square()
    assert float(old[-1]) == pytest.approx(0.0) and float(push[-1]) == pytest.approx(1.0)  # one_minus_sigma: none at pure noise


def _rollout_by_hand(transformer, sched, batch, cfg, seed):
    """The on-policy micro-batch written out: the same draws in the same order as compute_loss documents
    (noise, u, the on-policy coin, sigma_stop, the rollout's noise), the pipeline's schedule, Euler steps."""
    on_policy = cfg.loss.on_policy
    x0 = batch.target_latents
    b, _, h, w = x0.shape
    g = torch.Generator().manual_seed(seed)
    torch.randn(x0.shape, generator=g)  # the flow's noise
    fm.sample_timestep_density(cfg.train.weighting_scheme, b, generator=g)  # its timesteps
    coin = float(torch.rand((), generator=g))
    stop = on_policy.sigma_min + (on_policy.sigma_max - on_policy.sigma_min) * float(torch.rand((), generator=g))
    x = torch.randn(x0.shape, generator=g)
    sigmas = fm.sampling_sigmas(on_policy.sampler_steps, (h // 2) * (w // 2), sched.config)
    i = 0
    with torch.no_grad():
        while float(sigmas[i]) > stop and i < on_policy.sampler_steps - 1:
            v = predict_velocity(transformer, x, batch.context_latents, sigmas[i].expand(b), batch.prompt_embeds,
                                 batch.pooled_prompt_embeds, cfg.model.guidance_scale)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            i += 1
        v = predict_velocity(transformer, x, batch.context_latents, sigmas[i].expand(b), batch.prompt_embeds,
                             batch.pooled_prompt_embeds, cfg.model.guidance_scale)
    return coin, i, x - sigmas[i] * v


def test_on_policy_judges_the_models_own_sample_and_leaves_the_flow_loss(tiny):
    transformer, sched = tiny
    batch = _batch(transformer, seed=4)
    on = config_from_dict({"loss": {"geometry": {"enabled": True},
                                    "on_policy": {"enabled": True, "fraction": 1.0, "weight": 0.7}}})
    off = config_from_dict({"loss": {"geometry": {"enabled": True}}})
    calls = []
    handle = transformer.register_forward_hook(lambda m, a, k, out: calls.append(out[0].requires_grad), with_kwargs=True)
    try:
        with torch.enable_grad():
            transformer.requires_grad_(True)  # stands in for the LoRA: a graph exists where gradients are asked for
            _, logs_on = _loss(transformer, batch, on, torch.Generator().manual_seed(21), sched)
            n_on = list(calls)
            calls.clear()
            _, logs_off = _loss(transformer, batch, off, torch.Generator().manual_seed(21), sched)
    finally:
        transformer.requires_grad_(False)
        handle.remove()
    coin, steps, z_own = _rollout_by_hand(transformer, sched, batch, on, seed=21)
    assert coin < 1.0 and steps >= 1
    # The rollout runs without a graph; one forward (teacher-forced and on-policy inputs together) has one.
    assert n_on == [False] * steps + [True] and calls == [True]
    torch.testing.assert_close(logs_on["loss/flow"], logs_off["loss/flow"])
    geometry = on.loss.geometry
    want, parts = geometry_loss(
        z_own, batch.target_latents, batch.scene_latents, batch.geometry,
        GeometryLossWeights(geometry.mse, geometry.bg, geometry.dice, geometry.area, geometry.boundary),
        temperature=geometry.temperature,
    )
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs_on["loss/geometry"], 0.7 * want, **tol)
    for k, v in parts.items():
        torch.testing.assert_close(logs_on[f"loss/{k}"], v, msg=k, **tol)
    torch.testing.assert_close(logs_on["loss/total"], logs_on["loss/flow"] + 0.7 * want, **tol)


def test_on_policy_fraction_picks_micro_batches_from_the_step_stream(tiny):
    """With fraction f, the micro-batches whose coin falls below f are judged on-policy; the others exactly as
    without on-policy (same numbers), so turning it on changes nothing but those."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=5)
    on = config_from_dict({"loss": {"geometry": {"enabled": True}, "on_policy": {"enabled": True, "fraction": 0.5}}})
    off = config_from_dict({"loss": {"geometry": {"enabled": True}}})
    kinds = []
    for seed in range(8):
        with torch.no_grad():
            _, a = _loss(transformer, batch, on, torch.Generator().manual_seed(seed), sched)
            _, b = _loss(transformer, batch, off, torch.Generator().manual_seed(seed), sched)
        g = torch.Generator().manual_seed(seed)
        torch.randn(batch.target_latents.shape, generator=g)
        fm.sample_timestep_density("none", 2, generator=g)
        chosen = float(torch.rand((), generator=g)) < 0.5
        torch.testing.assert_close(a["loss/flow"], b["loss/flow"])
        if chosen:
            assert not torch.allclose(a["loss/geometry"], b["loss/geometry"])
        else:
            torch.testing.assert_close(a["loss/total"], b["loss/total"])
        kinds.append(chosen)
    assert any(kinds) and not all(kinds)


def test_on_policy_config_errors_name_the_keys():
    with pytest.raises(ConfigError, match=r"loss\.on_policy\.enabled.*loss\.geometry\.enabled"):
        config_from_dict({"loss": {"on_policy": {"enabled": True}}})  # the geometry terms are off by default
    with pytest.raises(ConfigError, match=r"sigma_min.*above.*sigma_max"):
        config_from_dict({"loss": {"on_policy": {"sigma_min": 0.9, "sigma_max": 0.6}}})
    with pytest.raises(ConfigError, match=r"loss\.on_policy\.fraction"):
        config_from_dict({"loss": {"on_policy": {"fraction": 0.0}}})


def test_a_stop_below_the_schedule_predicts_at_its_last_noise_level(tiny):
    """sigma_stop under the last non-zero sigma of the schedule: the prediction is made there, never at sigma 0
    (where z_pred is the sample itself and nothing would be trained)."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=6)
    on_policy = config_from_dict({"loss": {"geometry": {"enabled": True},
                                    "on_policy": {"enabled": True, "sigma_min": 0.01, "sigma_max": 0.01,
                                                  "sampler_steps": 4}}}).loss.on_policy
    sigmas = fm.sampling_sigmas(4, 16, sched.config)
    assert float(sigmas[-2]) > 0.01
    _, sigma_s = on_policy_rollout(transformer, batch, on_policy, 1.0, torch.Generator().manual_seed(0), sched.config)
    assert float(sigma_s) == pytest.approx(float(sigmas[-2])) and float(sigma_s) > 0
