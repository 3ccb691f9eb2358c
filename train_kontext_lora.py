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
import gc
import json
import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from data.dataset import TrainBatch
from data.errors import WriteError, first_names, write_text_atomic
from data.synthetic import generate_dataset
from kontext.errors import UserError
from kontext.export.comfyui import export_comfyui
from kontext.export.model_card import write_model_card
from kontext.runtime.dtypes import DTYPES
from kontext.runtime.flux import predict_velocity
from kontext.runtime.lora import attach_lora, make_lora_config
from kontext.runtime.lora_io import (
    LORA_WEIGHTS_NAME,
    check_replicas_agree,
    register_checkpoint_hooks,
    save_lora,
    unwrapped,
)
from kontext.runtime.model_path import base_model_identity, text_length_warning
from kontext.runtime.pipeline import load_pipeline
from kontext.tiny.model import resolve_model_path
from kontext.training import inputs
from kontext.training.checkpoint import (
    finalize,
    lora_shape,
    newest_intact,
    remove_incomplete,
    remove_previous_run,
    schedule_of,
    stop_if_any_failed,
    temp_path,
    try_write,
    weights_finite,
)
from kontext.training.config import (
    Config,
    LossConfig,
    OnPolicyConfig,
    TrainConfig,
    dump_config,
    flat_config,
    load_config,
)
from kontext.training.distributed import all_finite, any_process, main_process_first
from kontext.training.launch import (
    cpu_only_multiprocess,
    error_text,
    is_main_launch_process,
    set_cpu_threads,
    setup_logging,
    stderr_to_stdout_under_accelerate,
)
from kontext.training.optim import check_optional_features, make_optimizer
from kontext.training.output_dir import lock_output_dir, open_output_dir, unlock_all, unlock_output_dir
from kontext.training.resume import ResumePoint, check_base_model, data_sampler, open_resume, restore
from kontext.training.signals import Stopped, StopRequest, busy, uninterrupted
from kontext.training.summary import finished_run_summary
from kontext.training.validation import run_validation, validation_dataset
from losses import geometry_loss, noise_level_weight
from losses import flow_matching as fm

logger = logging.getLogger("kontext_lora")


# ---------------------------------------------------------------------------------------------
# The training step: rectified flow as FLUX uses it, then geometry losses on the predicted x0.
# ---------------------------------------------------------------------------------------------


def compute_loss(
    transformer: torch.nn.Module,
    batch: TrainBatch,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    guidance_scale: float,
    generator: torch.Generator,
    train_scheduler: Any,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch's loss.

    ``batch`` (a ``data.dataset.TrainBatch``) holds ``target_latents`` / ``context_latents`` (hinted, the
    conditioning) / ``scene_latents`` (un-hinted, what the geometry terms compare with) ``[B, 16, h, w]``,
    ``prompt_embeds [B, L, D]``, ``pooled_prompt_embeds [B, Dp]`` and ``geometry`` (a ``losses.MaskTargets``
    ``[B, 1, h, w]`` each). ``loss_cfg`` is the config's ``loss`` section, ``train_cfg`` its ``train`` section
    (timestep sampling and weighting), ``guidance_scale`` the model's guidance embedding value.
    ``train_scheduler`` is the base model's ``FlowMatchEulerDiscreteScheduler`` before ``set_timesteps``
    (its training table of timesteps and sigmas). Noise is drawn first, then ``u``, from ``generator``
    (:func:`losses.flow_matching.flow_step`), then the on-policy draws.
    Returns the total loss (float32 scalar) and its detached components for logging.
    """
    context = batch.context_latents
    bsz = batch.target_latents.shape[0]
    device = batch.target_latents.device
    model_dtype = batch.target_latents.dtype
    step = fm.flow_step(
        batch.target_latents,
        generator,
        train_scheduler,
        train_cfg.weighting_scheme,
        train_cfg.logit_mean,
        train_cfg.logit_std,
        train_cfg.mode_scale,
        train_cfg.resolution_shift,
    )
    geometry, on_policy_cfg = loss_cfg.geometry, loss_cfg.on_policy
    # Drawn after the flow's noise and timesteps, so that turning on-policy on leaves those unchanged.
    on_policy = (
        geometry.enabled
        and on_policy_cfg.enabled
        and float(torch.rand((), generator=generator)) < on_policy_cfg.fraction
    )
    embeds, pooled = batch.prompt_embeds, batch.pooled_prompt_embeds
    if on_policy:
        # The model's own sample at a noise level where the extent is being set, and one prediction from it with
        # gradient, in the same forward as the teacher-forced one (one forward per backward, as DDP requires).
        x_s, sigma_s = on_policy_rollout(
            transformer, batch, on_policy_cfg, guidance_scale, generator, train_scheduler.config
        )
        v_both = predict_velocity(
            transformer,
            torch.cat([step.x_t, x_s]).to(model_dtype),
            torch.cat([context, context]),
            torch.cat([step.model_timesteps, sigma_s.expand(bsz).to(device)]),
            torch.cat([embeds, embeds]),
            torch.cat([pooled, pooled]),
            guidance_scale,
        ).float()
        v_pred, v_s = v_both[:bsz], v_both[bsz:]
    else:
        v_pred = predict_velocity(
            transformer, step.x_t.to(model_dtype), context, step.model_timesteps, embeds, pooled, guidance_scale
        )
    # Losses in float32 whatever the model's dtype.
    v_pred = v_pred.float()
    mask_weight = None
    if loss_cfg.masked.enabled:
        mask_weight = fm.masked_flow_weight(batch.geometry.mask, loss_cfg.masked.unmasked_weight)
    base = step.loss(v_pred, mask_weight)
    logs: dict[str, torch.Tensor] = {"loss/flow": base.detach()}
    total = base

    if geometry.enabled:
        # The clean latents the velocity implies; the geometry terms judge them against target and context.
        if on_policy:
            z_pred = fm.predicted_clean_latents(x_s, v_s, sigma_s.expand(bsz).to(device))
            sample_weights, scale = None, on_policy_cfg.weight
        else:
            z_pred = step.predicted_clean_latents(v_pred)
            sample_weights, scale = noise_level_weight(step.sigmas, geometry.noise_weighting), 1.0
        # "What did the model change" is asked against the un-hinted scene, not the grey-filled context.
        geometry_total, parts = geometry_loss(
            z_pred,
            step.x0,
            batch.scene_latents.float(),
            batch.geometry,
            geometry.loss_weights(),
            w_in=geometry.w_in,
            w_band=geometry.w_band,
            w_out=geometry.w_out,
            k_sigma=geometry.k_sigma,
            formulation=geometry.formulation,
            temperature=geometry.temperature,
            sample_weights=sample_weights,
        )
        geometry_total = scale * geometry_total
        total = total + geometry.weight * geometry_total
        logs["loss/geometry"] = geometry_total.detach()
        logs.update({f"loss/{k}": v.detach() for k, v in parts.items()})
    logs["loss/total"] = total.detach()
    return total, logs


@torch.no_grad()
def on_policy_rollout(
    transformer: torch.nn.Module,
    batch: TrainBatch,
    on_policy_cfg: OnPolicyConfig,
    guidance_scale: float,
    generator: torch.Generator,
    scheduler_config: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own sample part-way down the sampler: ``(x_s [B, 16, h, w] float32, sigma_s scalar tensor)``.

    Draws ``sigma_stop`` uniformly in ``[sigma_min, sigma_max]`` of ``on_policy_cfg`` (the config's
    ``loss.on_policy``) and fresh noise from ``generator``, then takes Euler steps with the current LoRA along
    the pipeline's schedule of ``sampler_steps`` steps (:func:`losses.flow_matching.sampling_sigmas`) until the
    first schedule sigma at or below ``sigma_stop`` (at most to the last non-zero one).
    No gradient flows through the rollout (DRaFT-1 / ReFL): only the prediction made from ``x_s`` is trained.
    """
    x0, context = batch.target_latents, batch.context_latents
    b, _, h, w = x0.shape
    sampler_steps = on_policy_cfg.sampler_steps
    sigmas = fm.sampling_sigmas(sampler_steps, (h // 2) * (w // 2), scheduler_config)
    low, high = on_policy_cfg.sigma_min, on_policy_cfg.sigma_max
    stop = low + (high - low) * float(torch.rand((), generator=generator))
    # The schedule falls from 1 to 0: sigmas[steps] is the first at or below the stop, and never the final 0 (a
    # prediction at sigma 0 is the sample itself, with nothing to train).
    steps = min(int((sigmas > stop).sum()), sampler_steps - 1)
    x = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    for i in range(steps):
        t = sigmas[i].expand(b).to(x0.device)
        v = predict_velocity(
            transformer, x.to(x0.dtype), context, t, batch.prompt_embeds, batch.pooled_prompt_embeds, guidance_scale
        )
        x = fm.euler_step(x, v.float(), sigmas[i], sigmas[i + 1])
    return x, sigmas[steps]


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
    stop_reason: str = ""  # a StopReason once finished
    validation_dataset: Any = None  # held-out samples (validation.data_root / holdout); None: the training ones

    def batches(self) -> Iterator[TrainBatch]:
        """The micro-batch stream from the run's data position, on the training device in the model's dtype
        (geometry targets float32). The position advances as batches are handed out (``inputs.batches``)."""
        cfg = self.cfg
        # The un-hinted scene is read only by the geometry terms: without them it is not encoded.
        stream = inputs.batches(
            self.dataset, self.sampler, self.data_state, self.encode_images, cfg.loss.geometry.enabled,
            inputs.use_prefetch(cfg.data.prefetch, self.accelerator.device),
        )
        for batch in stream:
            yield batch.to(self.accelerator.device, DTYPES[cfg.model.dtype])


def setup(cfg: Config) -> Run:
    """Config -> a ready-to-train :class:`Run`, as a recipe: the output folder, the checkpoint to resume and the inputs
    are checked before any model loads, nothing is written before those checks, and ``config.yaml`` only once a
    resume has loaded."""
    output_dir, checkpoint = open_output_dir(cfg, main=is_main_launch_process())
    resume = open_resume(checkpoint, cfg)  # another LoRA shape or optimiser is refused before any model loads
    check_optional_features(cfg)
    accelerator = _setup_accelerator(cfg, output_dir)
    set_seed(cfg.train.seed)
    source, val_source, sampler = _check_data(cfg, accelerator, resume)
    if accelerator.is_main_process:  # a new folder is created (and locked) only now, after the input checks
        lock_output_dir(output_dir, main=True, create=True)
    model_path = _resolve_base_model(cfg, accelerator, resume)
    if accelerator.is_main_process:
        remove_incomplete(output_dir)
    pipe, lora_params, encoders_device = _setup_model(cfg, accelerator, model_path)
    dataset, val_data = _setup_data(cfg, source, val_source, pipe, accelerator, encoders_device)
    transformer, optimizer, lr_scheduler = _setup_optimizer(cfg, accelerator, pipe.transformer, lora_params)
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
        # Training sigmas come from the scheduler's un-shifted training table, as diffusers' Kontext script.
        train_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
        encoders_device=encoders_device,
        encode_images=None
        if cfg.data.cache_latents
        else inputs.image_encoder(pipe, encoders_device, to_cpu=False, max_images=cfg.data.cache_batch_size),
        validation_dataset=val_data,
    )
    if resume is not None:
        _load_checkpoint(run, resume)
    if accelerator.is_main_process:
        # Only now: a resume that fails on the way (another model, optimiser or architecture) leaves the config.yaml
        # that its printed resume command names as it was, and a failed overwrite leaves the old run whole. A stop
        # takes effect after both, never between them.
        with uninterrupted():
            if cfg.checkpoint.overwrite_output_dir and resume is None:
                remove_previous_run(output_dir)  # never resumed into this run, never beside it
            dump_config(cfg, output_dir / "config.yaml")
        if cfg.logging.report_to != "none":
            accelerator.init_trackers(cfg.logging.project_name, config=flat_config(cfg))
    _log_cpu_threads(cfg, accelerator.device)
    _log_compilation(accelerator)
    return run


def _setup_accelerator(cfg: Config, output_dir: Path) -> Accelerator:
    """The run's ``Accelerator`` (its mixed precision recorded in ``cfg``) and the logging of each process."""
    accelerator = Accelerator(
        cpu=cpu_only_multiprocess(),
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
    setup_logging(accelerator)
    return accelerator


def _check_data(cfg: Config, accelerator: Accelerator, resume: ResumePoint | None) -> tuple[Any, Any, Any]:
    """The training source, the held-out validation source (or None) and the run's batch sampler, all checked
    before any model loads: every sample, batches that fit the data, and a resumed data position that fits them
    (checked once, on the sampler that training then draws from)."""
    if cfg.data.synthetic.enabled:  # the embedded default's data, generated once by the main process
        main_process_first(accelerator, lambda: _generate_synthetic(cfg), everyone=False)
    source, val_source = inputs.open_sources(cfg)
    sampler = data_sampler(source, cfg, accelerator.num_processes, accelerator.process_index, resume)
    return source, val_source, sampler


def _generate_synthetic(cfg: Config) -> None:
    synthetic = cfg.data.synthetic
    try:
        generate_dataset(
            cfg.data.root, num_samples=synthetic.num_samples, size=(synthetic.size, synthetic.size), seed=synthetic.seed
        )
    except FileExistsError as e:  # a folder of real data: nothing was written, say so in one message
        raise UserError(f"data.synthetic.enabled is true, but data.root {e}.") from None


def _resolve_base_model(cfg: Config, accelerator: Accelerator, resume: ResumePoint | None) -> str:
    """The base model's path (``tiny`` -> the committed tiny model, a folder -> absolute, a hub id unchanged),
    recorded in ``cfg``; a resumed checkpoint must have been trained on the same base (checked before it loads)."""
    model_path = main_process_first(accelerator, lambda: resolve_model_path(cfg.model.pretrained_model_name_or_path))
    cfg.model.pretrained_model_name_or_path = model_path
    if resume is not None:
        check_base_model(resume.checkpoint, resume.state, base_model_identity(model_path, cfg.model.revision),
                         cfg.checkpoint.allow_other_base)
    if accelerator.is_main_process and (warning := text_length_warning(model_path, cfg.model.max_sequence_length)):
        logger.warning(warning)
    return model_path


def _setup_model(
    cfg: Config, accelerator: Accelerator, model_path: str
) -> tuple[Any, list[torch.nn.Parameter], torch.device]:
    """The frozen pipeline on its devices, with a fresh LoRA on its transformer (seeded by ``train.seed``).
    Returns ``(pipe, LoRA parameters, the encoders' device)``."""
    model_cfg = cfg.model
    pipe = load_pipeline(model_path, DTYPES[model_cfg.dtype], revision=model_cfg.revision, variant=model_cfg.variant,
                         quantization=model_cfg.quantization)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        getattr(pipe, name).requires_grad_(False).eval()
    encoders_device = torch.device("cpu") if model_cfg.offload_encoders else accelerator.device
    if model_cfg.quantization == "none":
        pipe.transformer.to(accelerator.device)
    pipe.vae.to(encoders_device)
    pipe.text_encoder.to(encoders_device)
    pipe.text_encoder_2.to(encoders_device)

    lora_cfg = cfg.lora
    torch.manual_seed(cfg.train.seed)  # LoRA init is part of the run's seed
    try:
        lora_params = attach_lora(
            pipe.transformer,
            make_lora_config(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, lora_cfg.init, lora_cfg.target_modules),
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    if model_cfg.gradient_checkpointing:
        pipe.transformer.enable_gradient_checkpointing()
    pipe.transformer.train()
    return pipe, lora_params, encoders_device


def _setup_data(
    cfg: Config, source: Any, val_source: Any, pipe: Any, accelerator: Accelerator, encoders_device: torch.device
) -> tuple[Any, Any]:
    """The training dataset with every prompt encoded (and, cached, every sample's latents) and the held-out
    validation dataset (or None); CLIP and T5 are freed once every prompt either needs is encoded."""
    dataset = inputs.build_dataset(cfg, source, pipe, accelerator, encoders_device)
    val_data = validation_dataset(cfg, val_source) if val_source is not None else None
    # Validation's prompts are known now: encode the held-out ones, then free CLIP and T5.
    shown = min(cfg.validation.num_samples, len(val_data)) if val_data else 0
    val_prompts = [val_data.prompt_of(i) for i in range(shown)]
    inputs.free_text_encoders(pipe, dataset, inputs.prompt_table(pipe, cfg, val_prompts, encoders_device))
    return dataset, val_data


def _setup_optimizer(
    cfg: Config, accelerator: Accelerator, transformer: torch.nn.Module, lora_params: list[torch.nn.Parameter]
) -> tuple[torch.nn.Module, Any, Any]:
    """The optimiser over the LoRA and its LR schedule, prepared with the transformer by accelerate (whose
    checkpoints then hold only the LoRA). Returns the prepared ``(transformer, optimizer, lr_scheduler)``."""
    optimizer = make_optimizer(cfg, lora_params)
    lr_scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    register_checkpoint_hooks(accelerator, transformer)
    return transformer, optimizer, lr_scheduler


def _load_checkpoint(run: Run, resume: ResumePoint) -> None:
    """Continue from ``resume``: the LoRA, optimiser, LR schedule (with this run's learning-rate settings) and RNG
    states, then the step, the data position (checked against the run's sampler in :func:`_check_data`) and the
    history."""
    run.start_step, run.data_state, run.history = restore(run.accelerator, run.lr_scheduler, resume, run.cfg.train)
    run.accelerator.print(f"Resumed from {resume.checkpoint} at step {run.start_step}.")


def _log_cpu_threads(cfg: Config, device: torch.device) -> None:
    if device.type == "cpu":
        prefetch = inputs.use_prefetch(cfg.data.prefetch, device)
        logger.info(
            "Training on the CPU with %d intra-op thread%s per process; the next batch is prepared %s.",
            torch.get_num_threads(), "" if torch.get_num_threads() == 1 else "s",
            "in a background thread" if prefetch else "between steps (data.prefetch)",
        )


def _log_compilation(accelerator: Accelerator) -> None:
    """Say so when the launcher compiles the transformer (``--dynamo_backend``): the first steps then take minutes."""
    plugin = accelerator.state.dynamo_plugin
    backend = str(getattr(plugin.backend, "value", plugin.backend)).lower()
    if backend != "no":
        logger.info(
            "The launcher compiles the transformer (torch.compile, backend %s%s): the first step includes the "
            "compilation, and a new image size (another aspect bucket) may compile again. Validation runs uncompiled.",
            backend, ", by region" if plugin.use_regional_compilation else "",
        )


# ---------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------


class StopReason(str, Enum):
    """Why :func:`train` stopped (a ``str``: ``run.stop_reason == "done"`` holds)."""

    DONE = "done"  # train.max_steps reached
    SIGNAL = "signal"  # a stop signal: checkpoint saved, the run can be resumed
    NONFINITE = "nonfinite"  # train.max_nonfinite_steps updates in a row had a NaN/inf loss or gradient
    NONFINITE_WEIGHTS = "nonfinite_weights"  # an update made the LoRA weights NaN/inf (never saved)
    PAUSED = "paused"  # ``pause_at`` reached: checkpoint saved, as a pre-emption would

    def __str__(self) -> str:
        return self.value


class Update(Enum):
    """What became of one optimiser update."""

    APPLIED = "applied"
    SKIPPED_OVERFLOW = "skipped_overflow"  # fp16: the gradient scaler skipped it and lowered its scale; it counts
    SKIPPED_NONFINITE = "skipped_nonfinite"  # a NaN/inf loss or gradient: discarded, the step number is retried
    NONFINITE_WEIGHTS = "nonfinite_weights"  # it made the LoRA weights NaN/inf: the run stops without saving them


def _step_generator(run: Run, step: int, micro: int) -> torch.Generator:
    """Noise and timesteps of (step, micro-batch, rank) come from their own seeded generator.

    Seeding per step (instead of drawing from one global stream) makes a resumed run draw exactly the
    numbers the uninterrupted run drew, independent of anything else that consumed randomness.
    """
    acc = run.accelerator
    seed = (run.cfg.train.seed * 1_000_003 + step * 1009 + micro * 31 + acc.process_index) % (2**63 - 1)
    return torch.Generator(device="cpu").manual_seed(seed)


def train(run: Run, pause_at: int | None = None) -> StopReason:
    """The optimisation loop: accumulate, check, update, log, save. Returns why it stopped (:class:`StopReason`).

    ``pause_at``: stop after that many updates with a checkpoint, as a pre-emption would (used to test
    that a resumed run is the same run).
    """
    cfg, acc = run.cfg, run.accelerator
    batches = run.batches()
    step = run.start_step
    nonfinite_streak = 0
    # From the prepared model: FSDP2 replaces the parameters with sharded ones (run.lora_params predates prepare).
    trainable = [p for p in run.transformer.parameters() if p.requires_grad]
    log = TermLog(run, initial_step=step)
    reason = StopReason.DONE
    with StopRequest() as stop:
        while step < cfg.train.max_steps:
            started = time.perf_counter()
            names, terms = _accumulate_gradients(run, batches, step)
            update, grad_norm = _apply_update(run, step, names, terms, trainable)
            if update is Update.NONFINITE_WEIGHTS:
                reason = StopReason.NONFINITE_WEIGHTS
                break
            run.optimizer.zero_grad(set_to_none=True)
            if update is Update.SKIPPED_NONFINITE:
                nonfinite_streak += 1
                if nonfinite_streak >= cfg.train.max_nonfinite_steps:
                    reason = StopReason.NONFINITE
                    break
                continue  # the same step number is retried with the next batch
            nonfinite_streak = 0
            step += 1
            # On a GPU this is the host's time; the finiteness check and the norm wait for the kernels.
            log.add(step, names, terms, grad_norm, time.perf_counter() - started)
            if step % cfg.logging.log_every == 0:
                log.flush()
                acc.log({k: v for k, v in run.history[-1].items() if k != "step"}, step=step)

            # Collective (one all-reduce per update with several processes): a signal may reach only some
            # processes, and all must save (and stop) together.
            signalled = any_process(acc, stop.requested is not None)
            if signalled or step == pause_at:
                log.flush()  # the checkpoint records the whole history
                save_checkpoint(run, step)
                reason = StopReason.SIGNAL if signalled else StopReason.PAUSED
                break
            if _due(step, cfg.checkpoint.every_steps, cfg.train.max_steps):
                log.flush()
                save_checkpoint(run, step)
            if _due(step, cfg.validation.every_steps, cfg.train.max_steps):
                validate(run, step)
    log.close()
    run.start_step = step
    return reason


def _due(step: int, every: int, max_steps: int) -> bool:
    """A periodic save or validation is due at ``step`` (the final step has its own, in :func:`finish`)."""
    return every > 0 and step % every == 0 and step < max_steps


def _accumulate_gradients(run: Run, batches: Iterator[TrainBatch], step: int) -> tuple[list[str], torch.Tensor]:
    """Forward and backward over ``train.gradient_accumulation_steps`` micro-batches; the gradients are summed in
    the LoRA's ``.grad`` (each loss divided by the count). Returns the logged terms' names and their values averaged
    over the micro-batches, on the device (a NaN/inf loss gives NaN/inf gradients: :func:`_apply_update` discards
    them)."""
    cfg, acc = run.cfg, run.accelerator
    accum = cfg.train.gradient_accumulation_steps
    terms: torch.Tensor | None = None
    names: list[str] = []
    for micro in range(accum):
        batch = next(batches)
        # LoRA dropout draws from the global stream: pin it to the step, and to the rank so that the ranks draw
        # different masks (rank 0 keeps the single-process stream). The CPU generator keeps only a seed's low
        # 32 bits, so the rank's share must change those.
        torch.manual_seed(cfg.train.seed + 7919 * step + micro + 1_000_003 * acc.process_index)
        generator = _step_generator(run, step, micro)
        last = micro == accum - 1
        # Gradients are all-reduced only with the last micro-batch's backward.
        with acc.no_sync(run.transformer) if not last else contextlib.nullcontext():
            with acc.autocast():
                loss, logs = compute_loss(
                    run.transformer, batch, cfg.loss, cfg.train, cfg.model.guidance_scale, generator, run.train_scheduler
                )
            acc.backward(loss / accum)
        names = list(logs)
        row = torch.stack([v.float() for v in logs.values()]) / accum
        terms = row if terms is None else terms + row
    return names, terms


def _apply_update(
    run: Run, step: int, names: list[str], terms: torch.Tensor, trainable: list[torch.nn.Parameter]
) -> tuple[Update, float | None]:
    """Check the accumulated terms, then apply the update (:func:`optimizer_step`) and check the weights it made.
    Returns the update's outcome and the gradient norm (None when there is none to log)."""
    # One fused check per update: a host-device sync (and, with several processes, one all-reduce, so that all
    # ranks skip together).
    if not all_finite(run.accelerator, terms):
        bad = [n for n, v in zip(names, terms.tolist()) if not math.isfinite(v)]  # failure path only
        logger.warning(
            "step %d: non-finite %s; skipping this update", step + 1, ", ".join(bad) or "loss on another process"
        )
        return Update.SKIPPED_NONFINITE, None
    stepped, grad_norm = optimizer_step(run, step, trainable)
    # Host-device sync (a gather of the shards' norms under FSDP2): AdamW cannot be undone, so weights made NaN/inf
    # stop the run and are never saved.
    if stepped and not weights_finite(trainable):
        logger.error("step %d: the update made the LoRA weights NaN/inf; stopping without saving them", step + 1)
        return Update.NONFINITE_WEIGHTS, None
    if stepped:
        return Update.APPLIED, grad_norm
    # An fp16 overflow that the gradient scaler skipped is routine (it lowers its scale): the step counts, as in
    # diffusers' and transformers' trainers, and is no non-finite failure.
    return (Update.SKIPPED_OVERFLOW if run.accelerator.optimizer_step_was_skipped else Update.SKIPPED_NONFINITE), None


class TermLog:
    """The logged terms of each update, kept on the device until a logging step or a checkpoint needs them: then one
    transfer (with several processes one all-reduce: the logs are the mean over processes) appends them to
    ``run.history``. Also the progress bar."""

    def __init__(self, run: Run, initial_step: int) -> None:
        self.run = run
        self.pending: list[tuple[dict[str, float], list[str], torch.Tensor]] = []
        self.progress = tqdm(total=run.cfg.train.max_steps, initial=initial_step, desc="train",
                             disable=not run.accelerator.is_local_main_process, dynamic_ncols=True)

    def add(self, step: int, names: list[str], terms: torch.Tensor, grad_norm: float | None, step_time: float) -> None:
        """Record update ``step``: ``terms`` ``[len(names)]`` (the logged loss terms, on the device) stay pending with
        the host values (learning rate, gradient norm, seconds); the progress bar advances."""
        host = {
            "step": step,
            "lr": self.run.lr_scheduler.get_last_lr()[0],  # a host float: no sync
            "grad_norm": grad_norm if grad_norm is not None else 0.0,
            "step_time_s": step_time,
        }
        self.pending.append((host, names, terms.detach()))
        self.progress.update(1)

    def flush(self) -> None:
        """Move the pending records to ``run.history`` (one transfer; the mean over processes) and show the last."""
        if not self.pending:
            return
        acc = self.run.accelerator
        values = torch.stack([terms for _, _, terms in self.pending])
        if acc.num_processes > 1:
            values = acc.reduce(values, reduction="mean")  # all-reduce
        for (host, names, _), row in zip(self.pending, values.tolist()):  # .tolist(): one host-device sync
            record = {**host, **dict(zip(names, row))}
            self.run.history.append({"step": record.pop("step"), **dict(sorted(record.items()))})
        self.pending.clear()
        last = self.run.history[-1]
        self.progress.set_postfix(
            loss=f"{last['loss/total']:.4f}",
            flow=f"{last['loss/flow']:.4f}",
            **({"geo": f"{last['loss/geometry']:.4f}"} if "loss/geometry" in last else {}),
        )

    def close(self) -> None:
        """Flush what is pending and close the progress bar."""
        self.flush()
        self.progress.close()


def optimizer_step(run: Run, step: int, params: list[torch.nn.Parameter] | None = None) -> tuple[bool, float | None]:
    """Apply one update from the accumulated gradients: clip, guard, step. Returns ``(stepped, grad_norm)``.

    ``params``: the prepared model's trainable parameters (``train`` lists them once; walking every parameter
    of the transformer in each update cost about 1 ms on the CPU); by default they are listed here.

    ``grad_norm`` is the total norm of the *unscaled* gradients of the prepared model's trainable
    parameters (whatever their sharding), or None when it is NaN/inf. Without a gradient scaler a NaN/inf
    norm skips the update (logged; the caller counts it toward ``train.max_nonfinite_steps``). Under fp16
    accelerate's GradScaler decides instead: ``optimizer.step()`` is always called, the scaler skips it on
    an overflow and lowers its scale, and ``accelerator.optimizer_step_was_skipped`` tells the caller.
    The LR schedule advances only with an update.
    """
    cfg, acc = run.cfg, run.accelerator
    # From the prepared model: under FSDP2 these are the sharded parameters that hold the gradients.
    if params is None:
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
        n for n, p in unwrapped(run.accelerator, run.transformer).named_parameters()
        if p.grad is not None and not torch.isfinite(getattr(p.grad, "to_local", lambda: p.grad)()).all()
    ]
    return first_names(names, limit) or "the gradient on another process"


def save_checkpoint(run: Run, step: int) -> Path:
    """Atomically write ``checkpoint-<step>`` (see ``kontext.training.checkpoint``), on every process as accelerate needs."""
    acc = run.accelerator
    tmp = temp_path(run.output_dir, step)
    final = run.output_dir / f"checkpoint-{step}"
    acc.wait_for_everyone()
    # Two agreements (all-reduces), on every rank whatever happened locally: a write that fails on one rank (a
    # full disk is often one node's) stops every rank together, none is left waiting at a barrier.
    failure = try_write(lambda: acc.save_state(str(tmp)))  # each process writes its RNG state, the main one the rest
    stop_if_any_failed(acc, failure, run.output_dir, tmp, final.name)
    if acc.is_main_process:
        state = {
            "step": step,
            "data": run.sampler.state_dict(consumed=run.data_state["position"]) | {"epoch": run.data_state["epoch"]},
            "lora": lora_shape(run.cfg.lora),
            "schedule": schedule_of(run.cfg.train),
            "history": run.history,
            "num_processes": acc.num_processes,
            "base_model": base_model_identity(run.cfg.model.pretrained_model_name_or_path, run.cfg.model.revision),
            "optimizer": run.cfg.train.optimizer,
        }
        failure = try_write(lambda: finalize(run.output_dir, step, state, run.cfg.checkpoint.total_limit))
        if failure is None:
            logger.info("saved %s", final)
    stop_if_any_failed(acc, failure, run.output_dir, tmp, final.name)
    return final


# ---------------------------------------------------------------------------------------------
# Finish: export, validation, model card
# ---------------------------------------------------------------------------------------------


def validate(run: Run, step: int, stop: StopRequest | None = None) -> dict[str, float]:
    """Generate for fixed samples with the current LoRA; write a grid PNG and log mask metrics (main process).

    ``stop`` (the final validation, which a resumed run repeats): a stop request ends the generation at once and
    the metrics are empty; the caller asks every process whether a stop came (``any_process``) and saves."""
    acc = run.accelerator
    metrics: dict[str, float] = {}
    if acc.is_main_process:
        transformer = unwrapped(acc, run.transformer)
        was_training = transformer.training
        transformer.eval()
        try:
            data = run.validation_dataset if run.validation_dataset is not None else run.dataset
            with stop.interrupting("ending the final validation early") if stop else contextlib.nullcontext():
                metrics = run_validation(run.pipe, transformer, data, run.cfg, step, run.output_dir, acc)
        except Stopped:
            metrics = {}
        finally:
            transformer.train(was_training)
    acc.wait_for_everyone()
    return metrics


def finish(run: Run, reason: StopReason | str) -> StopReason:
    """Validate once more, write the history and model card, export the LoRA (and the ComfyUI file); release the
    output folder. Returns why the run ended (``reason``, or ``SIGNAL`` when a stop came before the export).

    A stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT; the scope of ``run_training``, or this function's own) never loses
    the trained LoRA: before the export it ends the final validation early, saves ``checkpoint-<step>`` (unless
    already saved) and prints the resume command, which validates and exports; once the export has begun it is
    completed first (seconds), and the run is finished.
    """
    with StopRequest() as stop:
        return _finish(run, StopReason(reason), stop)


def _finish(run: Run, reason: StopReason, stop: StopRequest) -> StopReason:
    cfg, acc = run.cfg, run.accelerator
    if reason in (StopReason.PAUSED, StopReason.SIGNAL):
        _end_training(run)
        unlock_output_dir(run.output_dir)
        if reason is StopReason.SIGNAL:
            acc.print(_stopped_message(run))
        return reason
    if reason in (StopReason.NONFINITE, StopReason.NONFINITE_WEIGHTS):
        _end_training(run)
        unlock_output_dir(run.output_dir)
        last = _last_checkpoint_name(run)
        what = f"{cfg.train.max_nonfinite_steps} consecutive updates had a NaN/inf loss or gradient (see the warnings above for the term)"
        raise UserError(
            f"{what if reason is StopReason.NONFINITE else 'An update made the LoRA weights NaN/inf (they were not saved)'}; "
            f"stopped at step {run.start_step}. Last good checkpoint: {last}. Lower "
            "train.learning_rate, check the data, or use model.dtype=float32 / train.mixed_precision=no."
        )
    final_ckpt = run.output_dir / f"checkpoint-{run.start_step}"
    if cfg.checkpoint.every_steps and not final_ckpt.is_dir():
        # A final checkpoint lets a finished run be extended (resume_from=latest with a larger max_steps).
        with busy(f"the save of {final_ckpt.name}", then="stopping"):
            save_checkpoint(run, run.start_step)
    acc.wait_for_everyone()
    metrics: dict[str, float] = {}
    if cfg.validation.every_steps >= 0:
        metrics = validate(run, run.start_step, stop)  # a stop ends it early
    # Collective: a signal may reach only some processes, and all must save (and stop) together.
    if any_process(acc, stop.requested is not None):
        if not final_ckpt.is_dir():
            save_checkpoint(run, run.start_step)
        _end_training(run)
        unlock_output_dir(run.output_dir)
        acc.print(_stopped_message(run, "before the final export"))
        return StopReason.SIGNAL
    with busy("the export of the final LoRA", then="stopping with the run finished"):
        _export(run, metrics)
    return reason


def _stopped_message(run: Run, when: str = "") -> str:
    return (
        f"Stopped by signal at step {run.start_step}{' ' + when if when else ''}; checkpoint saved. Resume with:\n"
        f"  accelerate launch train_kontext_lora.py --config {run.output_dir / 'config.yaml'} "
        "checkpoint.resume_from=latest"
    )


def _export(run: Run, metrics: dict[str, float]) -> None:
    """History and model card, then the final LoRA (whose presence makes the run finished), then the ComfyUI file."""
    cfg, acc = run.cfg, run.accelerator
    transformer = unwrapped(acc, run.transformer)
    check_replicas_agree(acc, transformer)
    # Each write below runs on the main process, and every rank learns its outcome, so that a failed write stops
    # them all instead of leaving the others at the next barrier.
    def write_record() -> None:  # before the LoRA file, whose presence makes the run a finished one
        write_text_atomic(run.output_dir / "training_history.json", json.dumps(run.history, indent=1), "the training history")
        prompts = [run.dataset.prompt_of(i) for i in range(len(run.dataset))]  # what the LoRA was trained with
        write_model_card(run.output_dir, cfg, metrics, run.history, prompts)

    main_process_first(acc, write_record, everyone=False)
    path = run.output_dir / LORA_WEIGHTS_NAME
    # Every process takes part in the gather (FSDP shards); the main one writes. A half-written final LoRA must not
    # look like a finished run: it is removed.
    failure = try_write(lambda: save_lora(transformer, run.output_dir, DTYPES[cfg.export.save_dtype],
                                          cfg.model.pretrained_model_name_or_path, write=acc.is_main_process))
    stop_if_any_failed(acc, failure, run.output_dir, path, "the final LoRA")
    if cfg.export.comfyui:
        def write_comfyui() -> None:
            try:
                export_comfyui(path, transformer_config=transformer.config)
            except WriteError as e:
                raise UserError(
                    f"The LoRA is saved ({path}), but {e} Write the ComfyUI file later with: "
                    f"python -m kontext.tools.comfyui {path}"
                ) from None

        main_process_first(acc, write_comfyui, everyone=False)
    if acc.is_main_process:
        acc.print(f"Done: {path}")
        acc.print(finished_run_summary(run.output_dir, cfg, run.history, run.start_step, metrics))
    acc.wait_for_everyone()
    _end_training(run)
    unlock_output_dir(run.output_dir)


def _end_training(run: Run) -> None:
    """``accelerator.end_training()`` (which destroys the process group), after releasing the DDP wrapper; with
    several processes (or a compiled model) ``run.transformer`` is the unwrapped model from then on.

    The wrapper's reducer holds the process group. Kept past ``destroy_process_group``, it is the group's last owner,
    and the release of the run (once ``run_training`` returns) runs the gloo group's destructor with the GIL held:
    torch frees the reducer without letting go of the GIL, and that destructor joins the group's worker threads. A
    worker that has just completed the last collective takes the GIL to release that collective's Python tensors,
    and both wait forever (a process that never exits, after the last checkpoint was saved). Released first
    (``gc.collect`` for a wrapper in a reference cycle), the wrapper leaves the last reference to
    ``destroy_process_group``, whose Python handle of the group lets go of the GIL while the group is destroyed.
    """
    acc = run.accelerator
    base = unwrapped(acc, run.transformer)
    if base is not run.transformer:
        run.transformer = base
        acc.free_memory()  # accelerate's own references to the prepared model, optimiser and schedule
        gc.collect()
    acc.end_training()


def _last_checkpoint_name(run: Run) -> str:
    good = newest_intact(run.output_dir)  # verified: complete files and finite weights
    return str(good) if good is not None else "none (set checkpoint.every_steps)"


def run_training(cfg: Config) -> Run:
    """setup -> train -> finish; returns the finished :class:`Run` (used by tests and notebooks).

    One signal scope covers all three (``kontext.training.signals``): before the first update a stop raises
    :class:`Stopped` (nothing is trained yet; every write of setup is atomic or taken whole); from then on it saves
    a checkpoint of what was trained and the run ends with the resume command.
    """
    with StopRequest() as stop:
        with stop.interrupting():
            run = setup(cfg)
        reason = train(run)
        run.stop_reason = finish(run, reason)
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a FLUX.1 Kontext product-insertion LoRA with mask-geometry losses.",
        epilog="Example: accelerate launch train_kontext_lora.py --config configs/example_tiny.yaml train.max_steps=20",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and docs/config.md).")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run_training(cfg)
    except UserError as e:
        sys.stderr.write(error_text(e))
        sys.stderr.flush()
        return 2
    except (Stopped, KeyboardInterrupt) as e:  # before the first update: nothing trained, nothing half-written
        name, signum = (e.name, e.signum) if isinstance(e, Stopped) else ("SIGINT", int(signal.SIGINT))
        command = shlex.join(["accelerate", "launch", "train_kontext_lora.py", "--config", args.config, *args.overrides])
        sys.stderr.write(
            f"\nStopped by {name} before the first training update; nothing was trained or left half-written. "
            f"Start again with:\n  {command}\n"
        )
        sys.stderr.flush()
        return 128 + signum
    finally:
        unlock_all()  # a refused run removes the lock file it made (a killed one's lock dies with it)
    return 0


if __name__ == "__main__":
    stderr_to_stdout_under_accelerate()  # each message once under `accelerate launch` (see kontext.training.launch)
    set_cpu_threads()
    sys.exit(main())
