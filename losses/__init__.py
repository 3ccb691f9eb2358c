"""Mask-geometry losses for object insertion with FLUX.1 Kontext LoRAs, plus the flow-matching math.

The loss functions (``downsample_mask_area`` ... ``boundary_loss``) work on any latents;
``compute_mask_targets`` + ``geometry_loss`` is the training-loop form with per-sample precomputed targets,
in the ``calibrated`` formulation (default) or the reference composition of those functions (``reference``).
See ``docs/losses.md``.
"""

from __future__ import annotations

from .combined import LOSS_TERMS, GeometryLossWeights, geometry_loss, noise_level_weight
from .distance import distance_transform_edt, signed_distance_map_from_mask
from .flow_matching import (
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
from .geometry import (
    ChangeMaskStats,
    area_ratio_loss,
    background_preservation_mse_latent,
    boundary_loss,
    dice_loss,
    soft_change_mask_from_latents,
    weighted_masked_mse_latent,
)
from .masks import boundary_band, dilate, downsample_mask_area, erode, outside_region
from .targets import MaskTargets, compute_mask_targets

__all__ = [
    "LOSS_TERMS",
    "ChangeMaskStats",
    "FlowStep",
    "GeometryLossWeights",
    "MaskTargets",
    "add_noise",
    "area_ratio_loss",
    "background_preservation_mse_latent",
    "boundary_band",
    "boundary_loss",
    "calculate_shift",
    "compute_mask_targets",
    "dice_loss",
    "dilate",
    "distance_transform_edt",
    "downsample_mask_area",
    "erode",
    "flow_matching_loss",
    "flow_step",
    "geometry_loss",
    "loss_weighting",
    "masked_flow_weight",
    "noise_level_weight",
    "outside_region",
    "predicted_clean_latents",
    "sample_timestep_density",
    "shift_sigmas_for_resolution",
    "signed_distance_map_from_mask",
    "soft_change_mask_from_latents",
    "time_shift",
    "timesteps_and_sigmas_from_density",
    "velocity_target",
    "weighted_masked_mse_latent",
]
