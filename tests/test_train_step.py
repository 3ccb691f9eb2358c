"""The training step's math: parity with diffusers' Kontext training script, and the geometry terms on top."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from kontext.training.config import config_from_dict
from kontext.runtime.flux import pack_latents, predict_velocity, unpack_latents
from data.dataset import TrainBatch
from train_kontext_lora import compute_loss


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    pipe = FluxKontextPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe.transformer.eval(), sched


def _batch(transformer, b=2, h=8, w=8, seed=0, hc=None, wc=None):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    hc, wc = hc or h, wc or w
    from losses import compute_mask_targets

    mask = torch.zeros(b, 1, h * 8, w * 8)
    mask[0, :, 8:40, 16:48] = 1.0
    mask[1, :, 20:60, 4:30] = 1.0
    return TrainBatch(
        target_latents=torch.randn(b, 16, h, w, generator=g),
        context_latents=torch.randn(b, 16, hc, wc, generator=g),
        # The un-hinted scene differs from the (hinted) context the model is conditioned on.
        scene_latents=torch.randn(b, 16, h, w, generator=g),
        prompt_embeds=torch.randn(b, 12, cfg.joint_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        geometry=compute_mask_targets(mask, (h, w), band_r=1, sdm_normalize=True),
    )


def _diffusers_script_loss(transformer, sched, batch, scheme, seed, guidance=1.0):
    """The base loss exactly as diffusers' train_dreambooth_lora_flux_kontext.py computes it, from its helpers."""
    model_input = batch.target_latents
    cond_model_input = batch.context_latents
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(model_input.shape, generator=g)
    bsz = model_input.shape[0]
    u = compute_density_for_timestep_sampling(
        weighting_scheme=scheme, batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29, generator=g
    )
    indices = (u * sched.config.num_train_timesteps).long()
    timesteps = sched.timesteps[indices]
    step_indices = [(sched.timesteps == t).nonzero().item() for t in timesteps]
    sigmas = sched.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
    latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(
        bsz, model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", torch.float32
    )
    cond_ids = FluxKontextPipeline._prepare_latent_image_ids(
        bsz, cond_model_input.shape[2] // 2, cond_model_input.shape[3] // 2, "cpu", torch.float32
    )
    cond_ids[..., 0] = 1
    latent_image_ids = torch.cat([latent_image_ids, cond_ids], dim=0)
    noisy = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxKontextPipeline._pack_latents(noisy, bsz, 16, model_input.shape[2], model_input.shape[3])
    n_target = packed.shape[1]
    packed_cond = FluxKontextPipeline._pack_latents(
        cond_model_input, bsz, 16, cond_model_input.shape[2], cond_model_input.shape[3]
    )
    packed = torch.cat([packed, packed_cond], dim=1)
    guidance_t = torch.tensor([guidance]).expand(bsz)
    text_ids = torch.zeros(batch.prompt_embeds.shape[1], 3)
    with torch.no_grad():
        pred = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            guidance=guidance_t,
            pooled_projections=batch.pooled_prompt_embeds,
            encoder_hidden_states=batch.prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            return_dict=False,
        )[0]
    pred = pred[:, :n_target]
    pred = FluxKontextPipeline._unpack_latents(pred, model_input.shape[2] * 8, model_input.shape[3] * 8, 8)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_base_loss_equals_diffusers_kontext_script(tiny, scheme):
    transformer, sched = tiny
    batch = _batch(transformer, seed=1)
    cfg = config_from_dict({"train": {"weighting_scheme": scheme}, "loss": {"geometry": {"enabled": False}}})
    with torch.no_grad():
        ours, logs = compute_loss(transformer, batch, cfg, torch.Generator().manual_seed(5), sched)
    ref = _diffusers_script_loss(transformer, sched, batch, scheme, seed=5)
    assert torch.isfinite(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"loss/flow", "loss/total"}


def test_base_loss_parity_with_context_of_other_size(tiny):
    """Kontext allows a context image of another resolution than the target; ids and slicing must follow."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=2, h=8, w=8, hc=6, wc=10)
    batch = dataclasses.replace(batch, geometry=None)
    cfg = config_from_dict({"loss": {"geometry": {"enabled": False}}})
    with torch.no_grad():
        ours, _ = compute_loss(transformer, batch, cfg, torch.Generator().manual_seed(9), sched)
    ref = _diffusers_script_loss(transformer, sched, batch, "none", seed=9)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_geometry_adds_exactly_the_seed_composition(tiny):
    """Geometry on = flow loss + weight * (the spec's starter composition on z_pred = x_t - sigma v_pred),
    with the terms that ask "what changed" taken against the un-hinted scene, never the hinted context."""
    from losses import (
        area_ratio_loss,
        background_preservation_mse_latent,
        boundary_loss,
        dice_loss,
        soft_change_mask_from_latents,
        weighted_masked_mse_latent,
    )
    from losses import flow_matching as fm

    transformer, sched = tiny
    batch = _batch(transformer, seed=3)
    on = config_from_dict({"loss": {"geometry": {"noise_weighting": "none", "weight": 0.5, "formulation": "seed"}}})
    off = config_from_dict({"loss": {"geometry": {"enabled": False}}})
    with torch.no_grad():
        t_on, l_on = compute_loss(transformer, batch, on, torch.Generator().manual_seed(11), sched)
        t_off, l_off = compute_loss(transformer, batch, off, torch.Generator().manual_seed(11), sched)

        # Independent recomputation of z_pred and the seed-API composition.
        g = torch.Generator().manual_seed(11)
        x0, ctx = batch.target_latents, batch.context_latents
        noise = torch.randn(x0.shape, generator=g)
        u = compute_density_for_timestep_sampling("none", x0.shape[0], generator=g)
        timesteps, sigmas = fm.timesteps_and_sigmas_from_density(u, sched)
        s = sigmas.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = predict_velocity(transformer, x_t, ctx, timesteps / 1000, batch.prompt_embeds,
                             batch.pooled_prompt_embeds, 1.0)
        z = x_t - s * v
        M = batch.geometry.mask
        scene = batch.scene_latents
        l_mse = weighted_masked_mse_latent(z, x0, M, band_r=1, w_in=1.0, w_band=6.0, w_out=0.2)
        l_bg = background_preservation_mse_latent(z, scene, M, band_r=1)
        m_hat, _, _ = soft_change_mask_from_latents(z, scene, mask_latent=M, band_r=1, k_sigma=2.0)
        l_dice = dice_loss(m_hat, M)
        l_area = area_ratio_loss(m_hat, M)
        l_bnd = boundary_loss(m_hat, batch.geometry.sdm)
        geo = 1.0 * l_mse + 0.6 * l_bg + 0.9 * l_dice + 0.2 * l_area + 0.4 * l_bnd

    torch.testing.assert_close(l_on["loss/flow"], l_off["loss/flow"])
    torch.testing.assert_close(t_off, l_off["loss/flow"])
    torch.testing.assert_close(l_on["loss/geometry"], geo, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(t_on, t_off + 0.5 * geo, rtol=1e-4, atol=1e-5)
    for k in ("mse", "bg", "dice", "area", "boundary"):
        assert f"loss/{k}" in l_on


def test_default_geometry_is_the_calibrated_formulation_against_the_scene(tiny):
    """The trainer's default geometry term is ``geometry_loss`` on (z_pred, target, scene); the hinted context
    only conditions the model: replacing it changes the prediction, replacing the scene changes only the terms."""
    from losses import geometry_loss, noise_level_weight
    from losses import flow_matching as fm

    transformer, sched = tiny
    batch = _batch(transformer, seed=7)
    cfg = config_from_dict({})
    assert cfg.loss.geometry.formulation == "calibrated"
    with torch.no_grad():
        _, logs = compute_loss(transformer, batch, cfg, torch.Generator().manual_seed(3), sched)
        g = torch.Generator().manual_seed(3)
        x0 = batch.target_latents
        noise = torch.randn(x0.shape, generator=g)
        u = compute_density_for_timestep_sampling("none", x0.shape[0], generator=g)
        timesteps, sigmas = fm.timesteps_and_sigmas_from_density(u, sched)
        s = sigmas.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = predict_velocity(transformer, x_t, batch.context_latents, timesteps / 1000, batch.prompt_embeds,
                             batch.pooled_prompt_embeds, 1.0)
        want, _ = geometry_loss(x_t - s * v, x0, batch.scene_latents, batch.geometry,
                                sample_weights=noise_level_weight(sigmas, "one_minus_sigma"))
        hinted_as_scene = dataclasses.replace(batch, scene_latents=batch.context_latents)
        _, logs_hint = compute_loss(transformer, hinted_as_scene, cfg, torch.Generator().manual_seed(3), sched)
    # loss/geometry logs the unweighted batch mean; the weighted total is loss/total - loss/flow.
    torch.testing.assert_close(logs["loss/total"] - logs["loss/flow"], want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs_hint["loss/flow"], logs["loss/flow"])
    assert abs(float(logs_hint["loss/bg"]) - float(logs["loss/bg"])) > 1e-3


def test_geometry_gradient_reaches_only_the_target_tokens_velocity(tiny):
    """d(geometry)/d(output tokens) is zero on the context tokens and non-zero on the target tokens."""
    from kontext.runtime.flux import pack_latents as pack
    from losses import geometry_loss
    from losses import flow_matching as fm

    transformer, sched = tiny
    batch = _batch(transformer, seed=8)
    x0 = batch.target_latents
    n_target = pack(x0).shape[1]
    captured = {}

    def keep_output(module, args, kwargs, output):
        out = output[0]
        out.retain_grad()
        captured["out"] = out

    handle = transformer.register_forward_hook(keep_output, with_kwargs=True)
    try:
        sig = torch.full((2, 1, 1, 1), 0.4)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        x_t = fm.add_noise(x0, noise, sig)
        v = predict_velocity(transformer, x_t, batch.context_latents, torch.full((2,), 0.4),
                             batch.prompt_embeds, batch.pooled_prompt_embeds, 1.0)
        total, _ = geometry_loss(x_t - sig * v, x0, batch.scene_latents, batch.geometry)
        total.backward()
    finally:
        handle.remove()
    grad = captured["out"].grad
    assert grad[:, n_target:].abs().max() == 0
    assert grad[:, :n_target].abs().max() > 0


def test_gradients_reach_only_lora(tiny_model_dir):
    from kontext.runtime.lora import attach_lora, make_lora_config

    pipe = FluxKontextPipeline.from_pretrained(tiny_model_dir, dtype=torch.float32)
    transformer = pipe.transformer
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    params = attach_lora(transformer, make_lora_config(4, 8.0, 0.0, "default", ["attn.to_q", "attn.to_v", "proj_mlp"]))
    batch = _batch(transformer, seed=6)
    cfg = config_from_dict({})
    loss, _ = compute_loss(transformer, batch, cfg, torch.Generator().manual_seed(0), sched)
    loss.backward()
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    frozen = [p for n, p in transformer.named_parameters() if "lora_" not in n]
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)


def test_pack_unpack_roundtrip_matches_pipeline_layout():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 15, 64)
    torch.testing.assert_close(unpack_latents(tokens, 6, 10), x)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 4))
