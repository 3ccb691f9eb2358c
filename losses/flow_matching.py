"""Rectified-flow (FLUX) training math as pure functions.

Numbers match diffusers' ``training_utils.compute_density_for_timestep_sampling`` /
``compute_loss_weighting_for_sd3``, ``pipelines.flux.pipeline_flux.calculate_shift`` and
``FlowMatchEulerDiscreteScheduler`` for the same inputs (and the same generator state).

Training step, in these terms (:func:`flow_step` composes them; the trainer, the tiny model's pretraining and
the real-scale benchmark all train through it)::

    noise = randn(x0.shape, generator=g); u = sample_timestep_density("logit_normal", B, generator=g)
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, scheduler)
    x_t = add_noise(x0, noise, sigmas)
    v_pred = model(x_t, timesteps / scheduler.config.num_train_timesteps, ...)
    loss = flow_matching_loss(v_pred, velocity_target(x0, noise), loss_weighting("none", sigmas))
    z_pred = predicted_clean_latents(x_t, v_pred, sigmas)   # for the geometry losses
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "FlowStep",
    "add_noise",
    "calculate_shift",
    "euler_step",
    "expand_sigmas",
    "flow_matching_loss",
    "flow_step",
    "loss_weighting",
    "masked_flow_weight",
    "predicted_clean_latents",
    "sample_timestep_density",
    "sampling_sigmas",
    "shift_sigmas_for_resolution",
    "time_shift",
    "timesteps_and_sigmas_from_density",
    "velocity_target",
]

DensityScheme = Literal["none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap"]
_DENSITY_SCHEMES = ("none", "uniform", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def sample_timestep_density(
    weighting_scheme: DensityScheme | str,
    batch_size: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample ``u`` in ``[0, 1]`` per sample (SD3 density sampling).

    ``"logit_normal"``: ``sigmoid(N(logit_mean, logit_std))``; ``"mode"``: ``1 - u - mode_scale *
    (cos(pi u / 2)^2 - 1 + u)`` for uniform ``u``; anything else in ``"none"``, ``"uniform"``,
    ``"sigma_sqrt"``, ``"cosmap"``: uniform (those two are *loss* weightings, see :func:`loss_weighting`).
    Draws the same random numbers in the same order as diffusers.

    Returns:
        ``[batch_size]`` float32 on ``device``.
    """
    if weighting_scheme not in _DENSITY_SCHEMES:
        raise ValueError(f"weighting_scheme must be one of {_DENSITY_SCHEMES}; got {weighting_scheme!r}")
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(batch_size,), device=device, generator=generator)
        return torch.sigmoid(u)
    u = torch.rand(size=(batch_size,), device=device, generator=generator)
    if weighting_scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def loss_weighting(weighting_scheme: DensityScheme | str, sigmas: Tensor) -> Tensor:
    """SD3 loss weighting: ``"sigma_sqrt"`` -> ``sigma^-2``; ``"cosmap"`` -> ``2 / (pi (1 - 2s + 2s^2))``; else 1.

    Args:
        sigmas: any shape (usually ``[B, 1, 1, 1]``).

    Returns:
        Tensor shaped like ``sigmas``.
    """
    if weighting_scheme == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting_scheme == "cosmap":
        bot = 1 - 2 * sigmas + 2 * sigmas**2
        return 2 / (math.pi * bot)
    return torch.ones_like(sigmas)


def _schedule(scheduler: Any) -> tuple[Tensor, Tensor, int]:
    try:
        return scheduler.timesteps, scheduler.sigmas, int(scheduler.config.num_train_timesteps)
    except AttributeError as err:
        raise TypeError(
            "scheduler must be a diffusers FlowMatchEulerDiscreteScheduler (with .timesteps, .sigmas and "
            f".config.num_train_timesteps); got {type(scheduler).__name__}"
        ) from err


def timesteps_and_sigmas_from_density(u: Tensor, scheduler: Any) -> tuple[Tensor, Tensor]:
    """Map density samples to the training scheduler's discrete timesteps and sigmas.

    ``indices = (u * num_train_timesteps).long()``, ``timesteps = scheduler.timesteps[indices]`` and the
    sigma of each timestep, as diffusers' FLUX training scripts do. ``u = 1`` (reachable with the
    ``"mode"`` scheme) is clamped to the last index instead of indexing past the schedule.

    Args:
        u: ``[B]`` values in ``[0, 1]``.
        scheduler: the training ``FlowMatchEulerDiscreteScheduler`` (before ``set_timesteps``).

    Returns:
        ``(timesteps [B], sigmas [B])`` on ``u.device`` (float32).
    """
    timesteps, sigmas, n = _schedule(scheduler)
    indices = (u * n).long().clamp(0, len(timesteps) - 1).cpu()
    return timesteps[indices].to(u.device), sigmas[indices].to(device=u.device, dtype=torch.float32)


def expand_sigmas(sigmas: Tensor, ndim: int) -> Tensor:
    """View ``[B]`` sigmas as ``[B, 1, ..., 1]`` with ``ndim`` dims (for broadcasting over latents)."""
    s = sigmas.reshape(sigmas.shape[0], *([1] * (ndim - 1)))
    return s


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX resolution-dependent shift ``mu``: linear in the packed image token count.

    ``mu = base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len`` tokens
    (a 1024x1024 image has ``(1024/16)^2 = 4096`` tokens).
    """
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def time_shift(mu: float, t: Tensor, sigma: float = 1.0, kind: Literal["exponential", "linear"] = "exponential") -> Tensor:
    """Shift ``t`` in ``(0, 1]``: exponential ``e^mu / (e^mu + (1/t - 1)^sigma)`` or linear ``mu / (mu + (1/t - 1)^sigma)``.

    The exponential form is what ``FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)`` applies
    to its sigmas in ``set_timesteps(mu=...)``.
    """
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** sigma)
    raise ValueError(f"time shift kind must be 'exponential' or 'linear'; got {kind!r}")


def shift_sigmas_for_resolution(
    sigmas: Tensor,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> Tensor:
    """Apply FLUX's inference-time resolution shift to sigmas in ``(0, 1]``.

    ``time_shift(calculate_shift(image_seq_len, ...), sigmas)``: larger images spend more of the schedule
    at high noise. Use it to train at the noise levels the pipeline uses for that resolution.

    Args:
        sigmas: any shape, values in ``(0, 1]`` (0 maps to 0).
        image_seq_len: packed image tokens, ``(H/16) * (W/16)`` for an ``H x W`` image.

    Returns:
        Shifted sigmas, same shape.
    """
    mu = calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    safe = sigmas.clamp_min(torch.finfo(sigmas.dtype).tiny)
    return torch.where(sigmas > 0, time_shift(mu, safe), torch.zeros_like(sigmas))


def add_noise(x0: Tensor, noise: Tensor, sigmas: Tensor) -> Tensor:
    """Rectified-flow interpolation ``x_t = (1 - sigma) x0 + sigma noise``.

    Args:
        x0: ``[B, ...]`` clean latents.
        noise: same shape, standard normal.
        sigmas: ``[B]`` or broadcastable ``[B, 1, ..., 1]``.

    Returns:
        ``[B, ...]`` noisy latents.
    """
    s = expand_sigmas(sigmas, x0.ndim).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """Flow-matching regression target ``v = noise - x0`` (``d x_t / d sigma``), shape of ``x0``."""
    return noise - x0


def predicted_clean_latents(x_t: Tensor, v_pred: Tensor, sigmas: Tensor) -> Tensor:
    """Recover the clean latents a velocity prediction implies: ``x_t - sigma * v_pred``.

    Exact inverse of :func:`add_noise` when ``v_pred = noise - x0``.

    Args:
        x_t: ``[B, ...]`` noisy latents; ``v_pred`` same shape; ``sigmas`` ``[B]`` or ``[B, 1, ..., 1]``.
    """
    s = expand_sigmas(sigmas, x_t.ndim).to(v_pred.dtype)
    return x_t - s * v_pred


def flow_matching_loss(
    model_pred: Tensor,
    target: Tensor,
    weighting: Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Weighted MSE as diffusers' FLUX training: ``mean_b mean_{...}(weighting * (pred - target)^2)`` in float32.

    Args:
        model_pred, target: ``[B, ...]``.
        weighting: optional, broadcastable to ``target`` (e.g. :func:`loss_weighting` of ``[B, 1, 1, 1]`` sigmas).
        reduction: ``"mean"`` (scalar) or ``"none"`` (``[B]`` per-sample losses).
    """
    if model_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} must match")
    sq = (model_pred.float() - target.float()) ** 2
    if weighting is not None:
        sq = weighting.float() * sq
    per_sample = sq.reshape(target.shape[0], -1).mean(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean' or 'none'; got {reduction!r}")


def masked_flow_weight(mask_latent: Tensor, unmasked_weight: float = 0.1) -> Tensor:
    """Per-pixel weight of a mask-weighted flow loss, normalised to mean 1 per sample.

    ``w = unmasked_weight + (1 - unmasked_weight) * m`` divided by its spatial mean, so that
    :func:`flow_matching_loss` with ``weighting=w`` is the weighted mean ``sum(w err) / sum(w)`` and keeps the
    plain loss's scale.

    Args:
        mask_latent: ``[B, 1, h, w]`` soft mask at latent resolution.
        unmasked_weight: weight outside the mask, in ``[0, 1]``.

    Returns:
        ``[B, 1, h, w]`` float32 weights (broadcast over channels).
    """
    if not 0.0 <= unmasked_weight <= 1.0:
        raise ValueError(f"unmasked_weight must be in [0, 1]; got {unmasked_weight}")
    w = unmasked_weight + (1.0 - unmasked_weight) * mask_latent.float()
    return w / w.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)


def sampling_sigmas(num_steps: int, image_seq_len: int, scheduler_config: Any) -> Tensor:
    """The sigmas ``FluxKontextPipeline`` samples at, with the final 0: ``[num_steps + 1]`` float32, from 1 down.

    ``linspace(1, 1/num_steps, num_steps)`` shifted by :func:`time_shift` with ``mu`` from
    :func:`calculate_shift` of the packed token count and the scheduler's config, as the pipeline passes
    them to ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=..., mu=...)``.

    Args:
        num_steps: sampler steps.
        image_seq_len: packed target tokens, ``(h/2) * (w/2)`` for ``[B, 16, h, w]`` latents.
        scheduler_config: the base model's scheduler config (a mapping or an object with those attributes).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    get = scheduler_config.get if isinstance(scheduler_config, dict) else lambda k, d: getattr(scheduler_config, k, d)
    mu = calculate_shift(
        image_seq_len,
        get("base_image_seq_len", 256),
        get("max_image_seq_len", 4096),
        get("base_shift", 0.5),
        get("max_shift", 1.15),
    )
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    kind = get("time_shift_type", "exponential")
    shifted = time_shift(mu, base, 1.0, kind).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1)])


def euler_step(x: Tensor, v_pred: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One step of the flow sampler from ``sigma`` to ``sigma_next``: ``x + (sigma_next - sigma) * v_pred``.

    ``FlowMatchEulerDiscreteScheduler.step``'s update (deterministic sampling), in ``x``'s dtype.
    """
    return x + (sigma_next - sigma) * v_pred.to(x.dtype)


@dataclass(frozen=True)
class FlowStep:
    """One rectified-flow training draw: what the model sees and what its velocity is judged against.

    Attributes:
        x0: ``[B, C, h, w]`` clean latents, float32.
        noise: same shape, float32, standard normal.
        sigmas: ``[B]`` float32 noise levels on ``x0.device``.
        timesteps: ``[B]`` on ``x0.device``, on the scheduler's scale (``0 .. num_train_timesteps``).
        num_train_timesteps: the scheduler's ``config.num_train_timesteps``.
        x_t: ``[B, C, h, w]`` float32 noisy latents ``(1 - sigma) x0 + sigma noise``.
        weighting: ``[B, 1, 1, 1]`` SD3 loss weighting of the timestep scheme (:func:`loss_weighting`).
    """

    x0: Tensor
    noise: Tensor
    sigmas: Tensor
    timesteps: Tensor
    num_train_timesteps: int
    x_t: Tensor
    weighting: Tensor

    @property
    def model_timesteps(self) -> Tensor:
        """``[B]`` timesteps as the transformer takes them (the pipeline's timestep / num_train_timesteps)."""
        return self.timesteps / self.num_train_timesteps

    @property
    def target(self) -> Tensor:
        """The velocity target ``noise - x0``."""
        return velocity_target(self.x0, self.noise)

    def loss(self, v_pred: Tensor, pixel_weight: Tensor | None = None) -> Tensor:
        """Flow-matching loss of ``v_pred`` (float32 scalar): :func:`flow_matching_loss` with :attr:`weighting`,
        times ``pixel_weight`` (e.g. :func:`masked_flow_weight`, broadcastable to ``x0``) when given."""
        weighting = self.weighting if pixel_weight is None else self.weighting * pixel_weight
        return flow_matching_loss(v_pred.float(), self.target, weighting)

    def predicted_clean_latents(self, v_pred: Tensor) -> Tensor:
        """``x_t - sigma * v_pred``: the clean latents ``v_pred`` implies (:func:`predicted_clean_latents`)."""
        return predicted_clean_latents(self.x_t, v_pred, self.sigmas)


def flow_step(
    x0: Tensor,
    generator: torch.Generator | None,
    scheduler: Any,
    weighting_scheme: DensityScheme | str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    resolution_shift: bool = False,
) -> FlowStep:
    """Draw the noise and the timesteps of one rectified-flow training step and noise ``x0``.

    From ``generator`` (on the CPU), in this order: ``noise ~ N(0, I)`` shaped like ``x0``, then ``u`` of
    :func:`sample_timestep_density` (``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``); nothing
    else is drawn, so a caller may draw more from ``generator`` afterwards. ``u`` picks timesteps and sigmas from
    the scheduler's training table (:func:`timesteps_and_sigmas_from_density`); with ``resolution_shift`` the
    sigmas are shifted as the pipeline samples at ``x0``'s resolution (:func:`shift_sigmas_for_resolution` of
    ``(h/2) * (w/2)`` packed tokens) and the timesteps follow them. Everything is float32 on ``x0.device``.

    Args:
        x0: ``[B, C, h, w]`` clean latents (any float dtype; used in float32).
        generator: the step's random stream (a CPU generator).
        scheduler: the training ``FlowMatchEulerDiscreteScheduler`` (before ``set_timesteps``).

    Returns:
        A :class:`FlowStep`; the model predicts from ``x_t`` and ``model_timesteps``, and ``loss(v_pred)`` is the
        flow-matching loss.
    """
    device = x0.device
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    u = sample_timestep_density(weighting_scheme, x0.shape[0], logit_mean, logit_std, mode_scale, generator=generator)
    timesteps, sigmas = timesteps_and_sigmas_from_density(u, scheduler)
    num_train_timesteps = int(scheduler.config.num_train_timesteps)
    if resolution_shift:
        sigmas = shift_sigmas_for_resolution(sigmas, (x0.shape[-2] // 2) * (x0.shape[-1] // 2))
        timesteps = sigmas * num_train_timesteps
    sigmas = sigmas.to(device)
    x0 = x0.float()
    broadcast = expand_sigmas(sigmas, x0.ndim)
    return FlowStep(
        x0=x0,
        noise=noise,
        sigmas=sigmas,
        timesteps=timesteps.to(device),
        num_train_timesteps=num_train_timesteps,
        x_t=add_noise(x0, noise, broadcast),
        weighting=loss_weighting(weighting_scheme, broadcast),
    )
