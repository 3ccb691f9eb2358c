"""Train a FLUX.1 Kontext LoRA that inserts one product into a mask region at the mask's size.

Run (one process or many, through accelerate)::

    accelerate launch train_kontext_lora.py --config configs/example_tiny.yaml
    accelerate launch train_kontext_lora.py --config configs/flux_kontext_dev.yaml train.max_steps=2000
    python train_kontext_lora.py --config configs/example_tiny.yaml output_dir=outputs/try

The script reads top to bottom: ``setup`` (config, output folder, dataset check, model, LoRA, cache,
optimiser, resume) -> ``train`` (the rectified-flow step plus the mask-geometry losses) ->
``finish`` (export, validation, model card). The step math is :func:`compute_loss`, a plain function.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data.dataset import TrainBatch, make_train_batch
from kontext.training.config import Config, ConfigError, config_to_dict, dump_config, load_config

logger = logging.getLogger("kontext_lora")
# The loggers of this project's packages; libraries (diffusers, transformers, ...) stay at WARNING.
OWN_LOGGERS = ("kontext_lora", "kontext", "data", "losses")
_RUN_CLOCK: dict[str, float] = {}

FINISHED_MARKER = "pytorch_lora_weights.safetensors"
from kontext.runtime.dtypes import DTYPES  # noqa: E402  (one table for the trainer and the tools)


def _launched_by_accelerate(environ: Any = None) -> bool:
    """True under ``accelerate launch`` (or torchrun), which choose the processes' CPU threads themselves."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or any(k.startswith("ACCELERATE_") for k in env)


def cpu_threads_for_plain_run(environ: dict[str, str] | None = None) -> int | None:
    """The intra-op thread count for a ``python train_kontext_lora.py`` run, or None to leave torch's choice.

    None when ``OMP_NUM_THREADS`` is set (the user's choice always wins) or when accelerate launched the
    script (it sets ``OMP_NUM_THREADS`` itself). Otherwise the physical cores this process may use, as
    ``accelerate launch --cpu`` chooses, less the cores other work keeps busy (the 1-minute load average):
    OpenMP threads that wait for a core held by another process spin, and on a busy 2-core box two
    threads ran a step tens of times slower than one.
    """
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip() or _launched_by_accelerate(env):
        return None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or usable
    except ImportError:
        physical = usable
    cores = max(1, min(usable, physical))
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):
        busy = 0
    return max(1, min(cores, usable - busy))


def set_cpu_threads() -> int | None:
    """Apply :func:`cpu_threads_for_plain_run` (the script's entry point calls this; imports never do)."""
    threads = cpu_threads_for_plain_run()
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # and for any worker process started later
    return threads


class UserError(Exception):
    """An error in the user's input that ends the run with one clear message (no traceback)."""


# ---------------------------------------------------------------------------------------------
# The training step: rectified flow as FLUX uses it, then geometry losses on the predicted x0.
# ---------------------------------------------------------------------------------------------


def compute_loss(
    transformer: torch.nn.Module,
    batch: TrainBatch,
    cfg: Config,
    generator: torch.Generator,
    train_scheduler: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss.

    ``batch`` (a ``data.dataset.TrainBatch``) holds ``target_latents`` / ``context_latents`` (hinted, the
    conditioning) / ``scene_latents`` (un-hinted, what the geometry terms compare with) ``[B, 16, h, w]``,
    ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, Dp]`` and ``geometry`` (a ``losses.MaskTargets``
    ``[B, 1, h, w]`` each).
    ``train_scheduler`` is the base model's ``FlowMatchEulerDiscreteScheduler`` before ``set_timesteps``
    (its training table of timesteps and sigmas). Noise is drawn first, then ``u``, from ``generator``.
    Returns the total loss (float32 scalar) and its detached components for logging.
    """
    from kontext.runtime.flux import predict_velocity
    from losses import GeometryLossWeights, geometry_loss, noise_level_weight
    from losses import flow_matching as fm

    x0 = batch.target_latents
    ctx = batch.context_latents
    bsz = x0.shape[0]
    device = x0.device
    tc = cfg.train

    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(device)
    u = fm.sample_timestep_density(
        tc.weighting_scheme, bsz, tc.logit_mean, tc.logit_std, tc.mode_scale, generator=generator
    )
    timesteps, sigmas = fm.timesteps_and_sigmas_from_density(u, train_scheduler)
    if tc.resolution_shift:
        # Train at the noise levels the pipeline samples at this resolution (FLUX's dynamic shift).
        seq_len = (x0.shape[-2] // 2) * (x0.shape[-1] // 2)
        sigmas = fm.shift_sigmas_for_resolution(sigmas, seq_len)
        timesteps = sigmas * train_scheduler.config.num_train_timesteps
    sigmas = sigmas.to(device)
    sig = sigmas.view(-1, 1, 1, 1)
    x0f = x0.float()
    x_t = fm.add_noise(x0f, noise, sig)

    v_pred = predict_velocity(
        transformer,
        x_t.to(x0.dtype),
        ctx,
        (timesteps.to(device) / 1000.0),
        batch.prompt_embeds,
        batch.pooled_prompt_embeds,
        cfg.model.guidance_scale,
    )
    # Losses in float32 whatever the model's dtype.
    v_pred = v_pred.float()
    target = fm.velocity_target(x0f, noise)
    weighting = fm.loss_weighting(tc.weighting_scheme, sig)
    if cfg.loss.masked.enabled:
        weighting = weighting * fm.masked_flow_weight(batch.geometry.mask, cfg.loss.masked.unmasked_weight)
    base = fm.flow_matching_loss(v_pred, target, weighting)
    logs: dict[str, torch.Tensor] = {"loss/flow": base.detach()}
    total = base

    geo = cfg.loss.geometry
    if geo.enabled:
        # The clean latents the velocity implies; the geometry terms judge them against target and context.
        z_pred = fm.predicted_clean_latents(x_t, v_pred, sig)
        weights = GeometryLossWeights(mse=geo.mse, bg=geo.bg, dice=geo.dice, area=geo.area, boundary=geo.boundary)
        # "What did the model change" is asked against the un-hinted scene, not the grey-filled context.
        geo_total, parts = geometry_loss(
            z_pred,
            x0f,
            batch.scene_latents.float(),
            batch.geometry,
            weights,
            w_in=geo.w_in,
            w_band=geo.w_band,
            w_out=geo.w_out,
            k_sigma=geo.k_sigma,
            formulation=geo.formulation,
            temperature=geo.temperature,
            sample_weights=noise_level_weight(sigmas, geo.noise_weighting),
        )
        total = total + geo.weight * geo_total
        logs["loss/geometry"] = geo_total.detach()
        logs.update({f"loss/{k}": v.detach() for k, v in parts.items()})
    logs["loss/total"] = total.detach()
    return total, logs


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop needs, built by :func:`setup`."""

    cfg: Config
    accelerator: Any
    output_dir: Path
    pipe: Any
    transformer: torch.nn.Module
    lora_params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    dataset: Any
    sampler: Any
    train_scheduler: Any
    encoders_device: torch.device
    # Uncached data: pixels -> latents with the VAE (None when the latents are cached).
    encode_images: Any = None
    start_step: int = 0
    data_state: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "position": 0})
    history: list[dict[str, float]] = field(default_factory=list)
    stop_reason: str = ""
    validation_dataset: Any = None  # held-out samples (validation.data_root / holdout); None: the training ones


def check_output_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The output folder and the verified checkpoint to resume (or None), after the checks (and the lock) of
    ``kontext.training.output_dir.open_output_dir``: nothing is written before them, and nothing of others' is touched."""
    from kontext.training.checkpoint import CheckpointError
    from kontext.training.output_dir import OutputDirError, is_main_launch_process, open_output_dir

    try:
        return open_output_dir(cfg, main=is_main_launch_process())
    except (OutputDirError, CheckpointError) as e:
        raise UserError(str(e)) from None


def resolve_model(name_or_path: str) -> str:
    """``tiny`` -> the cached tiny model folder (built on first use); a folder -> absolute; a hub id unchanged."""
    from kontext.runtime.model_path import ModelPathError, resolve_model_path

    try:
        return resolve_model_path(name_or_path)
    except ModelPathError as e:
        raise UserError(str(e)) from None


def open_dataset_source(cfg: Config):
    """The configured sample source, validated in full (all problems reported at once)."""
    from data import DatasetError, open_configured_source, validate_source

    d = cfg.data
    try:
        source = open_configured_source(d, d.root)
        from data import make_buckets

        # Also warns about masks that vanish at the training size (nothing left for the geometry terms).
        validate_source(source, max_pixels=d.max_pixels, buckets=make_buckets(d.resolution, d.aspect_buckets))
    except DatasetError as e:
        raise UserError(str(e)) from None
    return source


def setup(cfg: Config) -> Run:
    """Config -> a ready-to-train :class:`Run` (cheap checks first, models after)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    output_dir, resume_ckpt = check_output_dir(cfg)
    from kontext.training.checkpoint import CheckpointError, apply_schedule, check_data_position, read_trainer_state
    from kontext.training.checkpoint import remove_checkpoints, remove_incomplete
    from kontext.training.output_dir import OutputDirError, lock_output_dir

    state = read_trainer_state(resume_ckpt) if resume_ckpt is not None else None
    if resume_ckpt is not None:  # fail on a mismatched LoRA before any model is loaded
        _check_resume_shape(cfg, resume_ckpt, state)
    _check_optional_features(cfg)

    accelerator = Accelerator(
        cpu=_cpu_only_multiprocess(),
        # `auto` -> None: accelerate reads the launcher's choice (ACCELERATE_MIXED_PRECISION, its config file).
        mixed_precision=None if cfg.train.mixed_precision == "auto" else cfg.train.mixed_precision,
        log_with=None if cfg.logging.report_to == "none" else cfg.logging.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The LR schedule counts optimiser updates, once per update whatever the number of processes.
        step_scheduler_with_optimizer=False,
    )
    if accelerator.mixed_precision not in ("no", "bf16", "fp16"):
        raise UserError(
            f"mixed precision {accelerator.mixed_precision!r} (from the launcher) is not supported; "
            "use --mixed_precision no/bf16/fp16 or set train.mixed_precision."
        )
    cfg.train.mixed_precision = accelerator.mixed_precision  # config.yaml records what the run used
    _setup_logging(accelerator)
    set_seed(cfg.train.seed)

    # -- data: generate (embedded default) and validate before any model is loaded
    if cfg.data.synthetic.enabled:
        from data.synthetic import generate_dataset

        def generate() -> None:
            s = cfg.data.synthetic
            try:
                generate_dataset(cfg.data.root, num_samples=s.num_samples, size=(s.size, s.size), seed=s.seed)
            except FileExistsError as e:  # a folder of real data: nothing was written, say so in one message
                raise UserError(f"data.synthetic.enabled is true, but data.root {e}.") from None

        main_process_first(accelerator, generate, everyone=False)
    source = open_dataset_source(cfg)
    from kontext.training.validation import validation_dataset, validation_sources

    try:  # validation.holdout withholds samples from training; validation.data_root is checked like data.root
        source, val_source = validation_sources(cfg, source)
    except ValueError as e:  # data.DatasetError
        raise UserError(str(e)) from None
    try:  # batches that fit the data, and a resumed data position that fits them, before any model loads
        check_data_position(source, cfg, accelerator.num_processes, resume_ckpt, state)
        if accelerator.is_main_process:  # a new folder is created (and locked) only now, after the input checks
            lock_output_dir(output_dir, main=True, create=True)
    except (CheckpointError, OutputDirError) as e:
        raise UserError(str(e)) from None

    # -- model
    model_path = main_process_first(accelerator, lambda: resolve_model(cfg.model.pretrained_model_name_or_path))
    cfg.model.pretrained_model_name_or_path = model_path
    if accelerator.is_main_process:
        remove_incomplete(output_dir)
        if cfg.checkpoint.overwrite_output_dir and resume_ckpt is None:
            remove_checkpoints(output_dir)  # the old run's checkpoints must never be resumed into this one
        dump_config(cfg, output_dir / "config.yaml")

    weight_dtype = DTYPES[cfg.model.dtype]
    pipe = _load_pipeline(cfg, model_path, weight_dtype)
    device = accelerator.device
    transformer = pipe.transformer
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False).eval()
    encoders_device = torch.device("cpu") if cfg.model.offload_encoders else device
    if cfg.model.quantization == "none":
        transformer.to(device)
    pipe.vae.to(encoders_device)
    pipe.text_encoder.to(encoders_device)
    pipe.text_encoder_2.to(encoders_device)

    from kontext.runtime.lora import attach_lora, make_lora_config

    lc = cfg.lora
    torch.manual_seed(cfg.train.seed)  # LoRA init is part of the run's seed
    try:
        lora_params = attach_lora(
            transformer, make_lora_config(lc.rank, lc.alpha, lc.dropout, lc.init, lc.target_modules)
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    # -- dataset, cache, sampler
    dataset = _build_dataset(cfg, source, pipe, accelerator, encoders_device)
    val_data = validation_dataset(cfg, val_source) if val_source is not None else None
    # Validation's prompts are known now: encode the held-out ones, then free CLIP and T5.
    val_prompts = [val_data.prompt_of(i) for i in range(min(cfg.validation.num_samples, len(val_data)))] if val_data else []
    _free_text_encoders(pipe, dataset, _prompt_table(pipe, cfg, val_prompts, encoders_device))
    from data import BucketBatchSampler

    try:
        sampler = BucketBatchSampler(
            dataset.bucket_ids,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            shuffle=True,
            drop_last=True,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )
    except ValueError as e:
        raise UserError(str(e)) from None

    # -- optimiser and schedule
    optimizer = _make_optimizer(cfg, lora_params)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    _register_lora_hooks(accelerator, transformer)

    from diffusers import FlowMatchEulerDiscreteScheduler

    # Training sigmas come from the scheduler's un-shifted training table, as diffusers' Kontext script.
    train_sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        output_dir=output_dir,
        pipe=pipe,
        transformer=transformer,
        lora_params=lora_params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        dataset=dataset,
        sampler=sampler,
        train_scheduler=train_sched,
        encoders_device=encoders_device,
        encode_images=None
        if cfg.data.cache_latents
        else _image_encoder(pipe, encoders_device, to_cpu=False, max_images=cfg.data.cache_batch_size),
        validation_dataset=val_data,
    )
    if resume_ckpt is not None:
        accelerator.load_state(str(resume_ckpt))
        run.start_step = int(state["step"])
        try:
            # Refuses a position from another dataset size, batch size, seed or process count.
            run.sampler.load_state_dict(state["data"])
        except ValueError as e:
            raise UserError(f"Cannot resume from {resume_ckpt}: {e}") from None
        run.data_state = {"epoch": int(state["data"]["epoch"]), "position": int(state["data"]["position"])}
        run.history = list(state.get("history", []))
        apply_schedule(run.lr_scheduler, state, cfg.train, warn=accelerator.is_main_process)  # a changed LR applies, loudly
        accelerator.print(f"Resumed from {resume_ckpt} at step {run.start_step}.")
    if accelerator.is_main_process and cfg.logging.report_to != "none":
        accelerator.init_trackers(cfg.logging.project_name, config=_flat_config(cfg))
    return run


def main_process_first(acc: Any, fn: Callable[[], Any], everyone: bool = True) -> Any:
    """``fn()`` on the main process, then (``everyone``) on the others; returns this process's result.

    Unlike ``accelerator.main_process_first()``, an error on the main process does not leave the other ranks
    waiting at its barrier: the main process re-raises it, every other rank raises a :class:`UserError` with
    its message. The broadcast of the outcome is the barrier (one collective, several processes only).
    """
    result = None
    if acc.is_main_process:
        try:
            result = fn()
        except BaseException as e:
            if acc.num_processes > 1:
                _share_outcome(str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            raise
    # Reached by the main process only when fn() succeeded; the others learn here how it went.
    failure = _share_outcome(None) if acc.num_processes > 1 else None
    if failure is not None:
        raise UserError(f"the main process failed: {failure}")
    if everyone and not acc.is_main_process:
        result = fn()
    return result


def _share_outcome(failure: str | None) -> str | None:
    """The main process's failure message (or None) on every rank."""
    from accelerate.utils import broadcast_object_list

    box = [failure]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _cpu_only_multiprocess() -> bool:
    """True when launched as several processes (``WORLD_SIZE`` > 1) on a machine without any accelerator.

    accelerate then only forms a gloo group (``DistributedType.MULTI_CPU``) if asked for the CPU;
    otherwise every process silently trains alone and all of them write the same output folder.
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return world > 1 and not torch.accelerator.is_available()


def _check_optional_features(cfg: Config) -> None:
    """GPU-only options fail here, before any data or model is touched."""
    from kontext.runtime.quantization import QuantizationUnavailable, check_available

    try:
        check_available(cfg.model.quantization)
    except QuantizationUnavailable as e:
        raise UserError(str(e)) from None
    if cfg.train.optimizer == "adamw8bit":
        if not torch.cuda.is_available():
            raise UserError("`train.optimizer: adamw8bit` needs a CUDA GPU (bitsandbytes); use `adamw` on this machine.")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("`train.optimizer: adamw8bit` needs bitsandbytes: pip install -e '.[quantization]'.") from None
    if cfg.train.optimizer == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise UserError("`train.optimizer: prodigy` needs prodigyopt: pip install -e '.[prodigy]'.") from None


def _check_resume_shape(cfg: Config, ckpt: Path, state: dict[str, Any]) -> None:
    from kontext.training.checkpoint import CheckpointError, check_compatible

    try:
        check_compatible(ckpt, state, _lora_shape(cfg))
    except CheckpointError as e:
        raise UserError(str(e)) from None


def _lora_shape(cfg: Config) -> dict[str, Any]:
    return {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "target_modules": sorted(cfg.lora.target_modules)}


def _setup_logging(accelerator: Any) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    # Our own messages at INFO on the main process; libraries only when something is wrong.
    _RUN_CLOCK["start"] = time.perf_counter()  # setup calls this first: the summary's wall time starts here
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()


def _load_pipeline(cfg: Config, model_path: str, weight_dtype: torch.dtype):
    from diffusers import FluxKontextPipeline

    kwargs: dict[str, Any] = {"dtype": weight_dtype}
    if cfg.model.revision:
        kwargs["revision"] = cfg.model.revision
    if cfg.model.variant:
        kwargs["variant"] = cfg.model.variant
    if cfg.model.quantization != "none":
        from kontext.runtime.quantization import quantized_transformer

        kwargs["transformer"] = quantized_transformer(model_path, cfg.model.quantization, weight_dtype, kwargs)
    try:
        return FluxKontextPipeline.from_pretrained(model_path, **kwargs)
    except OSError as e:
        raise UserError(
            f"Could not load FLUX.1 Kontext from {model_path!r} ({e}). For the gated hub model run "
            "`huggingface-cli login` after accepting its licence, or point model.pretrained_model_name_or_path "
            "at a local diffusers folder (or `tiny`)."
        ) from None


def _build_dataset(cfg: Config, source: Any, pipe: Any, accelerator: Any, encoders_device: torch.device):
    """The training dataset, with every prompt's embeddings computed once (cached on disk with
    ``data.cache_latents``, else held in memory) and, when cached, every sample's latents too.

    With caching the VAE is parked on the CPU until validation.
    """
    from data import LatentCache
    from data.dataset import TripletDataset

    d = cfg.data
    g = cfg.loss.geometry
    model_id = f"{cfg.model.pretrained_model_name_or_path}|{cfg.model.dtype}|msl{cfg.model.max_sequence_length}"
    cache = None
    if d.cache_latents:
        cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else _default_cache_dir()
        cache = LatentCache(cache_dir, model_id=model_id)
    dataset = TripletDataset(
        source,
        resolution=d.resolution,
        aspect_buckets=d.aspect_buckets,
        random_crop=d.random_crop,
        random_flip=d.random_flip,
        mask_hint=d.mask_hint,
        outline_width=d.outline_width,
        seed=cfg.train.seed,
        band_r=g.band_r,
        sdm_normalize=g.sdm_normalize,
        cache=cache,
        encode_images=_image_encoder(pipe, encoders_device, to_cpu=True),
        encode_prompts=_prompt_encoder(pipe, cfg, encoders_device),
        # Mask-derived targets (latent mask, band, outside, SDM) are computed once per sample.
        with_geometry=g.enabled or cfg.loss.masked.enabled,
        decoded_memory_mb=d.decoded_memory_mb,
    )
    if cache is not None:
        # Main process fills the shared cache; the others then read it.
        with accelerator.main_process_first():
            dataset.build_cache(progress=accelerator.is_local_main_process, batch_size=d.cache_batch_size)
        if encoders_device.type != "cpu":
            # The VAE is not needed until validation: give its memory to training.
            pipe.vae.to("cpu")
    else:
        # Prompts do not change with crops or flips: encode them once, not in every step.
        dataset.encode_prompt_table(batch_size=d.cache_batch_size)
    dataset.encode_images = dataset.encode_prompts = None  # the closures must not keep the encoders alive
    return dataset


def _prompt_encoder(pipe: Any, cfg: Config, device: torch.device) -> Any:
    """``prompts -> (prompt_embeds [B, L, D], pooled [B, Dp])`` with the pipeline's CLIP and T5 (float32, CPU)."""
    from kontext.runtime.flux import encode_prompts

    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pe, pooled = encode_prompts(pipe, prompts, cfg.model.max_sequence_length, device)
        return pe.float().cpu(), pooled.float().cpu()

    return encode


def _prompt_table(pipe: Any, cfg: Config, prompts: list[str], device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{prompt: (prompt_embeds [L, D], pooled [Dp])}`` of ``prompts``, ``data.cache_batch_size`` per encoder call."""
    encode, table, todo = _prompt_encoder(pipe, cfg, device), {}, sorted(set(prompts))
    for s in range(0, len(todo), cfg.data.cache_batch_size):
        chunk = todo[s : s + cfg.data.cache_batch_size]
        pe, pooled = encode(chunk)
        table.update({p: (pe[j], pooled[j]) for j, p in enumerate(chunk)})
    return table


def _image_encoder(pipe: Any, device: torch.device, to_cpu: bool, max_images: int | None = None) -> Any:
    """``pixels [N, 3, H, W] -> latents [N, 16, H/8, W/8]`` with the pipeline's VAE on ``device`` (float32 out),
    at most ``max_images`` per VAE call: the encoder's activations, not the latents, are what costs memory, and on
    the uncached path they would add to the training step's own peak while the next batch is prepared."""
    from kontext.runtime.flux import encode_images

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = pixels.split(max_images or pixels.shape[0])
            z = torch.cat([encode_images(pipe.vae, p.to(device)).float() for p in parts])
        return z.cpu() if to_cpu else z

    return encode


def _free_text_encoders(pipe: Any, dataset: Any, extra: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Delete CLIP and T5 (for FLUX.1 Kontext [dev] about 9.5 GB in bf16) once every prompt is encoded.

    The pipeline's ``encode_prompt`` then serves stored embeddings: ``extra`` (the held-out validation
    samples' prompts), else the training set's (validation without held-out data generates for training
    samples). Any other prompt is an error that says so. Evaluation and inference load their own pipeline.
    """
    import types

    def encode_prompt(self, prompt=None, prompt_2=None, device=None, num_images_per_prompt=1, prompt_embeds=None,
                      pooled_prompt_embeds=None, max_sequence_length=512, lora_scale=None):
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            try:
                pairs = [extra[p] if p in extra else dataset.prompt_embeddings(p) for p in prompts]
            except (ValueError, FileNotFoundError) as e:
                raise RuntimeError(f"the text encoders were freed after the prompts were encoded: {e}") from None
            prompt_embeds = torch.stack([pe for pe, _ in pairs])
            pooled_prompt_embeds = torch.stack([pooled for _, pooled in pairs])
        dtype = self.transformer.dtype
        n = int(num_images_per_prompt)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        return prompt_embeds, pooled_prompt_embeds, text_ids

    pipe.text_encoder = None
    pipe.text_encoder_2 = None
    pipe.encode_prompt = types.MethodType(encode_prompt, pipe)
    _empty_cache()  # gc.collect: the modules are unreachable now; their memory goes back


def _default_cache_dir() -> Path:
    import os

    root = os.environ.get("KONTEXT_LORA_CACHE") or str(Path.home() / ".cache" / "kontext-lora")
    return Path(root) / "latents"


def _empty_cache() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _make_optimizer(cfg: Config, params: list[torch.nn.Parameter]):
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # availability checked in _check_optional_features

        return bnb.optim.AdamW8bit(
            params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
        )
    import prodigyopt

    return prodigyopt.Prodigy(
        params, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, weight_decay=t.weight_decay
    )


def _register_lora_hooks(accelerator: Any, transformer: torch.nn.Module) -> None:
    """Checkpoints hold only the LoRA (plus what accelerate adds), never the frozen 12B base."""
    from kontext.runtime.lora import load_lora_state_dict
    from safetensors.torch import load_file

    base = accelerator.unwrap_model(transformer)

    def save_hook(models: list, weights: list, out_dir: str) -> None:
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is base:
                # Every process takes part in the gather (FSDP shards); the main process writes.
                export_lora(accelerator, base, out_dir)
                if weights:
                    weights.pop(i)

    def load_hook(models: list, in_dir: str) -> None:
        for i in reversed(range(len(models))):
            if accelerator.unwrap_model(models[i]) is base:
                models.pop(i)
                sd = load_file(str(Path(in_dir) / FINISHED_MARKER))
                sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
                load_lora_state_dict(base, sd)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def full_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete LoRA ``{peft_name: float32 CPU tensor}``, sorted by name; call it on every process.

    Under FSDP2 each LoRA matrix is a ``DTensor`` sharded across processes, and ``full_tensor()`` is a
    collective all-gather, so all processes must reach this call in the same order. Under DDP and
    DeepSpeed ZeRO-2 the parameters are whole replicas and this is a plain copy.
    """
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name="default")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(sd):
        v = sd[k].detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.to("cpu", torch.float32).contiguous()
    return out


def lora_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and float32 bytes of a LoRA state dict (order-independent)."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def export_lora(
    accelerator: Any,
    transformer: torch.nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
) -> Path:
    """Gather the full LoRA on every process and write ``pytorch_lora_weights.safetensors`` from the main one.

    The file gets the umask's mode (safetensors leaves 0600) and records ``base_model`` as a hub id or a
    folder name, never a local path (``kontext.runtime.sharing``).
    """
    from diffusers import FluxKontextPipeline

    from kontext.runtime.lora import LORA_WEIGHTS_NAME, adapter_metadata
    from kontext.runtime.sharing import respect_umask

    sd = full_lora_state_dict(transformer)
    path = Path(out_dir) / LORA_WEIGHTS_NAME
    if accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        FluxKontextPipeline.save_lora_weights(
            save_directory=str(out_dir),
            transformer_lora_layers={k: v.to(dtype) for k, v in sd.items()},
            transformer_lora_adapter_metadata=adapter_metadata(transformer, base_model),
            weight_name=LORA_WEIGHTS_NAME,
            safe_serialization=True,
        )
        respect_umask(path)
    return path


def check_replicas_agree(accelerator: Any, transformer: torch.nn.Module) -> list[str]:
    """Each process's LoRA digest (:func:`lora_digest`), gathered in rank order; raises if replicas diverged.

    Call on every process. With several processes the main one prints the list, so the log of a
    multi-process run shows that every replica ended with the same weights. One process: ``[]``.
    """
    if accelerator.num_processes == 1:
        return []
    from accelerate.utils import gather_object

    digests = gather_object([lora_digest(full_lora_state_dict(transformer))])
    accelerator.print(f"LoRA digest per process: {json.dumps(digests)}")
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"LoRA replicas diverged across processes (digests {digests}); their gradients were not synchronised."
        )
    return digests


def _flat_config(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)

    walk(config_to_dict(cfg), "")
    return flat


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


def _batches(run: Run) -> Iterator[TrainBatch]:
    """Micro-batches (:class:`TrainBatch`, on the encoders' device) forever, epoch after epoch, from the saved
    data position on. Uncached samples are VAE-encoded here, the batch's images in one call.

    With ``data.prefetch`` the next batch is prepared in a background thread while the caller computes on
    this one (the same batches in the same order). The position (epoch, batches consumed) is counted when a
    batch is handed out, not when it is prepared, so a checkpoint records exactly what training has consumed.
    """
    state = run.data_state
    # The un-hinted scene is read only by the geometry terms: without them it is not encoded.
    with_scene = run.cfg.loss.geometry.enabled

    def plan() -> Iterator[tuple[int, list[int]]]:
        epoch, position = state["epoch"], state["position"]
        while True:
            run.sampler.set_epoch(epoch)
            run.sampler.load_state_dict({"epoch": epoch, "position": position})
            for indices in run.sampler:
                yield epoch, list(indices)
            epoch, position = epoch + 1, 0

    def build(epoch: int, indices: list[int]) -> tuple[int, TrainBatch]:
        # Flips (and random crops) are drawn per (seed, epoch, index).
        # Uncached with a centre crop, a sample's latents never change: encoded on first use, then kept.
        items = [run.dataset[(i, epoch)] for i in indices]
        return epoch, make_train_batch(items, run.encode_images, with_scene, remember=run.dataset.remember_latents)

    def hand_out(epoch: int) -> None:
        if epoch != state["epoch"]:
            state["epoch"], state["position"] = epoch, 0
        state["position"] += 1
        run.dataset.set_epoch(epoch)

    batches = plan()
    if not run.cfg.data.prefetch:
        for epoch, indices in batches:
            _, batch = build(epoch, indices)
            hand_out(epoch)
            yield batch
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(build, *next(batches))
        for nxt in batches:
            epoch, batch = ahead.result()
            ahead = pool.submit(build, *nxt)
            hand_out(epoch)
            yield batch


def _to_device(batch: TrainBatch, run: Run) -> TrainBatch:
    """The batch on the training device, latents and embeddings in the model's dtype (geometry float32)."""
    return batch.to(run.accelerator.device, DTYPES[run.cfg.model.dtype])


def _step_generator(run: Run, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps of (step, micro-batch, rank) come from their own seeded generator.

    Seeding per step (instead of drawing from one global stream) makes a resumed run draw exactly the
    numbers the uninterrupted run drew, independent of anything else that consumed randomness.
    """
    acc = run.accelerator
    seed = (run.cfg.train.seed * 1_000_003 + step * 1009 + micro * 31 + acc.process_index) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(seed)


def train(run: Run, pause_at: int | None = None) -> str:
    """The optimisation loop. Returns why it stopped: ``done``, ``signal``, ``nonfinite``, ``nonfinite_weights`` or ``paused``.

    ``pause_at``: stop after that many updates with a checkpoint, as a pre-emption would (used to test
    that a resumed run is the same run).
    """
    from tqdm.auto import tqdm

    from kontext.training.checkpoint import weights_finite
    from kontext.training.signals import StopRequest

    cfg, acc = run.cfg, run.accelerator
    accum = cfg.train.gradient_accumulation_steps
    batches = _batches(run)
    step = run.start_step
    bad_streak = 0
    progress = tqdm(
        total=cfg.train.max_steps, initial=step, desc="train", disable=not acc.is_local_main_process, dynamic_ncols=True
    )
    reason = "done"
    # From the prepared model: FSDP2 replaces the parameters with sharded ones (run.lora_params predates prepare).
    trainable = [p for p in run.transformer.parameters() if p.requires_grad]
    # Logged terms stay on the device until a logging step (or a checkpoint) needs them: one transfer then.
    pending: list[tuple[dict[str, float], list[str], torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        values = torch.stack([t for _, _, t in pending])
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")  # all-reduce: the logs are the mean over processes
        for (host, names, _), row in zip(pending, values.tolist()):  # .tolist(): one host-device sync
            run.history.append({"step": host.pop("step"), **dict(sorted({**host, **dict(zip(names, row))}.items()))})
        pending.clear()
        last = run.history[-1]
        progress.set_postfix(
            loss=f"{last['loss/total']:.4f}",
            flow=f"{last['loss/flow']:.4f}",
            **({"geo": f"{last['loss/geometry']:.4f}"} if "loss/geometry" in last else {}),
        )

    def save(at: int) -> None:
        flush()  # the checkpoint records the whole history
        save_checkpoint(run, at)

    with StopRequest() as stop:
        while step < cfg.train.max_steps:
            t0 = time.perf_counter()
            terms: torch.Tensor | None = None  # this update's logged terms, averaged over micro-batches, on the device
            names: list[str] = []
            for micro in range(accum):
                batch = _to_device(next(batches), run)
                # LoRA dropout draws from the global stream: pin it to the step, and to the rank so that the
                # ranks draw different masks (rank 0 keeps the single-process stream).
                torch.manual_seed(cfg.train.seed + 7919 * step + micro + (acc.process_index << 40))
                sync = micro == accum - 1
                ctx = acc.no_sync(run.transformer) if not sync else contextlib.nullcontext()
                with ctx:  # gradients are all-reduced only with the last micro-batch's backward
                    with acc.autocast():
                        loss, logs = compute_loss(run.transformer, batch, cfg, _step_generator(run, step, micro), run.train_scheduler)
                    # A NaN/inf loss gives NaN/inf gradients: the check below discards them with the update.
                    acc.backward(loss / accum)
                names = list(logs)
                row = torch.stack([v.float() for v in logs.values()]) / accum
                terms = row if terms is None else terms + row
            # One fused check per update: a host-device sync (and, with several processes, one all-reduce, so that
            # all ranks skip together).
            finite = _all_finite(acc, terms)
            if not finite:
                bad = [n for n, v in zip(names, terms.tolist()) if not math.isfinite(v)]  # failure path only
                logger.warning(
                    "step %d: non-finite %s; skipping this update", step + 1, ", ".join(bad) or "loss on another process"
                )
            grad_norm = None
            if finite:
                stepped, grad_norm = optimizer_step(run, step)
                # Host-device sync (a gather of the shards' norms under FSDP2): AdamW cannot be undone, so
                # weights made NaN/inf stop the run and are never saved.
                if stepped and not weights_finite(trainable):
                    logger.error("step %d: the update made the LoRA weights NaN/inf; stopping without saving them", step + 1)
                    reason = "nonfinite_weights"
                    break
                # An fp16 overflow that the gradient scaler skipped is routine (it lowers its scale): the step
                # counts, as in diffusers' and transformers' trainers, and is no non-finite failure.
                finite = stepped or acc.optimizer_step_was_skipped
            run.optimizer.zero_grad(set_to_none=True)
            if not finite:
                bad_streak += 1
                if bad_streak >= cfg.train.max_nonfinite_steps:
                    reason = "nonfinite"
                    break
                continue  # the same step number is retried with the next batch
            bad_streak = 0
            step += 1
            host = {
                "step": step,
                "lr": run.lr_scheduler.get_last_lr()[0],  # a host float: no sync
                "grad_norm": grad_norm if grad_norm is not None else 0.0,
                # On a GPU this is the host's time; the finiteness check and the norm above wait for the kernels.
                "step_time_s": time.perf_counter() - t0,
            }
            pending.append((host, names, terms.detach()))
            progress.update(1)
            if step % cfg.logging.log_every == 0:
                flush()
                acc.log({k: v for k, v in run.history[-1].items() if k != "step"}, step=step)

            # Collective (one all-reduce per update with several processes): a signal may reach only some
            # processes, and all must save (and stop) together.
            signalled = _any_process(acc, stop.requested is not None)
            if signalled or step == pause_at:
                save(step)
                reason = "signal" if signalled else "paused"
                break
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < cfg.train.max_steps:
                save(step)
            v_every = cfg.validation.every_steps
            if v_every > 0 and step % v_every == 0 and step < cfg.train.max_steps:
                validate(run, step)
    flush()
    progress.close()
    run.start_step = step
    return reason


def optimizer_step(run: Run, step: int) -> tuple[bool, float | None]:
    """Apply one update from the accumulated gradients: clip, guard, step. Returns ``(stepped, grad_norm)``.

    ``grad_norm`` is the total norm of the *unscaled* gradients of the prepared model's trainable
    parameters (whatever their sharding), or None when it is NaN/inf. Without a gradient scaler a NaN/inf
    norm skips the update (logged; the caller counts it toward ``train.max_nonfinite_steps``). Under fp16
    accelerate's GradScaler decides instead: ``optimizer.step()`` is always called, the scaler skips it on
    an overflow and lowers its scale, and ``accelerator.optimizer_step_was_skipped`` tells the caller.
    The LR schedule advances only with an update.
    """
    cfg, acc = run.cfg, run.accelerator
    # From the prepared model: under FSDP2 these are the sharded parameters that hold the gradients.
    params = [p for p in run.transformer.parameters() if p.requires_grad]
    if cfg.train.max_grad_norm > 0:
        # Unscales the gradients first under fp16; the norm is the global one across shards (a collective
        # under FSDP2). Clipping with a NaN/inf norm is harmless: the update is skipped below.
        gnorm = acc.clip_grad_norm_(params, cfg.train.max_grad_norm)
    else:
        acc.unscale_gradients()  # fp16 only (else a no-op): the norm and the check see the true gradients
        grads = [p.grad for p in params if p.grad is not None]
        gnorm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())  # fused (foreach) norm
    if hasattr(gnorm, "full_tensor"):  # DTensor shards (FSDP2): a collective that combines the shards' norms
        gnorm = gnorm.full_tensor()
    if gnorm is None:  # DeepSpeed clips inside its engine and reports the norm only after its step
        run.optimizer.step()
        run.lr_scheduler.step()
        return True, None
    # Host-device sync, once per update: the skip decision (and the log) need the norm on the host.
    norm = float(gnorm)
    if acc.scaler is not None:
        run.optimizer.step()  # the scaler's step: skipped on inf/NaN (found while unscaling), scale updated
        if acc.optimizer_step_was_skipped:
            # get_scale() is a host-device sync; only on the (rare) skipped updates.
            logger.info("step %d: fp16 gradient overflow; the gradient scaler skipped this update and lowered its "
                        "scale to %g", step + 1, acc.scaler.get_scale())
            return False, None
        run.lr_scheduler.step()
        return True, norm
    if not math.isfinite(norm):
        logger.warning("step %d: non-finite gradient in %s; skipping this update", step + 1, _nonfinite_grad_names(run))
        return False, None
    run.optimizer.step()
    run.lr_scheduler.step()
    return True, norm


def _nonfinite_grad_names(run: Run, limit: int = 3) -> str:
    """Names of the first LoRA parameters whose gradient holds a NaN/inf (for the warning).

    Only this process's shard of a sharded (DTensor) gradient is looked at: no collective on this path.
    """
    names = [
        n for n, p in run.accelerator.unwrap_model(run.transformer).named_parameters()
        if p.grad is not None and not torch.isfinite(getattr(p.grad, "to_local", lambda: p.grad)()).all()
    ]
    shown = ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
    return shown or "the gradient on another process"


def _all_finite(acc: Any, terms: torch.Tensor) -> bool:
    """True if every logged term is finite on every process: one fused reduction on the device, one all-reduce
    with several processes, and one host-device sync (``.item()``) for the decision."""
    bad = (~torch.isfinite(terms)).any().float().reshape(1)
    if acc.num_processes > 1:
        bad = acc.reduce(bad, reduction="sum")
    return not bool(bad.item())


def _any_process(acc: Any, flag: bool) -> bool:
    """True if ``flag`` is true on any process (all processes must skip an update together under DDP)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def save_checkpoint(run: Run, step: int) -> Path:
    """Atomically write ``checkpoint-<step>`` (see ``kontext.training.checkpoint``), on every process as accelerate needs."""
    from kontext.training.checkpoint import finalize, schedule_of, temp_path

    acc = run.accelerator
    tmp = temp_path(run.output_dir, step)
    final = run.output_dir / f"checkpoint-{step}"
    acc.wait_for_everyone()
    # Two agreements (all-reduces), on every rank whatever happened locally: a write that fails on one rank (a
    # full disk is often one node's) stops every rank together, none is left waiting at a barrier.
    failure = _try_save(lambda: acc.save_state(str(tmp)))  # each process writes its RNG state, the main one the rest
    _stop_if_any_failed(run, failure, tmp, step)
    if acc.is_main_process:
        state = {
            "step": step,
            "data": run.sampler.state_dict(consumed=run.data_state["position"]) | {"epoch": run.data_state["epoch"]},
            "lora": _lora_shape(run.cfg),
            "schedule": schedule_of(run.cfg.train),
            "history": run.history,
            "num_processes": acc.num_processes,
        }
        failure = _try_save(lambda: finalize(run.output_dir, step, state, run.cfg.checkpoint.total_limit))
        if failure is None:
            logger.info("saved %s", final)
    _stop_if_any_failed(run, failure, tmp, step)
    return final


def _try_save(write: Callable[[], Any]) -> Exception | None:
    """Run ``write``; the error it raised (torch and safetensors report a full disk as a RuntimeError), or None."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        return e
    return None


def _stop_if_any_failed(run: Run, failure: Exception | None, tmp: Path, step: int) -> None:
    """Raise on every rank if the checkpoint write failed on any (one all-reduce); the partial folder is removed."""
    from kontext.training.checkpoint import CheckpointWriteError, save_failure_message

    if not _any_process(run.accelerator, failure is not None):
        return
    what = f"checkpoint-{step}"
    if failure is None:  # this rank's part was fine; another's was not
        failure = CheckpointWriteError("another process could not write its part")
    message = save_failure_message(failure, run.output_dir, [tmp], what)
    if message is None:
        raise failure
    raise UserError(message) from None


# ---------------------------------------------------------------------------------------------
# Finish: export, validation, model card
# ---------------------------------------------------------------------------------------------


def validate(run: Run, step: int) -> dict[str, float]:
    """Generate for fixed samples with the current LoRA; write a grid PNG and log mask metrics (main process)."""
    acc = run.accelerator
    metrics: dict[str, float] = {}
    if acc.is_main_process:
        from kontext.training.validation import run_validation

        transformer = acc.unwrap_model(run.transformer)
        was_training = transformer.training
        transformer.eval()
        try:
            data = run.validation_dataset if run.validation_dataset is not None else run.dataset
            metrics = run_validation(run.pipe, transformer, data, run.cfg, step, run.output_dir, acc)
        finally:
            transformer.train(was_training)
    acc.wait_for_everyone()
    return metrics


def finish(run: Run, reason: str) -> None:
    """Export the LoRA (and the ComfyUI file), validate once more, write the model card; release the output folder."""
    from kontext.training.checkpoint import save_failure_message
    from kontext.training.output_dir import unlock_output_dir

    cfg, acc = run.cfg, run.accelerator
    if reason in ("paused", "signal"):
        acc.end_training()
        unlock_output_dir(run.output_dir)
        if reason == "signal":
            acc.print(
                f"Stopped by signal at step {run.start_step}; checkpoint saved. Resume with:\n"
                f"  accelerate launch train_kontext_lora.py --config {run.output_dir / 'config.yaml'} "
                "checkpoint.resume_from=latest"
            )
        return
    if reason in ("nonfinite", "nonfinite_weights"):
        acc.end_training()
        unlock_output_dir(run.output_dir)
        last = _last_checkpoint_name(run)
        what = f"{cfg.train.max_nonfinite_steps} consecutive updates had a NaN/inf loss or gradient (see the warnings above for the term)"
        raise UserError(
            f"{what if reason == 'nonfinite' else 'An update made the LoRA weights NaN/inf (they were not saved)'}; "
            f"stopped at step {run.start_step}. Last good checkpoint: {last}. Lower "
            "train.learning_rate, check the data, or use model.dtype=float32 / train.mixed_precision=no."
        )
    if cfg.checkpoint.every_steps and not (run.output_dir / f"checkpoint-{run.start_step}").is_dir():
        # A final checkpoint lets a finished run be extended (resume_from=latest with a larger max_steps).
        save_checkpoint(run, run.start_step)
    acc.wait_for_everyone()
    metrics: dict[str, float] = {}
    if cfg.validation.every_steps >= 0:
        metrics = validate(run, run.start_step)
    transformer = acc.unwrap_model(run.transformer)
    check_replicas_agree(acc, transformer)
    try:
        path = export_lora(
            acc, transformer, run.output_dir, DTYPES[cfg.export.save_dtype], cfg.model.pretrained_model_name_or_path
        )
    except (OSError, RuntimeError) as e:  # a half-written final LoRA must not look like a finished run
        message = save_failure_message(e, run.output_dir, [run.output_dir / FINISHED_MARKER], "the final LoRA")
        if message is None:
            raise
        raise UserError(message) from None
    if acc.is_main_process:
        if cfg.export.comfyui:
            from kontext.tools.comfyui import export_comfyui

            export_comfyui(path, transformer_config=transformer.config)
        (run.output_dir / "training_history.json").write_text(json.dumps(run.history, indent=1), encoding="utf-8")
        from kontext.tools.model_card import write_model_card

        write_model_card(run.output_dir, cfg, metrics, run.history)
        acc.print(f"Done: {path}")
        acc.print(_summary(run, metrics))
    acc.wait_for_everyone()
    acc.end_training()
    unlock_output_dir(run.output_dir)


def _summary(run: Run, metrics: dict[str, float]) -> str:
    """The end-of-run summary (``kontext.training.summary.run_summary``) for a finished run."""
    from kontext.training.summary import run_summary
    from kontext.training.validation import held_out

    out, cfg = run.output_dir, run.cfg
    names = [FINISHED_MARKER, "lora_comfyui.safetensors", "README.md", "config.yaml", "training_history.json"]
    files = [n for n in names if (out / n).is_file()]
    ckpts = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]) if p.name.split("-")[1].isdigit() else -1)
    if ckpts:
        files.append(f"{ckpts[-1].name}/ (last checkpoint)")
    if (out / "validation").is_dir():
        files.append("validation/ (grids)")
    started = _RUN_CLOCK.get("start")
    return run_summary(
        steps=run.start_step,
        wall_seconds=time.perf_counter() - started if started is not None else sum(h.get("step_time_s", 0.0) for h in run.history),
        history=run.history,
        metrics=metrics,
        output_dir=out,
        files=files,
        base_model=cfg.model.pretrained_model_name_or_path,
        can_resume=bool(ckpts),
        launcher="accelerate launch" if _launched_by_accelerate() else "python",
        validated_on="held-out" if held_out(cfg) else "training",
    )


def _last_checkpoint_name(run: Run) -> str:
    from kontext.training.checkpoint import newest_intact

    good = newest_intact(run.output_dir)  # verified: complete files and finite weights
    return str(good) if good is not None else "none (set checkpoint.every_steps)"


def run_training(cfg: Config) -> Run:
    """setup -> train -> finish; returns the finished :class:`Run` (used by tests and notebooks)."""
    run = setup(cfg)
    reason = train(run)
    finish(run, reason)
    run.stop_reason = reason
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a FLUX.1 Kontext product-insertion LoRA with mask-geometry losses.",
        epilog="Example: accelerate launch train_kontext_lora.py --config configs/example_tiny.yaml train.max_steps=20",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and docs/config.md).")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def _error_text(e: Exception) -> str:
    """The user-error message as ``main`` writes it last: plain, or framed under ``accelerate launch``.

    accelerate answers a non-zero exit with its own ``CalledProcessError`` traceback, printed after the
    script has ended, so there the message is set off by a rule and a pointer; the error stays the last line.
    """
    from kontext.training.output_dir import is_main_launch_process

    if not _launched_by_accelerate() or not is_main_launch_process():
        return f"error: {e}\n"
    return (
        f"\n{'=' * 72}\n"
        "The run stopped on the error below. The CalledProcessError traceback that accelerate prints after it only "
        "says that this script exited with status 2.\n"
        f"error: {e}\n"
    )


def main(argv: list[str] | None = None) -> int:
    from kontext.training.output_dir import unlock_all

    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_training(cfg)
    except (ConfigError, UserError) as e:
        sys.stderr.write(_error_text(e))
        sys.stderr.flush()
        return 2
    finally:
        unlock_all()  # a refused run removes the lock file it made (a killed one's lock dies with it)
    return 0


if __name__ == "__main__":
    set_cpu_threads()
    sys.exit(main())
