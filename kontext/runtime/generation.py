"""Generation with ``FluxKontextPipeline`` for one (context, mask, prompt): the code validation, inference and
evaluation share.

The mask hint is drawn with :mod:`data.hint` (the code training uses), the pipeline is called at the sample's
own size (``max_area = height * width`` and ``_auto_resize=False``: otherwise the pipeline rescales every
request to about 1024x1024 and snaps the context to a preferred Kontext resolution, so a 64 px validation
image silently becomes a 1024 px generation), each image has its own seeded generator, and the result can be
composited back into the original context inside the mask only.

    from kontext.runtime.generation import generate
    out = generate(pipe, context_pil, "insert the bottle", mask_pil, mask_hint="fill", seed=0, num_inference_steps=28)
    out.images[0].save("result.png")
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from data.hint import MASK_HINT_MODES, apply_mask_hint_pil
from data.images import decode_mask, decode_rgb
from kontext.runtime.flux import VAE_SCALE_FACTOR, decode_latents, encode_images, unpack_latents

# The pipeline floors sizes to this multiple (VAE 8x times 2x2 packing).
SIZE_MULTIPLE = VAE_SCALE_FACTOR * 2
# FLUX.1 Kontext is trained around one megapixel; larger inputs are scaled down to this area by default.
DEFAULT_MAX_AREA = 1024 * 1024


@dataclass
class Generation:
    """The output of :func:`generate`.

    Attributes:
        images: ``num_images`` RGB results: at the generation size (W, H), or, when composited, at the context's
            original size (the result resized back and blended into the original context inside the mask).
        raw_images: the pipeline's decoded outputs before compositing (the same objects as ``images`` without it).
        latents: ``[N, 16, H/8, W/8]`` float32 normalised latents of the raw outputs (``(z - shift) * scale``).
        context: the un-hinted context actually used (resized to (W, H) if needed).
        hinted_context: the context with the mask hint drawn, as the model saw it.
        mask: the ``L`` insertion mask at (W, H), or None.
        seeds: the seed of each image's generator.
    """

    images: list[Image.Image]
    raw_images: list[Image.Image]
    latents: torch.Tensor
    context: Image.Image
    hinted_context: Image.Image
    mask: Image.Image | None
    seeds: list[int]


def fit_size(width: int, height: int, max_area: int | None = None, multiple: int = SIZE_MULTIPLE) -> tuple[int, int]:
    """(W, H) the model can generate for a ``width x height`` request: scaled down (aspect kept) to at most
    ``max_area`` pixels when given, then floored to ``multiple`` (at least one ``multiple``)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive; got {width}x{height}")
    if max_area is not None and width * height > max_area:
        s = math.sqrt(max_area / (width * height))
        width, height = width * s, height * s
    w = max(multiple, int(width) // multiple * multiple)
    h = max(multiple, int(height) // multiple * multiple)
    return w, h


def resize_pair(
    context: Image.Image, mask: Image.Image | None, size: tuple[int, int]
) -> tuple[Image.Image, Image.Image | None]:
    """Context (Lanczos, RGB) and mask (``L``, box filter: an area average, as training downsamples masks) at
    ``size`` = (W, H)."""
    context = context.convert("RGB")
    if mask is not None:
        mask = mask.convert("L")
        if mask.size != context.size:
            raise ValueError(
                f"the mask is {mask.size[0]}x{mask.size[1]} but the context image is "
                f"{context.size[0]}x{context.size[1]}; give a mask of the same size as the image"
            )
    if context.size != size:
        context = context.resize(size, Image.Resampling.LANCZOS)
        if mask is not None:
            mask = mask.resize(size, Image.Resampling.BOX)
    return context, mask


def mask_array(mask: Image.Image) -> np.ndarray:
    """``L`` mask -> bool ``[H, W]``, True where the object goes (>= 128, i.e. >= 0.5)."""
    return np.asarray(mask.convert("L"), dtype=np.uint8) >= 128


def feather_alpha(mask: np.ndarray, feather_px: float = 0.0) -> np.ndarray:
    """Blend weight ``[H, W]`` in [0, 1] for compositing, from a bool ``[H, W]`` mask.

    Without feathering it is the mask itself. With ``feather_px > 0`` it ramps from ``1 / feather_px`` on the
    mask's edge to 1 at ``feather_px`` pixels inside it. The ramp lies inside the mask, so the weight is exactly
    0 everywhere outside it and the context's pixels there come through unchanged.
    """
    m = np.asarray(mask, dtype=bool)
    if feather_px <= 0:
        return m.astype(np.float64)
    # distance of each inside pixel to the nearest outside pixel (1 on the edge); 0 outside
    inside_dist = ndimage.distance_transform_edt(m)
    return np.clip(inside_dist / float(feather_px), 0.0, 1.0)


def composite_inside_mask(
    generated: Image.Image, context: Image.Image, mask: Image.Image, feather_px: float = 0.0
) -> Image.Image:
    """``generated`` inside the mask, ``context`` outside (bit-identical there); RGB images and ``L`` mask of one size.

    ``feather_px`` softens the seam with a ramp inside the mask (see :func:`feather_alpha`).
    """
    if not (generated.size == context.size == mask.size):
        raise ValueError(
            f"composite: generated {generated.size}, context {context.size} and mask {mask.size} must have one size"
        )
    g = np.asarray(generated.convert("RGB"), dtype=np.float64)
    c = np.asarray(context.convert("RGB"), dtype=np.float64)
    a = feather_alpha(mask_array(mask), feather_px)[..., None]
    out = np.rint(a * g + (1.0 - a) * c)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8), mode="RGB")


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def components_on(pipe: object, device: torch.device | str) -> Iterator[None]:
    """Move the VAE and both text encoders to ``device`` for the block and back to where each was afterwards.

    The trainer parks them on the CPU once latents are cached; the pipeline runs everything on one device.
    """
    device = torch.device(device)
    names = ("vae", "text_encoder", "text_encoder_2")
    before = {}
    for n in names:
        m = getattr(pipe, n, None)
        if isinstance(m, torch.nn.Module):
            before[n] = _module_device(m)
            if before[n] != device:
                m.to(device)
    try:
        yield
    finally:
        for n, d in before.items():
            m = getattr(pipe, n)
            if _module_device(m) != d:
                m.to(d)


@contextlib.contextmanager
def quiet_progress(pipe: object) -> Iterator[None]:
    """Hide the pipeline's per-step progress bar inside the block, restoring the caller's setting after."""
    old = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**old, "disable": True})  # type: ignore[attr-defined]
    try:
        yield
    finally:
        pipe._progress_bar_config = old  # type: ignore[attr-defined]


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """``[N, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] -> RGB images (rounded to 8 bits)."""
    x = pixels if pixels.ndim == 4 else pixels[None]
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB") for a in arr]


def mask_to_pil(mask: torch.Tensor) -> Image.Image:
    """``[1, H, W]`` / ``[H, W]`` mask in [0, 1] -> ``L`` image (>= 0.5 maps to >= 128, as the hint reads it)."""
    m = mask.detach().float().cpu().reshape(mask.shape[-2:]).clamp(0, 1)
    return Image.fromarray((m * 255.0).round().to(torch.uint8).numpy(), mode="L")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> ``[1, 3, H, W]`` float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] / 127.5 - 1.0


@torch.no_grad()
def image_latents(pipe: object, image: Image.Image) -> torch.Tensor:
    """Normalised VAE latents ``[1, 16, H/8, W/8]`` (float32, CPU) of an RGB image, as training encodes contexts."""
    return encode_images(pipe.vae, pil_to_tensor(image)).float().cpu()  # type: ignore[attr-defined]


@torch.no_grad()
def generate(
    pipe: object,
    context: Image.Image,
    prompt: str,
    mask: Image.Image | None = None,
    *,
    mask_hint: str = "fill",
    outline_width: int | None = None,
    composite: bool = False,
    feather_px: float = 0.0,
    num_images: int = 1,
    seed: int = 0,
    num_inference_steps: int = 28,
    guidance_scale: float = 2.5,
    width: int | None = None,
    height: int | None = None,
    max_area: int | None = None,
    max_sequence_length: int = 512,
) -> Generation:
    """Generate ``num_images`` results for one context image with a ``FluxKontextPipeline``.

    Args:
        pipe: a loaded ``FluxKontextPipeline`` (LoRAs already loaded/activated as wanted); all components on one
            device (see :func:`components_on`).
        context: the un-hinted context, any size and mode (decoded as training decodes images: EXIF orientation,
            16-bit greyscale scaled to 8 bits).
        prompt: the instruction.
        mask: the insertion mask of the context's size (white where the object goes; greyscale 8 or 16 bit, or grey
            RGB), or None.
        mask_hint: ``none`` / ``fill`` / ``outline``: drawn into the context from the mask with :mod:`data.hint`,
            exactly as in training. ``fill`` and ``outline`` need a mask.
        outline_width: band width of ``outline`` in pixels (None: the training default for this size).
        composite: paste the result into the original context inside the mask only (needs a mask); the
            composited images have the context's original size, and outside the mask they are its pixels exactly.
        feather_px: ramp width of the composite's edge, inside the mask (0: hard edge).
        num_images: results to generate; image ``k`` uses a generator seeded with ``seed + k``.
        num_inference_steps, guidance_scale: sampler steps and the guidance embedding's value.
        width, height: output size; default the context's size (one of them alone keeps the aspect ratio).
            The context (and mask) is resized to it.
        max_area: when set, the size is scaled down (aspect kept) to at most this many pixels.
        max_sequence_length: T5 token length of the prompt.

    Every size is floored to a multiple of 16. The pipeline is called with ``max_area = W * H`` and
    ``_auto_resize=False``, so the raw output is exactly (W, H).

    Returns:
        :class:`Generation` (images at (W, H); ``latents`` ``[N, 16, H/8, W/8]``).
    """
    if mask_hint not in MASK_HINT_MODES:
        raise ValueError(f"mask hint must be one of {MASK_HINT_MODES}; got {mask_hint!r}")
    if mask is None and mask_hint != "none":
        raise ValueError(
            f"the {mask_hint!r} mask hint is drawn from the insertion mask; give a mask or use mask hint 'none'"
        )
    if mask is None and composite:
        raise ValueError("compositing inside the mask needs a mask; give a mask or turn compositing off")
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}")
    # As training decodes them: EXIF orientation applied, 16-bit scaled (Pillow's own convert clips it to white),
    # masks grey and opaque. Already-decoded RGB and L images pass through unchanged.
    context = decode_rgb(context)
    mask = decode_mask(mask) if mask is not None else None
    w0, h0 = context.size
    if width is not None and height is None:
        height = max(1, round(h0 * width / w0))  # one side given: keep the context's aspect ratio
    elif height is not None and width is None:
        width = max(1, round(w0 * height / h0))
    size = fit_size(width or w0, height or h0, max_area)
    ctx, m = resize_pair(context, mask, size)
    hinted = apply_mask_hint_pil(ctx, m, mask_hint, outline_width) if m is not None else ctx.copy()
    w, h = size
    seeds = [int(seed) + k for k in range(num_images)]
    # One CPU generator per image: image k is the same for seed s whatever the batch or the device.
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    out = pipe(  # type: ignore[operator]
        image=hinted,
        prompt=prompt,
        height=h,
        width=w,
        max_area=w * h,
        _auto_resize=False,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images,
        generator=generators,
        max_sequence_length=max_sequence_length,
        output_type="latent",
    )
    tokens = out.images  # packed [N, (h/16)*(w/16), 64] in the normalised latent space
    latents = unpack_latents(tokens, h // VAE_SCALE_FACTOR, w // VAE_SCALE_FACTOR)
    raw = to_pil(decode_latents(pipe.vae, latents))  # type: ignore[attr-defined]
    images = raw
    if composite and mask is not None:
        # Blend at the context's own size, so that every pixel outside the mask is the user's original pixel
        # even when generation ran at a smaller (or 16-aligned) size.
        orig_ctx, orig_mask = context.convert("RGB"), mask.convert("L")
        images = [
            composite_inside_mask(
                r if r.size == orig_ctx.size else r.resize(orig_ctx.size, Image.Resampling.LANCZOS),
                orig_ctx,
                orig_mask,
                feather_px,
            )
            for r in raw
        ]
    return Generation(
        images=images,
        raw_images=raw,
        latents=latents.float().cpu(),
        context=ctx,
        hinted_context=hinted,
        mask=m,
        seeds=seeds,
    )
