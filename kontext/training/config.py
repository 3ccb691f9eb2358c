"""The one config schema of the trainer: every default lives here, YAML only overrides it.

Load a config the way the trainer does::

    from kontext.training.config import load_config
    cfg = load_config("configs/example_tiny.yaml", overrides=["train.max_steps=10"])

Unknown or misspelled keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the key (with a suggestion for misspellings). ``python -m kontext.training.config`` prints the
reference table that ``docs/config.md`` holds; a test keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from data.errors import write_text_atomic
from kontext.errors import UserError
from losses import GeometryLossWeights


class ConfigError(UserError, ValueError):
    """A config file or override is invalid; the message names the key and the fix.

    ``keys`` holds the dotted key(s) at fault, so :func:`load_config` can say where each came from
    (the YAML file and line, or the command-line override).
    """

    def __init__(self, message: str, key: str | tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.keys: tuple[str, ...] = (key,) if isinstance(key, str) else tuple(key or ())


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (the single source of the reference table).

    ``kwargs`` are checks on the value: ``min``/``max`` (inclusive) and ``exclusive_min``/``exclusive_max``
    bound a number (every number must also be finite), ``nonempty=True`` refuses an empty string.
    """
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


# numpy (accelerate's set_seed) takes seeds in [0, 2**32 - 1].
MAX_SEED = 2**32 - 1
# SD3's mode sampling u -> 1 - u - s*(cos(pi*u/2)**2 - 1 + u) is a monotone map of [0, 1] for -1 <= s <= 2/(pi-2).
MODE_SCALE_MAX = 2 / (math.pi - 2)

DEFAULT_LORA_TARGETS = [
    # Double-stream blocks: image and text attention, their outputs, both feed-forwards.
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    # Single-stream blocks: the MLP input projection and the fused output projection.
    "proj_mlp", "proj_out",
]


@dataclass
class ModelConfig:
    """The base model and how it is held in memory."""

    pretrained_model_name_or_path: str = _f(
        "black-forest-labs/FLUX.1-Kontext-dev",
        "A hub id, a local diffusers folder, or `tiny` for the embedded tiny model (committed with the package).",
        nonempty=True,
    )
    revision: Optional[str] = _f(None, "Hub revision of the base model.")
    variant: Optional[str] = _f(None, "Weight variant to load (e.g. `fp16`), when the repository has one.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "bfloat16", "dtype of the frozen base weights (LoRA parameters always stay float32)."
    )
    guidance_scale: float = _f(1.0, "Value fed to the transformer's guidance embedding during training.", min=0.0)
    max_sequence_length: int = _f(512, "T5 token length of the prompt embeddings (FLUX.1 uses 512).", min=1, max=512)
    gradient_checkpointing: bool = _f(False, "Recompute transformer activations in backward to save memory.")
    offload_encoders: bool = _f(
        False, "Keep the VAE and text encoders on the CPU and run them there, leaving the accelerator to the transformer."
    )
    quantization: Literal["none", "nf4", "int8"] = _f(
        "none", "Quantize the frozen transformer with bitsandbytes (CUDA and the `quantization` extra needed)."
    )


@dataclass
class SyntheticConfig:
    """The synthetic triplet set written into `data.root` (the embedded default)."""

    enabled: bool = _f(False, "Generate the synthetic product dataset into `data.root` before training.")
    num_samples: int = _f(48, "Number of synthetic samples to write.", min=1)
    size: int = _f(128, "Side of the square synthetic images in pixels.", min=32)
    seed: int = _f(0, "Seed of the generator (same seed, same bytes).", min=0, max=MAX_SEED)


@dataclass
class DataConfig:
    """Where samples come from and how they are turned into tensors."""

    source: Literal["folder", "hf"] = _f("folder", "`folder`: the on-disk layout; `hf`: a Hugging Face dataset.")
    root: str = _f(
        "datasets/my_object",
        "Dataset folder (or, for `source: hf`, a hub dataset name or local path). Local paths are recorded absolute.",
        nonempty=True,
    )
    split: str = _f("train", "Split to use for `source: hf`.")
    context_column: str = _f("context", "Context image column (`source: hf`).")
    target_column: str = _f("target", "Target image column (`source: hf`).")
    mask_column: str = _f("mask", "Insertion mask column (`source: hf`).")
    prompt_column: str = _f("prompt", "Prompt column (`source: hf`).")
    default_prompt: Optional[str] = _f(None, "Prompt for samples that have none of their own.")
    mask_hint: Literal["none", "fill", "outline"] = _f(
        "fill",
        "How the insertion region is shown in the context: `none` (already visible), `fill` (flat grey), `outline`.",
    )
    outline_width: Optional[int] = _f(
        None, "Width in pixels of the `outline` hint (null: max(8, short side // 64)).", min=1
    )
    resolution: int = _f(
        1024, "Training resolution, a multiple of 16 (side of the square bucket, or area of aspect buckets).", min=16
    )
    aspect_buckets: bool = _f(False, "Use aspect-ratio buckets derived from the Kontext preferred resolutions.")
    random_crop: bool = _f(
        False, "Random instead of centre crop after resizing to the bucket (needs `cache_latents: false`)."
    )
    random_flip: bool = _f(False, "Horizontal flip augmentation (context, target and mask together).")
    cache_latents: bool = _f(True, "Encode latents and prompts once, store them on disk, free the encoders.")
    cache_dir: Optional[str] = _f(
        None, "Latent cache folder (default: `$KONTEXT_LORA_CACHE/latents`); recorded as an absolute path."
    )
    cache_batch_size: int = _f(
        2, "Most images per VAE call (while caching: never fewer than one sample's 2-3; without `cache_latents`: per step) and prompts per text-encoder call: bounds the encoders' memory peak.",
        min=1,
    )
    decoded_memory_mb: int = _f(
        2048, "Without `cache_latents`: MiB of decoded, resized images kept in memory instead of decoding files every step.",
        min=0,
    )
    prefetch: Literal["auto", True, False] = _f(
        "auto",
        "Prepare the next batch (read, hint, and without `cache_latents` VAE-encode) in a background thread while "
        "the model computes. `auto`: on when training on an accelerator; off on a CPU, where the step's own "
        "threads already hold every core the launcher gave and a second thread only takes one from them.",
    )
    max_pixels: int = _f(64_000_000, "Reject images with more pixels than this (decompression-bomb guard).", min=1)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LoraConfigSection:
    """The LoRA attached to the transformer."""

    rank: int = _f(16, "LoRA rank.", min=1)
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank).", exclusive_min=0)
    dropout: float = _f(
        0.0, "LoRA dropout (probability of zeroing an input of the LoRA branch).", min=0.0, exclusive_max=1.0
    )
    init: Literal["gaussian", "default", "pissa", "olora"] = _f(
        "gaussian", "Initialisation of the LoRA matrices (PEFT `init_lora_weights`)."
    )
    target_modules: list[str] = _f(DEFAULT_LORA_TARGETS, "Module-name suffixes that receive a LoRA.")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = _f(1000, "Number of optimiser updates.", min=1)
    seed: int = _f(0, "Seed of everything random (noise, timesteps, data order, LoRA init).", min=0, max=MAX_SEED)
    batch_size: int = _f(1, "Samples per process per micro-batch.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser update.", min=1)
    learning_rate: float = _f(1e-4, "Peak learning rate.", exclusive_min=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = _f("constant_with_warmup", "Learning-rate schedule (diffusers `get_scheduler`).")
    lr_warmup_steps: int = _f(0, "Warm-up optimiser updates.", min=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = _f("adamw", "Optimiser (8-bit AdamW needs CUDA + bitsandbytes).")
    adam_beta1: float = _f(0.9, "Adam beta1.", min=0.0, exclusive_max=1.0)
    adam_beta2: float = _f(0.999, "Adam beta2.", min=0.0, exclusive_max=1.0)
    adam_epsilon: float = _f(1e-8, "Adam epsilon.", exclusive_min=0)
    weight_decay: float = _f(1e-4, "Decoupled weight decay.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).", min=0.0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = _f(
        "auto",
        "accelerate mixed precision. `auto`: what the launcher says (`accelerate launch --mixed_precision`, "
        "its config file, else `no`); a value here overrides the launcher. config.yaml records the resolved value.",
    )
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = _f(
        "none", "Timestep density / loss weighting, as diffusers' FLUX training scripts."
    )
    resolution_shift: bool = _f(
        False, "Shift training sigmas by FLUX's resolution-dependent schedule shift (as the pipeline samples)."
    )
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep density.")
    logit_std: float = _f(1.0, "Std of the logit-normal timestep density.", exclusive_min=0)
    mode_scale: float = _f(
        1.29,
        "Scale s of the `mode` timestep density (SD3: -1 <= s <= 2/(pi-2) keeps the mapping monotone).",
        min=-1.0,
        max=MODE_SCALE_MAX,
    )
    max_nonfinite_steps: int = _f(
        5, "Stop after this many consecutive updates skipped for a NaN/inf loss or gradient.", min=1
    )


@dataclass
class GeometryConfig:
    """The mask-geometry losses on the predicted clean latents (see docs/losses.md)."""

    enabled: bool = _f(
        False,
        "All geometry terms on or off at once. Off by default: on the scale-fidelity benchmark they do not beat "
        "`loss.masked` (docs/losses.md).",
    )
    formulation: Literal["calibrated", "reference"] = _f(
        "calibrated",
        "`calibrated`: change masks of prediction and target under the target's statistics, minimal at the target; "
        "`reference`: the specification's composition of its loss functions (see docs/losses.md).",
    )
    weight: float = _f(1.0, "Global multiplier of the geometry total.", min=0.0)
    noise_weighting: Literal["none", "one_minus_sigma", "one_minus_sigma_sq", "cosine", "inverse_sigma"] = _f(
        "one_minus_sigma",
        "Per-sample weight by noise level. Through z_pred a term pushes the velocity with sigma^2 times this "
        "weight: `one_minus_sigma` pushes most at sigma 0.4-0.8; `inverse_sigma` (1/max(sigma, 0.1)) pushes "
        "in proportion to sigma, most where the sampler sets the object's extent (see docs/losses.md).",
    )
    mse: float = _f(1.0, "Weight of the boundary-band weighted MSE against the target latents.", min=0.0)
    bg: float = _f(0.6, "Weight of background preservation against the context latents.", min=0.0)
    dice: float = _f(0.9, "Weight of Dice between the soft change mask and the mask.", min=0.0)
    area: float = _f(0.2, "Weight of the squared log area ratio.", min=0.0)
    boundary: float = _f(0.4, "Weight of the boundary loss on the signed distance map.", min=0.0)
    band_r: int = _f(1, "Boundary band radius in latent pixels.", min=0)
    w_in: float = _f(1.0, "MSE weight inside the mask.", min=0.0)
    w_band: float = _f(6.0, "MSE weight in the boundary band.", min=0.0)
    w_out: float = _f(0.2, "MSE weight outside the band.", min=0.0)
    k_sigma: float = _f(2.0, "`reference`: change-mask threshold in background standard deviations.", min=0.0)
    temperature: float = _f(
        0.25, "`calibrated`: change-mask sigmoid width as a fraction of the target's change contrast.", exclusive_min=0
    )
    sdm_normalize: bool = _f(True, "Scale each signed distance map by its max |value|.")

    def loss_weights(self) -> GeometryLossWeights:
        """The per-term weights (``mse``, ``bg``, ``dice``, ``area``, ``boundary``) as ``losses.geometry_loss`` takes them."""
        return GeometryLossWeights(mse=self.mse, bg=self.bg, dice=self.dice, area=self.area, boundary=self.boundary)


@dataclass
class MaskedFlowConfig:
    """Mask-weighted flow-matching loss, as kohya, OneTrainer and SimpleTuner offer (no geometry)."""

    enabled: bool = _f(
        True,
        "Weight the flow-matching MSE per latent pixel by the insertion mask (the default: the best measured "
        "loss on the scale-fidelity benchmark, docs/losses.md).",
    )
    unmasked_weight: float = _f(
        0.1, "Weight of latent pixels outside the mask (1 inside; the map is normalised per sample).", min=0.0, max=1.0
    )


@dataclass
class OnPolicyConfig:
    """Geometry judged on the model's own samples (reward fine-tuning in the manner of ReFL/DRaFT).

    On a chosen micro-batch the sampler runs from noise with the current LoRA, without gradient, down to a
    noise level drawn in ``[sigma_min, sigma_max]`` (where the sampler sets the object's extent); one
    prediction with gradient there gives the clean latents the model itself is heading for, and the geometry
    terms judge those instead of the teacher-forced prediction. The flow loss is unchanged.
    """

    enabled: bool = _f(False, "Judge the geometry terms on the model's own samples (needs `loss.geometry.enabled`).")
    fraction: float = _f(
        0.5, "Share of micro-batches judged on-policy (drawn per step from its seeded stream).", exclusive_min=0.0, max=1.0
    )
    sampler_steps: int = _f(12, "Steps of the sampler's schedule the rollout follows (as at inference).", min=2)
    sigma_min: float = _f(0.55, "Lowest noise level the rollout stops at.", exclusive_min=0.0, max=1.0)
    sigma_max: float = _f(0.9, "Highest noise level the rollout stops at.", exclusive_min=0.0, max=1.0)
    weight: float = _f(1.0, "Multiplier of the on-policy geometry total (no noise-level weight).", min=0.0)


@dataclass
class LossConfig:
    """Loss terms."""

    geometry: GeometryConfig = field(default_factory=GeometryConfig)
    masked: MaskedFlowConfig = field(default_factory=MaskedFlowConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)


@dataclass
class CheckpointConfig:
    """Resumable training state."""

    every_steps: int = _f(500, "Save a checkpoint every this many optimiser updates (0: only at pre-emption).", min=0)
    total_limit: Optional[int] = _f(3, "Keep at most this many checkpoints (null: keep all).", min=1)
    resume_from: Optional[str] = _f(None, "`latest`, or a checkpoint folder path, to resume from.")
    overwrite_output_dir: bool = _f(False, "Allow starting a fresh run in an output_dir that holds a finished run.")
    allow_other_base: bool = _f(
        False, "Allow resuming a checkpoint trained on another base model (refused by default: its LoRA would not fit it)."
    )


@dataclass
class ValidationConfig:
    """Generation on fixed samples during training."""

    every_steps: int = _f(0, "Validate every this many updates (0: only at the end; -1: never).", min=-1)
    num_samples: int = _f(2, "Number of fixed dataset samples to generate for.", min=1)
    num_inference_steps: int = _f(28, "Sampler steps per validation image.", min=1)
    guidance_scale: float = _f(2.5, "Guidance at validation (FLUX.1 Kontext default 2.5).", min=0.0)
    seed: int = _f(0, "Seed of the validation generator (sample i uses seed + i).", min=0, max=MAX_SEED)
    data_root: Optional[str] = _f(
        None,
        "Held-out dataset to validate on (read as `data.root` is: same `data.source`, split and columns). "
        "null: `validation.holdout` samples, else the first training samples.",
    )
    holdout: int = _f(
        0, "Withhold the last N samples (in name order) of `data.root` from training and validate on them.", min=0
    )
    grid_max_side: int = _f(
        2048, "Longest side in pixels of a validation grid; larger grids are downscaled cell by cell.", min=64
    )


@dataclass
class LoggingConfig:
    """Trackers and console output."""

    report_to: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "accelerate tracker.")
    project_name: str = _f("kontext-lora", "Tracker project / run group name.")
    log_every: int = _f(1, "Log scalars every this many updates.", min=1)


@dataclass
class ExportConfig:
    """Artifacts written at the end of training."""

    comfyui: bool = _f(False, "Also write `lora_comfyui.safetensors` for ComfyUI/Forge (original FLUX names, one LoRA per projection).")
    save_dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the exported LoRA tensors.")


@dataclass
class Config:
    """A training run."""

    output_dir: str = _f(
        "outputs/run", "Where checkpoints, logs and the exported LoRA go (recorded as an absolute path).", nonempty=True
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfigSection = field(default_factory=LoraConfigSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, globalns=vars(sys.modules[__name__]))


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " | ".join(_type_name(a) for a in args) + " | null"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


# Choice values that were renamed: {key: {old value: new value}}, so that an old config gets the new name.
RENAMED_VALUES: dict[str, dict[str, str]] = {"loss.geometry.formulation": {"seed": "reference"}}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML 1.1 reads an unquoted no/yes (and off/on) as false/true; where the choices spell
        # those words, that is what the user wrote (`mixed_precision: no`).
        if isinstance(value, bool) and ("yes" if value else "no") in choices:
            return "yes" if value else "no"
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            sugg = f" Did you mean {hint[0]!r}?" if hint else ""
            if isinstance(value, str) and value in RENAMED_VALUES.get(key, {}):
                sugg = f" {value!r} is now called {RENAMED_VALUES[key][value]!r}: write `{key}: {RENAMED_VALUES[key][value]}`."
            raise ConfigError(
                f"`{key}` must be one of {', '.join(map(repr, choices))}; got {value!r}.{sugg}", key
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(
                f"`{key}` must be a list of {_type_name(item_tp)}; got {type(value).__name__} {value!r}.", key
            )
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false; got {value!r}.", key)
        return value
    if tp is int:
        # 1e4 and 100.0 are integers written as floats; 2.5, .nan and true are not.
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer; got {type(value).__name__} {value!r}.", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number; got {type(value).__name__} {value!r}.", key)
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"`{key}` must be a finite number; got {value!r}.", key)
        return number
    if tp is str:
        if not isinstance(value, str):
            quote = " (put it in quotes to make it a string)" if isinstance(value, (int, float)) else ""
            raise ConfigError(f"`{key}` must be a string; got {type(value).__name__} {value!r}{quote}.", key)
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(meta: Any) -> str:
    """The allowed range of a number field, e.g. ``>= 0 and < 1`` ('' when unbounded)."""
    parts = []
    for name, op in (("min", ">="), ("exclusive_min", ">"), ("max", "<="), ("exclusive_max", "<")):
        if name in meta:
            parts.append(f"{op} {_num(meta[name])}")
    return " and ".join(parts)


def _check_range(key: str, value: Any, meta: Any) -> None:
    if value is None or isinstance(value, (bool, list)):
        return
    if isinstance(value, str):
        if meta.get("nonempty") and not value.strip():
            raise ConfigError(f"`{key}` must not be empty; name a path or id.", key)
        return
    ok = (
        ("min" not in meta or value >= meta["min"])
        and ("exclusive_min" not in meta or value > meta["exclusive_min"])
        and ("max" not in meta or value <= meta["max"])
        and ("exclusive_max" not in meta or value < meta["exclusive_max"])
    )
    if not ok:
        raise ConfigError(f"`{key}` must be {_range_text(meta)}; got {value!r}.", key)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        where = prefix.rstrip(".")
        raise ConfigError(f"`{where or 'config'}` must be a mapping of keys; got {data!r}.", where)
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            sugg = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{prefix}{key}`.{sugg} Valid keys here: {', '.join(sorted(fields))}.",
                f"{prefix}{key}",
            )
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        key = prefix + name
        if _is_section(tp):
            kwargs[name] = _build(tp, data.get(name) or {}, key + ".")
        elif name in data:
            kwargs[name] = _coerce(key, data[name], tp)
            _check_range(key, kwargs[name], f.metadata)
    return cls(**kwargs)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: ``1e-4``, ``5E-5``, ``3e5`` (YAML 1.1 wants ``1.0e-4``).

    Without this, ``learning_rate: 1e-4``, as every diffusers user writes it, reads as the string '1e-4'.
    """


_ConfigLoader.add_implicit_resolver(  # copies the resolver table: yaml.SafeLoader itself is unchanged
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _key_lines(
    node: Any, prefix: str, lines: dict[str, int], where: str, in_file: bool, path: tuple[int, ...] = ()
) -> None:
    """Record the line of every mapping key (``lines["train.max_steps"] = 12``); refuse duplicate keys."""
    if not isinstance(node, yaml.MappingNode) or id(node) in path:  # an alias back to itself: already walked
        return
    first: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        name, line = key_node.value, key_node.start_mark.line + 1
        if name in first:
            at = f", lines {first[name]} and {line}" if in_file else ""
            raise ConfigError(
                f"Duplicate key `{prefix}{name}` in {where}{at}: YAML would silently keep only the last one. "
                "Keep one of them.",
                prefix + name,
            )
        first[name] = line
        lines[prefix + name] = line
        _key_lines(value_node, f"{prefix}{name}.", lines, where, in_file, path + (id(node),))


def _read_config_text(path: Path) -> str:
    """The config file's text: UTF-8 (a byte-order mark is dropped); any other encoding is refused, naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"Config file {path} cannot be read ({e.strerror or e}).") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:64]):
        found, source = "UTF-16", "UTF-16"
    else:
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            found = f"not UTF-8 (byte 0x{raw[e.start]:02x} on line {line}: Latin-1 or Windows-1252, perhaps)"
            source = "LATIN1"
    raise ConfigError(
        f"Config file {path} is {found}; configs are read as UTF-8. Save it as UTF-8 (in the editor, or "
        f"`iconv -f {source} -t UTF-8 {path} > fixed.yaml`)."
    )


# A config is a few dozen keys: its YAML needs no more aliases than this, and a document whose aliases would expand
# past the node limit (a "billion laughs" of a few hundred bytes) is refused before anything is built from it.
MAX_ALIASES = 100
MAX_EXPANDED_NODES = 100_000


def _children(n: Any) -> list[Any]:
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    if isinstance(n, yaml.MappingNode):
        return [x for kv in n.value for x in kv]
    return []


def _check_expansion(node: Any, where: str) -> None:
    """Refuse YAML whose aliases expand beyond :data:`MAX_ALIASES` uses or :data:`MAX_EXPANDED_NODES` values
    (counted on the node graph, each shared node's expanded size computed once, so the check itself stays fast)."""
    sizes: dict[int, int] = {}
    aliases = 0

    def size(n: Any) -> int:  # values in the document once every alias is expanded
        nonlocal aliases
        if id(n) in sizes:
            aliases += 1  # a node reached again is an alias use
            return sizes[id(n)]
        sizes[id(n)] = 1  # a node that refers to itself counts once
        sizes[id(n)] = 1 + sum(size(c) for c in _children(n))
        return sizes[id(n)]

    total = size(node)
    if aliases > MAX_ALIASES or total > MAX_EXPANDED_NODES:
        raise ConfigError(
            f"{where} uses YAML aliases ({aliases} uses, {total} values once expanded) far beyond what a config needs "
            f"(at most {MAX_ALIASES} aliases, {MAX_EXPANDED_NODES} values); write the values out instead of "
            "repeating anchors."
        )


def _load_yaml(text: str, where: str, in_file: bool = True, prefix: str = "") -> tuple[Any, dict[str, int]]:
    """Safe-load one YAML document; also return the line of each dotted key. Duplicate keys are errors; so is a
    document whose aliases expand beyond a config's size (:func:`_check_expansion`), before anything is built."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        if node is None:
            return None, lines
        _check_expansion(node, where)
        _key_lines(node, prefix, lines, where, in_file)
        return loader.construct_document(node), lines
    finally:
        loader.dispose()


def _apply_override(tree: dict[str, Any], origins: dict[str, str], dotted: str, value: Any, origin: str) -> None:
    """Set ``tree[a][b][c] = value`` for ``a.b.c``, and record that the command line set it."""

    def forget(key: str) -> None:  # the YAML value at ``key`` (and under it) is replaced
        for k in [k for k in origins if k == key or k.startswith(key + ".")]:
            del origins[k]

    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
            here = ".".join(parts[: i + 1])
            forget(here)
            origins[here] = origin
        node = child
    node[parts[-1]] = value
    forget(dotted)
    origins[dotted] = origin


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML (``true``, ``3``, ``1e-4``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form section.key=value (e.g. train.max_steps=100).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override {text!r} has no key before '='.")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(
            f"Override {text!r} (on the command line): the key {key!r} has an empty part; write section.key=value "
            "(e.g. train.max_steps=100)."
        )
    try:
        value = _load_yaml(raw, f"the command-line override {text!r}", False, key + ".")[0] if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"Override {text!r}: the value is not valid YAML ({e}).") from e
    return key, value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested mapping."""
    cfg = _build(Config, data or {}, "")
    _check_cross_field(cfg)
    return cfg


def _origin_of(key: str, data: dict[str, Any], origins: dict[str, str]) -> str | None:
    """Where ``key`` was set: its own entry, else that of the nearest section set as a whole (None: a default)."""
    k = re.sub(r"\[\d+\]", "", key)  # `lora.target_modules[2]` was set where `lora.target_modules` was
    node: Any = data
    for part in k.split("."):
        if not isinstance(node, dict) or part not in node:
            return None  # not set anywhere: the schema default (named by a cross-field check)
        node = node[part]
    while k:
        if k in origins:
            return origins[k]
        k = k.rpartition(".")[0]
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML, safe loader) onto the schema defaults, then apply ``key=value`` overrides.

    Errors say where the bad key came from: the file and line, or the override. The returned config holds
    absolute local paths (see :func:`resolve_paths`).
    """
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}  # dotted key -> "in FILE, line N" / "from the command line: k=v"
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"Config file {path} is a folder; pass --config with a YAML file (e.g. {path}/config.yaml).")
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass --config with an existing YAML file.")
        try:
            data, lines = _load_yaml(_read_config_text(path), str(path))
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML: {e}") from e
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections at the top level.")
        origins = {k: f"in {path}, line {n}" for k, n in lines.items()}
    for item in overrides:
        key, value = parse_override(item)
        _apply_override(data, origins, key, value, f"from the command line: {item}")
    try:
        return resolve_paths(config_from_dict(data))
    except ConfigError as e:
        found = [o for o in (_origin_of(k, data, origins) for k in e.keys) if o is not None]
        where = "; ".join(dict.fromkeys(found)) or (f"in {path}" if path is not None else "")
        raise ConfigError(f"{e} ({where})" if where else str(e), e.keys) from None


def _absolute(p: str, base: Path) -> str:
    q = Path(p).expanduser()
    q = q if q.is_absolute() else base / q
    try:
        return str(q.resolve())  # as the trainer resolves output_dir
    except (OSError, RuntimeError):  # a symlink loop: still absolute, just not canonical
        return os.path.abspath(q)


def _exists(p: str, base: Path) -> bool:
    try:
        return (base / Path(p).expanduser()).exists()
    except (OSError, RuntimeError):
        return False


def resolve_paths(cfg: Config, base: str | Path | None = None) -> Config:
    """Make the run's local paths absolute (in place), so the recorded config works from any folder.

    Relative paths are read from ``base`` (default: the working folder), as the trainer reads them.
    ``output_dir``, ``data.cache_dir`` and a ``folder`` dataset's ``data.root`` are always local; an ``hf``
    root, a validation data root and a ``checkpoint.resume_from`` path only when that path exists here,
    so hub ids stay as they are.
    """
    base = Path.cwd() if base is None else Path(base)
    data_cfg = cfg.data
    cfg.output_dir = _absolute(cfg.output_dir, base)
    if data_cfg.source == "folder" or _exists(data_cfg.root, base):
        data_cfg.root = _absolute(data_cfg.root, base)
    if data_cfg.cache_dir:
        data_cfg.cache_dir = _absolute(data_cfg.cache_dir, base)
    val_root = getattr(cfg.validation, "data_root", None)  # a held-out set, where the schema has one
    if isinstance(val_root, str) and val_root and (data_cfg.source == "folder" or _exists(val_root, base)):
        cfg.validation.data_root = _absolute(val_root, base)
    resume = cfg.checkpoint.resume_from
    if resume and resume != "latest" and _exists(resume, base):
        cfg.checkpoint.resume_from = _absolute(resume, base)
    return cfg


def _check_cross_field(cfg: Config) -> None:
    data_cfg = cfg.data
    if data_cfg.source == "hf" and data_cfg.synthetic.enabled:
        raise ConfigError(
            "`data.synthetic.enabled` writes a folder dataset; it cannot be used with `data.source: hf`.",
            ("data.synthetic.enabled", "data.source"),
        )
    if data_cfg.resolution % 16 != 0:
        raise ConfigError(
            f"`data.resolution` must be divisible by 16 (VAE 8x and 2x2 packing); got {data_cfg.resolution}.",
            "data.resolution",
        )
    if data_cfg.random_crop and data_cfg.cache_latents:
        raise ConfigError(
            "`data.random_crop: true` cannot be cached (every epoch has a new crop window); set "
            "`data.cache_latents: false` or `data.random_crop: false`.",
            ("data.random_crop", "data.cache_latents"),
        )
    if cfg.validation.data_root and cfg.validation.holdout:
        raise ConfigError(
            "`validation.data_root` and `validation.holdout` both choose the validation samples; set only one.",
            ("validation.data_root", "validation.holdout"),
        )
    on_policy = cfg.loss.on_policy
    if on_policy.enabled and not cfg.loss.geometry.enabled:
        raise ConfigError(
            "`loss.on_policy.enabled: true` judges the geometry terms on the model's own samples, but "
            "`loss.geometry.enabled` is false; turn the geometry terms on or on-policy off.",
            ("loss.on_policy.enabled", "loss.geometry.enabled"),
        )
    if on_policy.sigma_min > on_policy.sigma_max:
        raise ConfigError(
            f"`loss.on_policy.sigma_min` ({on_policy.sigma_min}) is above `loss.on_policy.sigma_max` ({on_policy.sigma_max}); "
            "swap them.",
            ("loss.on_policy.sigma_min", "loss.on_policy.sigma_max"),
        )
    if not cfg.lora.target_modules:
        raise ConfigError(
            "`lora.target_modules` is empty; list at least one module-name suffix (e.g. attn.to_q).",
            "lora.target_modules",
        )


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and trackers)."""
    return dataclasses.asdict(cfg)


def flat_config(cfg: Config) -> dict[str, Any]:
    """The config as one level of ``section.key`` names with tracker-safe values (for TensorBoard and W&B)."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config_to_dict(cfg), "")
    return flat


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: a failed write leaves the previous file whole)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False), "the run's config")


def reference_markdown() -> str:
    """The config reference table (every key, type, default, meaning), generated from the schema."""
    lines = [
        "# Config reference",
        "",
        "Generated from `kontext/training/config.py` by `python -m kontext.training.config`; a test keeps it identical.",
        "Set a key in YAML (`section:` then `key: value`) or on the command line as `section.key=value`.",
        "Numbers may be written in any usual notation (`1e-4`, `5E-5`, `0.0001`, `1_000`) and must be finite;",
        "the type column gives each number's allowed range. A key may appear only once per mapping.",
        "`output_dir`, `data.cache_dir` and local `data.root` paths are recorded absolute in the run's `config.yaml`.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]

    def walk(cls: type, prefix: str) -> None:
        hints = _hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if _is_section(tp):
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = yaml.safe_dump(default, default_flow_style=True, width=10_000).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            if isinstance(default, list) and len(shown) > 60:
                shown = "see `kontext/training/config.py` (`DEFAULT_LORA_TARGETS`)"
            tname = _type_name(tp)
            bounds = _range_text(f.metadata)
            if bounds:
                tname += f", {bounds}"
            tname = tname.replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | {tname} | `{shown}` | {f.metadata.get('help', '')} |")

    walk(Config, "")
    return "\n".join(lines + ["", *DEFAULT_NOTES]) + "\n"


# Why some defaults are what they are; appended to the generated reference.
DEFAULT_NOTES = [
    "## Why these defaults",
    "",
    "**`model.guidance_scale: 1.0` (training) and `validation.guidance_scale: 2.5` (sampling).** FLUX.1 Kontext",
    "[dev] is guidance-distilled: the guidance value is an input of the transformer (an embedding), trained so",
    "that the output at value `g` imitates classifier-free guidance at scale `g`. The rectified-flow target",
    "`noise - x0` is the plain conditional velocity, with no guidance in it, and guidance 1 is exactly \"no",
    "guidance\". Training at 1.0 therefore asks the embedding for what it already means, and leaves the distilled",
    "behaviour at the values users sample with (2.5, the Kontext pipeline's default) to the base model. Training",
    "at 3.5, as diffusers' Kontext LoRA example and kohya's sd-scripts do by default, teaches the model to give",
    "the unguided velocity when told 3.5, which erodes the distillation the LoRA is later sampled with; SimpleTuner",
    "defaults to 1.0 for the same reason. Set `model.guidance_scale` to the value you will sample at if you want",
    "the LoRA to learn the guided appearance instead; the value is recorded in the run's `config.yaml`.",
]


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
