"""Generate one sample and score it against its insertion mask: the step validation and ``evaluate`` share.

    from kontext.evaluation.score import generate_and_score
    scored = generate_and_score(pipe, context, prompt, mask, target, mask_hint="fill", seed=0,
                                num_inference_steps=28, guidance_scale=2.5, max_sequence_length=512)
    scored.pixel.iou, scored.latent.iou, scored.outline.save("overlay.png")

The result is generated with :func:`kontext.runtime.generation.generate` (the training mask hint, the sample's own
size, one seeded generator), then measured against the UN-hinted ``context`` (the hint is not part of the scene):
in pixel space (:func:`kontext.evaluation.metrics.sample_metrics`, with the change mask kept for pictures) and on
the latent grid (:func:`kontext.evaluation.metrics.latent_sample_metrics`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from kontext.evaluation.grid import change_mask_image, draw_mask_outline
from kontext.evaluation.metrics import (
    ChangeMask,
    LatentMetrics,
    SampleMetrics,
    latent_sample_metrics,
    pixel_change_mask,
    sample_metrics,
)
from kontext.runtime.generation import Generation, generate, image_latents, mask_array


@dataclass
class Scored:
    """What :func:`generate_and_score` returns for one sample.

    Attributes:
        generation: the :class:`~kontext.runtime.generation.Generation` (``hinted_context`` is what the model saw).
        mask: the insertion mask as bool ``[H, W]``.
        change: the pixel change mask of the result against the un-hinted context, with its threshold.
        pixel: the pixel metrics (``threshold`` and ``threshold_degenerate`` from ``change``).
        latent: the metrics on the latent grid.
        outline: the result with the insertion mask's contour drawn in red.
    """

    generation: Generation
    mask: np.ndarray
    change: ChangeMask
    pixel: SampleMetrics
    latent: LatentMetrics
    outline: Image.Image

    @property
    def result(self) -> Image.Image:
        """The generated image (composited into the context when asked)."""
        return self.generation.images[0]

    def row(self) -> dict[str, float]:
        """The pixel metrics and the latent ones (as ``latent_<name>``) in one dict."""
        return self.pixel.as_dict() | {f"latent_{k}": x for k, x in self.latent.as_dict().items()}

    def change_image(self) -> Image.Image:
        """The change mask as a picture, with the insertion mask's contour (see ``grid.change_mask_image``)."""
        return change_mask_image(self.change.mask, self.mask)


@torch.no_grad()
def generate_and_score(
    pipe: Any,
    context: Image.Image,
    prompt: str,
    mask: Image.Image,
    target: Image.Image | None = None,
    *,
    mask_hint: str,
    outline_width: int | None = None,
    composite: bool = False,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    max_sequence_length: int,
) -> Scored:
    """Generate one result for an (un-hinted ``context``, ``prompt``, ``mask``) sample and measure it.

    Args:
        pipe: a ``FluxKontextPipeline`` with the wanted LoRA active, all components on one device.
        context, mask: RGB context WITHOUT hint and its ``L`` insertion mask, at the generation size.
        target: the ground truth (RGB, same size) for ``psnr_inside``; None leaves it NaN.
        mask_hint, outline_width, composite, seed, num_inference_steps, guidance_scale, max_sequence_length:
            as :func:`kontext.runtime.generation.generate` takes them.

    Returns:
        :class:`Scored`.
    """
    gen = generate(
        pipe,
        context,
        prompt,
        mask,
        mask_hint=mask_hint,
        outline_width=outline_width,
        composite=composite,
        seed=seed,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        max_sequence_length=max_sequence_length,
    )
    result = gen.images[0]
    m = mask_array(mask)
    change = pixel_change_mask(result, context, m)
    # The change mask is kept for pictures; its threshold goes back into the metrics.
    pixel = sample_metrics(result, context, m, target, changed=change.mask)
    pixel = dataclasses.replace(pixel, threshold=change.threshold, threshold_degenerate=float(change.degenerate))
    latent = latent_sample_metrics(gen.latents[0], image_latents(pipe, context), m)
    return Scored(gen, m, change, pixel, latent, draw_mask_outline(result, m))
