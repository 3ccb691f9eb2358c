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


def _loss(transformer, batch, cfg, generator, sched):
    """The trainer's ``compute_loss`` with the sections of ``cfg`` it takes."""
    return compute_loss(transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale, generator, sched)


def _pixel_masks(b: int, h: int, w: int) -> torch.Tensor:
    """``[b, 1, 8h, 8w]`` pixel masks: sample 0 on whole latent cells, sample 1 cutting through cells."""
    mask = torch.zeros(b, 1, h * 8, w * 8)
    mask[0, :, 8:40, 16:48] = 1.0
    mask[1, :, 20:60, 4:30] = 1.0
    return mask


def _batch(transformer, b=2, h=8, w=8, seed=0, hc=None, wc=None):
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    hc, wc = hc or h, wc or w
    from losses import compute_mask_targets

    return TrainBatch(
        target_latents=torch.randn(b, 16, h, w, generator=g),
        context_latents=torch.randn(b, 16, hc, wc, generator=g),
        # The un-hinted scene differs from the (hinted) context the model is conditioned on.
        scene_latents=torch.randn(b, 16, h, w, generator=g),
        prompt_embeds=torch.randn(b, 12, cfg.joint_attention_dim, generator=g),
        pooled_prompt_embeds=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        geometry=compute_mask_targets(_pixel_masks(b, h, w), (h, w), band_r=1, sdm_normalize=True),
    )


def _diffusers_script_velocity(transformer, sched, batch, scheme, seed, guidance=1.0) -> dict[str, torch.Tensor]:
    """Noise, sigmas ``[B, 1, 1, 1]``, ``x_t`` and the predicted velocity ``v`` of the target tokens, exactly as
    diffusers' train_dreambooth_lora_flux_kontext.py computes them, from its helpers and the pipeline's packing."""
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
    return {"noise": noise, "sigmas": sigmas, "x_t": noisy, "v": pred}


def _diffusers_script_loss(transformer, sched, batch, scheme, seed, guidance=1.0):
    """The base loss exactly as diffusers' train_dreambooth_lora_flux_kontext.py computes it, from its helpers."""
    r = _diffusers_script_velocity(transformer, sched, batch, scheme, seed, guidance)
    model_input = batch.target_latents
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=r["sigmas"])
    target = r["noise"] - model_input
    loss = torch.mean((weighting.float() * (r["v"].float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


def _targets_by_hand(mask_px: torch.Tensor, r: int = 1) -> dict[str, torch.Tensor]:
    """Latent mask, boundary band, sure background and normalised SDM of pixel masks, written out in float64.

    The latent mask is the mean of each 8x8 pixel cell; with ``b = mask > 0.5`` and the (2r+1)^2 square, the band is
    ``dilate(b) and not erode(b)`` (the image border erodes nothing), the sure background ``not dilate(b)``; the
    SDM is ``d_in - 0.5`` outside and ``0.5 - d_out`` inside (brute-force Euclidean distances between cell centres
    to the nearest inside / outside cell), divided by its max ``|phi|``.
    """
    m = mask_px.double().unflatten(2, (-1, 8)).unflatten(4, (-1, 8)).mean(dim=(3, 5))
    inside = m > 0.5
    h, w = m.shape[-2:]

    def any_in_square(x: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(x.double(), (r, r, r, r))  # beyond the image: nothing
        shifts = [padded[..., dy : dy + h, dx : dx + w] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
        return torch.stack(shifts).amax(dim=0) > 0

    dilated = any_in_square(inside)
    eroded = ~any_in_square(~inside)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1).double()
    dist = torch.cdist(centres, centres)
    sdm = []
    for cells in inside.flatten(1):
        phi = torch.where(cells, 0.5 - dist[:, ~cells].amin(dim=1), dist[:, cells].amin(dim=1) - 0.5)
        sdm.append((phi / phi.abs().max()).view(1, h, w))
    return {"mask": m, "band": dilated & ~eroded, "outside": ~dilated, "sdm": torch.stack(sdm)}


def _geometry_by_hand(z, x0, scene, mask_px, sample_weights, formulation):
    """The geometry total ``1.0 mse + 0.6 bg + 0.9 dice + 0.2 area + 0.4 boundary`` (``w_in=1, w_band=6,
    w_out=0.2``, ``k_sigma=2``, ``temperature=0.25``), each term written out from its formula in float64.

    Returns ``(mean_b(sample_weights[b] * total[b]), {term: batch mean})``.
    """
    t = _targets_by_hand(mask_px)
    m, band, outside, phi = t["mask"], t["band"], t["outside"], t["sdm"]
    out = outside.double()
    z, x0, scene = z.double(), x0.double(), scene.double()
    dims = (1, 2, 3)
    weight = torch.where(band, 6.0, 1.0 * m + 0.2 * (1.0 - m))
    mse = (weight * ((z - x0) ** 2).mean(dim=1, keepdim=True)).mean(dim=dims)
    D = ((z - scene) ** 2).sum(dim=1, keepdim=True).sqrt()
    if formulation == "reference":
        bg = (out * ((z - scene) ** 2).mean(dim=1, keepdim=True)).sum(dim=dims) / out.sum(dim=dims)
        tau, s = [], []
        for d, o in zip(D, outside):
            values = d[o]
            std = values.std(unbiased=False).clamp_min(1e-3)
            tau.append(values.mean() + 2.0 * std)
            s.append(std)
        p = torch.sigmoid((D - torch.stack(tau).view(-1, 1, 1, 1)) / torch.stack(s).view(-1, 1, 1, 1))
        dice = 1.0 - (2.0 * (p * m).sum(dim=dims) + 1.0) / (p.sum(dim=dims) + m.sum(dim=dims) + 1.0)
        area = torch.log((p.sum(dim=dims) + 1.0) / (m.sum(dim=dims) + 1.0)) ** 2
        boundary = (p * phi).mean(dim=dims)
    else:
        D_tgt = ((x0 - scene) ** 2).sum(dim=1, keepdim=True).sqrt()
        mu_in = torch.stack([d[i].mean() for d, i in zip(D_tgt, m >= 0.5)]).view(-1, 1, 1, 1)
        mu_out = torch.stack([d[o].mean() for d, o in zip(D_tgt, outside)]).view(-1, 1, 1, 1)
        tau = 0.5 * (mu_in + mu_out)
        s = (0.25 * (mu_in - mu_out)).clamp_min(1e-3)
        p = torch.sigmoid((D - tau) / s)
        q = torch.sigmoid((D_tgt - tau) / s)
        bg = (out * (D - D_tgt) ** 2 / z.shape[1]).sum(dim=dims) / out.sum(dim=dims)
        dice = ((p - q) ** 2).sum(dim=dims) / ((p**2).sum(dim=dims) + (q**2).sum(dim=dims) + 1.0)
        near = 1.0 - out
        area = torch.log(((near * p).sum(dim=dims) + 1.0) / ((near * q).sum(dim=dims) + 1.0)) ** 2
        boundary = (phi.abs() * (p - q) ** 2).mean(dim=dims)
    terms = {"mse": mse, "bg": bg, "dice": dice, "area": area, "boundary": boundary}
    per_sample = 1.0 * mse + 0.6 * bg + 0.9 * dice + 0.2 * area + 0.4 * boundary
    return (sample_weights.double() * per_sample).mean(), {k: v.mean() for k, v in terms.items()}


@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"])
def test_base_loss_equals_diffusers_kontext_script(tiny, scheme):
    transformer, sched = tiny
    batch = _batch(transformer, seed=1)
    cfg = config_from_dict({"train": {"weighting_scheme": scheme}, "loss": {"masked": {"enabled": False}}})
    with torch.no_grad():
        ours, logs = _loss(transformer, batch, cfg, torch.Generator().manual_seed(5), sched)
    ref = _diffusers_script_loss(transformer, sched, batch, scheme, seed=5)
    assert torch.isfinite(ref)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    assert set(logs) == {"loss/flow", "loss/total"}


def test_base_loss_parity_with_context_of_other_size(tiny):
    """Kontext allows a context image of another resolution than the target; ids and slicing must follow."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=2, h=8, w=8, hc=6, wc=10)
    batch = dataclasses.replace(batch, geometry=None)
    cfg = config_from_dict({"loss": {"masked": {"enabled": False}}})
    with torch.no_grad():
        ours, _ = _loss(transformer, batch, cfg, torch.Generator().manual_seed(9), sched)
    ref = _diffusers_script_loss(transformer, sched, batch, "none", seed=9)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_geometry_on_adds_the_reference_composition_written_out(tiny):
    """Geometry on (``formulation: reference``) = flow loss + weight * (1.0 mse + 0.6 bg + 0.9 dice + 0.2 area +
    0.4 boundary) on z_pred = x_t - sigma v_pred, every term and the mask targets written out in the test from
    the pixel masks, with the terms that ask "what changed" taken against the un-hinted scene."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=3)
    on = config_from_dict({"loss": {"masked": {"enabled": False},
                                    "geometry": {"enabled": True, "noise_weighting": "none", "weight": 0.5,
                                                 "formulation": "reference"}}})
    with torch.no_grad():
        total, logs = _loss(transformer, batch, on, torch.Generator().manual_seed(11), sched)
        r = _diffusers_script_velocity(transformer, sched, batch, "none", seed=11)
    x0 = batch.target_latents
    z_pred = r["x_t"] - r["sigmas"] * r["v"]
    flow = ((r["v"] - (r["noise"] - x0)) ** 2).mean()
    geo, terms = _geometry_by_hand(z_pred, x0, batch.scene_latents, _pixel_masks(2, 8, 8), torch.ones(2), "reference")

    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logs["loss/flow"].double(), flow.double(), **tol)
    for k, want in terms.items():
        torch.testing.assert_close(logs[f"loss/{k}"].double(), want, msg=k, **tol)
    torch.testing.assert_close(logs["loss/geometry"].double(), geo, **tol)
    torch.testing.assert_close(total.double(), flow.double() + 0.5 * geo, **tol)
    assert 0.5 * float(geo) > 0.1 * float(flow)  # the geometry part is not lost in the tolerance


def test_geometry_on_is_the_calibrated_formulation_against_the_scene(tiny):
    """The geometry terms, once on, are the calibrated formulation on (z_pred, target, scene), each sample
    weighted by 1 - sigma, written out in the test; the hinted context only conditions the model: replacing the
    scene with it leaves the prediction (and the flow loss) as it is and changes the terms."""
    transformer, sched = tiny
    batch = _batch(transformer, seed=7)
    cfg = config_from_dict({"loss": {"geometry": {"enabled": True}, "masked": {"enabled": False}}})
    assert cfg.loss.geometry.formulation == "calibrated"
    with torch.no_grad():
        _, logs = _loss(transformer, batch, cfg, torch.Generator().manual_seed(3), sched)
        r = _diffusers_script_velocity(transformer, sched, batch, "none", seed=3)
        hinted_as_scene = dataclasses.replace(batch, scene_latents=batch.context_latents)
        _, logs_hint = _loss(transformer, hinted_as_scene, cfg, torch.Generator().manual_seed(3), sched)
    x0 = batch.target_latents
    z_pred = r["x_t"] - r["sigmas"] * r["v"]
    sigmas = r["sigmas"].flatten()
    assert (sigmas < 0.9).all()  # every sample's geometry weight 1 - sigma is far from 0
    weighted, terms = _geometry_by_hand(
        z_pred, x0, batch.scene_latents, _pixel_masks(2, 8, 8), 1.0 - sigmas, "calibrated"
    )
    tol = dict(rtol=1e-4, atol=1e-6)
    # loss/<term> logs the unweighted batch means; the weighted total is loss/total - loss/flow.
    for k, want in terms.items():
        torch.testing.assert_close(logs[f"loss/{k}"].double(), want, msg=k, **tol)
    torch.testing.assert_close((logs["loss/total"] - logs["loss/flow"]).double(), weighted, **tol)
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
    loss, _ = _loss(transformer, batch, cfg, torch.Generator().manual_seed(0), sched)
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


@pytest.mark.parametrize("masked", [False, True])
def test_trainer_and_pretraining_share_the_flow_step(tiny, masked):
    """The trainer's flow loss, the tiny model's pretraining loss and flow_step with the transformer are one
    computation: the same loss from the same generator, to float32 rounding (guidance fixed for the pretraining's
    draw)."""
    from kontext.tiny.pretrain import pretrain_loss
    from losses import flow_matching as fm

    transformer, sched = tiny
    batch = _batch(transformer, seed=12)
    cfg = config_from_dict({"loss": {"masked": {"enabled": masked}}, "model": {"guidance_scale": 2.5}})
    with torch.no_grad():
        trainer, logs = _loss(transformer, batch, cfg, torch.Generator().manual_seed(4), sched)
        step = fm.flow_step(batch.target_latents, torch.Generator().manual_seed(4), sched)
        v = predict_velocity(transformer, step.x_t, batch.context_latents, step.model_timesteps, batch.prompt_embeds,
                             batch.pooled_prompt_embeds, 2.5)
        weight = fm.masked_flow_weight(batch.geometry.mask, cfg.loss.masked.unmasked_weight) if masked else None
        shared = step.loss(v, weight)
        pretraining = pretrain_loss(transformer, batch.target_latents, batch.context_latents, batch.prompt_embeds,
                                    batch.pooled_prompt_embeds, torch.Generator().manual_seed(4), sched, (2.5, 2.5))
    rounding = {"rtol": 1e-6, "atol": 1e-7}  # float32 rounding; another formula or draw order is far off
    torch.testing.assert_close(trainer, shared, **rounding)
    torch.testing.assert_close(logs["loss/flow"], shared, **rounding)
    if not masked:
        torch.testing.assert_close(pretraining, shared, **rounding)
