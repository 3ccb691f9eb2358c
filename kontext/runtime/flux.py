"""FLUX.1 Kontext tensor plumbing for training: latent packing, position ids, encoders, the transformer call.

Everything here follows ``FluxKontextPipeline``'s own conventions (it calls the pipeline's static
``_pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids``), so a LoRA trained with it sees
exactly the token layout the pipeline produces at inference: target tokens first, then the context
tokens, whose image ids carry 1 in channel 0.
"""

from __future__ import annotations

import torch
from diffusers import FluxKontextPipeline

from data.buckets import VAE_SCALE_FACTOR


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` latents -> ``[B, (h/2)*(w/2), 4*C]`` tokens (the pipeline's 2x2 packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even for 2x2 packing; got {h}x{w}")
    return FluxKontextPipeline._pack_latents(latents, b, c, h, w)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """``[B, (h/2)*(w/2), 4*C]`` tokens -> ``[B, C, h, w]`` latents (inverse of :func:`pack_latents`)."""
    return FluxKontextPipeline._unpack_latents(
        tokens, latent_height * VAE_SCALE_FACTOR, latent_width * VAE_SCALE_FACTOR, VAE_SCALE_FACTOR
    )


def latent_image_ids(
    latent_height: int, latent_width: int, device: torch.device, dtype: torch.dtype, context: bool = False
) -> torch.Tensor:
    """Position ids ``[(h/2)*(w/2), 3]`` for packed tokens; context tokens get channel 0 set to 1."""
    ids = FluxKontextPipeline._prepare_latent_image_ids(1, latent_height // 2, latent_width // 2, device, dtype)
    if context:
        ids[..., 0] = 1
    return ids


def encode_images(vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` pixels in [-1, 1] -> normalised latents ``[B, 16, H/8, W/8]`` (``(mode - shift) * scale``)."""
    dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    latents = dist.mode()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def decode_latents(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents ``[B, 16, h, w]`` -> pixels ``[B, 3, 8h, 8w]`` in [-1, 1] (inverse of :func:`encode_images`)."""
    latents = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0].clamp(-1, 1)


@torch.no_grad()
def encode_prompts(
    pipe: FluxKontextPipeline, prompts: list[str], max_sequence_length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (T5 ``prompt_embeds [B, L, D]``, CLIP ``pooled_prompt_embeds [B, Dp]``), via the pipeline."""
    prompt_embeds, pooled, _ = pipe.encode_prompt(
        prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=max_sequence_length
    )
    return prompt_embeds, pooled


def predict_velocity(
    transformer: torch.nn.Module,
    noisy_latents: torch.Tensor,
    context_latents: torch.Tensor,
    timestep: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """Run the Kontext transformer on ``x_t`` with the context appended; return ``v_pred [B, C, h, w]``.

    Args:
        noisy_latents: ``x_t`` ``[B, 16, h, w]``.
        context_latents: ``c`` ``[B, 16, hc, wc]`` (may differ in size from the target).
        timestep: ``[B]`` in [0, 1]: the scheduler timestep / 1000, as the pipeline passes it (the
            transformer multiplies by 1000 inside).
        prompt_embeds: ``[B, L, D]``; pooled_prompt_embeds: ``[B, Dp]``.
        guidance_scale: value of the guidance embedding (FLUX.1 Kontext [dev] is guidance-distilled: it has one).
    """
    b, _, h, w = noisy_latents.shape
    hc, wc = context_latents.shape[-2:]
    dtype = noisy_latents.dtype
    device = noisy_latents.device
    target_tokens = pack_latents(noisy_latents)
    tokens = torch.cat([target_tokens, pack_latents(context_latents.to(dtype))], dim=1)
    img_ids = torch.cat(
        [latent_image_ids(h, w, device, dtype), latent_image_ids(hc, wc, device, dtype, context=True)], dim=0
    )
    txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
    guidance = torch.full((b,), float(guidance_scale), device=device, dtype=torch.float32)
    out = transformer(
        hidden_states=tokens,
        timestep=timestep.to(dtype),
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        txt_ids=txt_ids,
        img_ids=img_ids,
        return_dict=False,
    )[0]
    # The output holds a prediction for every token; only the target tokens are supervised.
    return unpack_latents(out[:, : target_tokens.shape[1]], h, w)
