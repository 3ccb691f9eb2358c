"""The one config schema of the trainer: every default lives here, YAML only overrides it.

Load a config the way the trainer does::

    from kontext.config import load_config
    cfg = load_config("configs/example_tiny.yaml", overrides=["train.max_steps=10"])

Unknown or misspelled keys, wrong types and out-of-range values raise :class:`ConfigError`
naming the key (with a suggestion for misspellings). ``python -m kontext.config`` prints the
reference table that ``docs/config.md`` holds; a test keeps the two identical.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the fix."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its documentation (the single source of the reference table)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


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
        "A hub id, a local diffusers folder, or `tiny` for the embedded tiny model (built on first use).",
    )
    revision: Optional[str] = _f(None, "Hub revision of the base model.")
    variant: Optional[str] = _f(None, "Weight variant to load (e.g. `fp16`), when the repository has one.")
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "bfloat16", "dtype of the frozen base weights (LoRA parameters always stay float32)."
    )
    guidance_scale: float = _f(1.0, "Value fed to the transformer's guidance embedding during training.")
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
    seed: int = _f(0, "Seed of the generator (same seed, same bytes).")


@dataclass
class DataConfig:
    """Where samples come from and how they are turned into tensors."""

    source: Literal["folder", "hf"] = _f("folder", "`folder`: the on-disk layout; `hf`: a Hugging Face dataset.")
    root: str = _f("data/my_object", "Dataset folder (or, for `source: hf`, a hub dataset name or local path).")
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
    resolution: int = _f(1024, "Training resolution (side of the square bucket, or area of the aspect buckets).", min=16)
    aspect_buckets: bool = _f(False, "Use aspect-ratio buckets derived from the Kontext preferred resolutions.")
    random_crop: bool = _f(False, "Random instead of centre crop after resizing to the bucket.")
    random_flip: bool = _f(False, "Horizontal flip augmentation (context, target and mask together).")
    cache_latents: bool = _f(True, "Encode latents and prompts once, store them on disk, free the encoders.")
    cache_dir: Optional[str] = _f(None, "Latent cache folder (default: `$KONTEXT_LORA_CACHE/latents`).")
    max_pixels: int = _f(64_000_000, "Reject images with more pixels than this (decompression-bomb guard).", min=1)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LoraConfigSection:
    """The LoRA attached to the transformer."""

    rank: int = _f(16, "LoRA rank.", min=1)
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / rank).", exclusive_min=0)
    dropout: float = _f(0.0, "LoRA dropout.", min=0.0, max=1.0)
    init: Literal["gaussian", "default", "pissa", "olora"] = _f(
        "gaussian", "Initialisation of the LoRA matrices (PEFT `init_lora_weights`)."
    )
    target_modules: list[str] = _f(DEFAULT_LORA_TARGETS, "Module-name suffixes that receive a LoRA.")


@dataclass
class TrainConfig:
    """The optimisation loop."""

    max_steps: int = _f(1000, "Number of optimiser updates.", min=1)
    seed: int = _f(0, "Seed of everything random (noise, timesteps, data order, LoRA init).")
    batch_size: int = _f(1, "Samples per process per micro-batch.", min=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimiser update.", min=1)
    learning_rate: float = _f(1e-4, "Peak learning rate.", exclusive_min=0)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = _f("constant_with_warmup", "Learning-rate schedule (diffusers `get_scheduler`).")
    lr_warmup_steps: int = _f(0, "Warm-up optimiser updates.", min=0)
    optimizer: Literal["adamw", "adamw8bit", "prodigy"] = _f("adamw", "Optimiser (8-bit AdamW needs CUDA + bitsandbytes).")
    adam_beta1: float = _f(0.9, "Adam beta1.", min=0.0, max=1.0)
    adam_beta2: float = _f(0.999, "Adam beta2.", min=0.0, max=1.0)
    adam_epsilon: float = _f(1e-8, "Adam epsilon.", exclusive_min=0)
    weight_decay: float = _f(1e-4, "Decoupled weight decay.", min=0.0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables clipping).", min=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = _f(
        "no", "accelerate mixed precision (overridden by `accelerate launch --mixed_precision`)."
    )
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = _f(
        "none", "Timestep density / loss weighting, as diffusers' FLUX training scripts."
    )
    resolution_shift: bool = _f(
        False, "Shift training sigmas by FLUX's resolution-dependent schedule shift (as the pipeline samples)."
    )
    logit_mean: float = _f(0.0, "Mean of the logit-normal timestep density.")
    logit_std: float = _f(1.0, "Std of the logit-normal timestep density.", exclusive_min=0)
    mode_scale: float = _f(1.29, "Scale of the `mode` timestep density.")
    max_nonfinite_steps: int = _f(
        5, "Stop after this many consecutive updates skipped for a NaN/inf loss or gradient.", min=1
    )


@dataclass
class GeometryConfig:
    """The mask-geometry losses on the predicted clean latents (see docs/losses.md)."""

    enabled: bool = _f(True, "All geometry terms on or off at once.")
    weight: float = _f(1.0, "Global multiplier of the geometry total.", min=0.0)
    noise_weighting: Literal["none", "one_minus_sigma", "cosine"] = _f(
        "one_minus_sigma", "Per-sample weight by noise level: z_pred is a blur at high sigma."
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
    k_sigma: float = _f(2.0, "Change-mask threshold in background standard deviations.", min=0.0)
    sdm_normalize: bool = _f(True, "Scale each signed distance map by its max |value|.")


@dataclass
class LossConfig:
    """Loss terms."""

    geometry: GeometryConfig = field(default_factory=GeometryConfig)


@dataclass
class CheckpointConfig:
    """Resumable training state."""

    every_steps: int = _f(500, "Save a checkpoint every this many optimiser updates (0: only at pre-emption).", min=0)
    total_limit: Optional[int] = _f(3, "Keep at most this many checkpoints (null: keep all).", min=1)
    resume_from: Optional[str] = _f(None, "`latest`, or a checkpoint folder path, to resume from.")
    overwrite_output_dir: bool = _f(False, "Allow starting a fresh run in an output_dir that holds a finished run.")


@dataclass
class ValidationConfig:
    """Generation on fixed samples during training."""

    every_steps: int = _f(0, "Validate every this many updates (0: only at the end; -1: never).", min=-1)
    num_samples: int = _f(2, "Number of fixed dataset samples to generate for.", min=1)
    num_inference_steps: int = _f(28, "Sampler steps per validation image.", min=1)
    guidance_scale: float = _f(2.5, "Guidance at validation (FLUX.1 Kontext default 2.5).")
    seed: int = _f(0, "Seed of the validation generator.")


@dataclass
class LoggingConfig:
    """Trackers and console output."""

    report_to: Literal["tensorboard", "wandb", "none"] = _f("tensorboard", "accelerate tracker.")
    project_name: str = _f("kontext-lora", "Tracker project / run group name.")
    log_every: int = _f(1, "Log scalars every this many updates.", min=1)


@dataclass
class ExportConfig:
    """Artifacts written at the end of training."""

    comfyui: bool = _f(False, "Also write `lora_comfyui.safetensors` with original FLUX module names.")
    save_dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "dtype of the exported LoRA tensors.")


@dataclass
class Config:
    """A training run."""

    output_dir: str = _f("outputs/run", "Where checkpoints, logs and the exported LoRA go.")
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
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            sugg = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(f"`{key}` must be one of {', '.join(map(repr, choices))}; got {value!r}.{sugg}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{key}` must be a list of {_type_name(item_tp)}; got {type(value).__name__} {value!r}.")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false; got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{key}` must be an integer; got {type(value).__name__} {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number; got {type(value).__name__} {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{key}` must be a string; got {type(value).__name__} {value!r}.")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not a user error


def _check_range(key: str, value: Any, meta: Any) -> None:
    if value is None or isinstance(value, (bool, str, list)):
        return
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"`{key}` must be >= {meta['min']}; got {value!r}.")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"`{key}` must be <= {meta['max']}; got {value!r}.")
    if "exclusive_min" in meta and value <= meta["exclusive_min"]:
        raise ConfigError(f"`{key}` must be > {meta['exclusive_min']}; got {value!r}.")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"`{prefix.rstrip('.') or 'config'}` must be a mapping of keys; got {data!r}.")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            sugg = f" Did you mean `{prefix}{close[0]}`?" if close else ""
            raise ConfigError(
                f"Unknown config key `{prefix}{key}`.{sugg} Valid keys here: {', '.join(sorted(fields))}."
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


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``section.key=value`` override; the value is read as YAML (``true``, ``3``, ``[a, b]``)."""
    if "=" not in text:
        raise ConfigError(f"Override {text!r} is not of the form section.key=value (e.g. train.max_steps=100).")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"Override {text!r} has no key before '='.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"Override {text!r}: the value is not valid YAML ({e}).") from e
    return key, value


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a (possibly partial) nested mapping."""
    cfg = _build(Config, data or {}, "")
    _check_cross_field(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``path`` (YAML, safe loader) onto the schema defaults, then apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass --config with an existing YAML file.")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections at the top level.")
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    try:
        return config_from_dict(data)
    except ConfigError as e:
        where = f" (in {path})" if path is not None else ""
        raise ConfigError(f"{e}{where}") from None


def _check_cross_field(cfg: Config) -> None:
    if cfg.data.source == "hf" and cfg.data.synthetic.enabled:
        raise ConfigError("`data.synthetic.enabled` writes a folder dataset; it cannot be used with `data.source: hf`.")
    if cfg.data.resolution % 16 != 0:
        raise ConfigError(f"`data.resolution` must be divisible by 16 (VAE 8x and 2x2 packing); got {cfg.data.resolution}.")
    if not cfg.lora.target_modules:
        raise ConfigError("`lora.target_modules` is empty; list at least one module-name suffix (e.g. attn.to_q).")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML and trackers)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")


def reference_markdown() -> str:
    """The config reference table (every key, type, default, meaning), generated from the schema."""
    lines = [
        "# Config reference",
        "",
        "Generated from `kontext/config.py` by `python -m kontext.config`; a test keeps it identical.",
        "Set a key in YAML (`section:` then `key: value`) or on the command line as `section.key=value`.",
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
                shown = "see `kontext/config.py` (`DEFAULT_LORA_TARGETS`)"
            tname = _type_name(tp).replace("|", "\\|")
            lines.append(f"| `{prefix}{f.name}` | {tname} | `{shown}` | {f.metadata.get('help', '')} |")

    walk(Config, "")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
