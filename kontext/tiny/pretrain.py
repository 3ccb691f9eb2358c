"""Pretraining of the tiny FLUX.1 Kontext transformer on a general synthetic insertion task.

The embedded tiny model plays the role FLUX.1 Kontext [dev] plays for a user: a base that already
edits, which a product LoRA then specialises. A random transformer cannot insert anything, so no
metric about an object's size would mean anything on it. This module trains the whole transformer
(not a LoRA) with the trainer's own rectified-flow objective on samples from
:func:`data.synthetic.make_insertion_sample`: procedural scenes, objects of many shapes, colours
and decorations, masks from 1 % to 50 % of the image at many aspect ratios, the ``fill`` mask hint
drawn into the context with :mod:`data.hint`, and a prompt naming the object. The product
("Kolo orange soda can") is never shown: learning it is the LoRA's job.

It is called by :func:`kontext.tiny.model.build_tiny_pipeline`; see ``docs/tiny_model.md`` for the recipe's
measured quality and time.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch

from data.hint import apply_mask_hint
from data.synthetic import make_insertion_sample
from kontext.evaluation.metrics import sample_metrics
from kontext.runtime.flux import encode_images, encode_prompts, predict_velocity
from kontext.runtime.generation import generate, quiet_progress
from losses import flow_matching as fm


def insertion_set(
    seed: int, count: int, size: int, area_range: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """``count`` samples of the general insertion task as tensors.

    Returns:
        ``(target, hinted_context, mask, prompts)``: ``[N, 3, S, S]`` in [-1, 1] twice (the context with
        the ``fill`` hint drawn), ``[N, 1, S, S]`` in {0, 1}, and ``N`` prompts.
    """
    rng = np.random.default_rng(seed)
    children = rng.spawn(count)
    targets, contexts, masks, prompts = [], [], [], []
    for child in children:
        t, prompt = make_insertion_sample(child, size, size, area_range)
        targets.append(np.asarray(t.target, dtype=np.float32))
        contexts.append(np.asarray(t.context, dtype=np.float32))
        masks.append(np.asarray(t.mask, dtype=np.float32) / 255.0)
        prompts.append(prompt)
    tgt = torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2) / 127.5 - 1.0
    ctx = torch.from_numpy(np.stack(contexts)).permute(0, 3, 1, 2) / 127.5 - 1.0
    mask = torch.from_numpy(np.stack(masks))[:, None]
    return tgt, apply_mask_hint(ctx, mask, "fill"), mask, prompts


@torch.no_grad()
def _encode(vae: Any, pixels: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([encode_images(vae, pixels[i : i + batch]).float() for i in range(0, len(pixels), batch)])


def pretrain_loss(
    transformer: torch.nn.Module,
    x0: torch.Tensor,
    context: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    generator: torch.Generator,
    scheduler: Any,
    guidance_range: tuple[float, float],
) -> torch.Tensor:
    """One pretraining micro-batch's loss: the trainer's rectified-flow step (:func:`losses.flow_matching.flow_step`,
    uniform timestep density, no loss weighting) on ``x0 [B, 16, h, w]`` conditioned on ``context``.

    From ``generator``: the noise, the timesteps, then the guidance embedding's value, uniform in ``guidance_range``.
    """
    flow = fm.flow_step(x0, generator, scheduler)
    low, high = guidance_range
    guidance = float(low + (high - low) * torch.rand((), generator=generator))
    v = predict_velocity(transformer, flow.x_t, context, flow.model_timesteps, prompt_embeds, pooled_prompt_embeds, guidance)
    return flow.loss(v)


def pretrain_transformer(
    transformer: torch.nn.Module, pipe: Any, cfg: dict[str, Any], seed: int, progress: bool = True
) -> dict[str, Any]:
    """Train ``transformer`` in place on the insertion task; ``pipe`` supplies the trained VAE and text encoders.

    The objective is the trainer's (:func:`losses.flow_matching.flow_step` and
    :func:`kontext.runtime.flux.predict_velocity`): ``x_t = (1 - sigma) x0 + sigma eps``, target velocity
    ``eps - x0``, sigmas from the scheduler's training table (uniform density, no loss weighting), context tokens
    appended after the target tokens. The guidance embedding's value is drawn per step
    from ``cfg["guidance_range"]`` so that any guidance a user picks at inference is one the base has seen.
    The final weights are an exponential moving average (``cfg["ema_decay"]``) of the trained ones.

    Returns:
        Facts for ``build_info.json``: steps, seconds, final training loss (mean of the last 50 steps).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tqdm.auto import tqdm

    start = time.perf_counter()
    tgt_px, ctx_px, _, prompts = insertion_set(cfg["data_seed"], cfg["num_samples"], cfg["size"], tuple(cfg["area_range"]))
    x0_all = _encode(pipe.vae, tgt_px)
    ctx_all = _encode(pipe.vae, ctx_px)
    unique = sorted(set(prompts))
    pe, pooled = encode_prompts(pipe, unique, cfg["max_sequence_length"], torch.device("cpu"))
    row = {p: i for i, p in enumerate(unique)}
    prompt_index = torch.tensor([row[p] for p in prompts])
    pe, pooled = pe.float(), pooled.float()
    data_seconds = time.perf_counter() - start

    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    gen = torch.Generator().manual_seed(seed)
    steps, warmup, bsz = cfg["steps"], cfg["warmup_steps"], cfg["batch_size"]
    transformer.requires_grad_(True)
    transformer.train()
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg["lr"], betas=(0.9, 0.99), weight_decay=cfg["weight_decay"])
    ema = copy.deepcopy(transformer).requires_grad_(False)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="tiny transformer pretraining", disable=not progress, leave=False)
    for step in bar:
        lr = cfg["lr"] * min(1.0, (step + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(x0_all), (bsz,), generator=gen)
        x0, ctx = x0_all[idx], ctx_all[idx]
        if bool(torch.rand((), generator=gen) < 0.5):
            # A mirrored scene is another valid scene: doubles the data at no cost.
            x0, ctx = x0.flip(-1), ctx.flip(-1)
        loss = pretrain_loss(
            transformer, x0, ctx, pe[prompt_index[idx]], pooled[prompt_index[idx]], gen, sched, cfg["guidance_range"]
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(cfg["ema_decay"], (1.0 + step) / (10.0 + step))  # short warm-up of the average
            for pe_, p in zip(ema.parameters(), transformer.parameters()):
                pe_.lerp_(p, 1.0 - d)
        losses.append(loss.detach().item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-25:]):.4f}")
    with torch.no_grad():
        for p, pe_ in zip(transformer.parameters(), ema.parameters()):
            p.copy_(pe_)
    transformer.requires_grad_(False)
    transformer.eval()
    return {
        "pretrain_steps": steps,
        "pretrain_samples": cfg["num_samples"],
        "pretrain_data_seconds": round(data_seconds, 1),
        "pretrain_seconds": round(time.perf_counter() - start, 1),
        "pretrain_final_loss": round(float(np.mean(losses[-50:])), 5),
        "pretrain_loss_curve": [round(float(np.mean(losses[i : i + 100])), 5) for i in range(0, steps, 100)],
    }


@torch.no_grad()
def insertion_quality(
    pipe: Any, num_samples: int, seed: int, num_inference_steps: int = 12, size: int = 128, max_sequence_length: int = 32
) -> dict[str, float]:
    """How well ``pipe`` inserts: generate on held-out samples of the insertion task and measure the change.

    Each sample is drawn with :func:`data.synthetic.make_insertion_sample` (a generator seeded apart from the
    training data), generated with the ``fill`` hint through :func:`kontext.runtime.generation.generate` (guidance 2.5,
    the Kontext default), and scored with :func:`kontext.evaluation.metrics.sample_metrics` against the un-hinted scene.

    Returns:
        Means over samples: ``iou`` and ``area_log_error`` of the change mask against the insertion mask,
        ``psnr_outside`` (dB, result vs scene outside the dilated mask), ``psnr_inside`` (result vs target
        inside the mask).
    """
    rows = []
    rng = np.random.default_rng(seed)
    with quiet_progress(pipe):
        for k, child in enumerate(rng.spawn(num_samples)):
            t, prompt = make_insertion_sample(child, size, size)
            g = generate(
                pipe, t.context, prompt, t.mask, mask_hint="fill", seed=k, num_inference_steps=num_inference_steps,
                guidance_scale=2.5, max_sequence_length=max_sequence_length,
            )

            def arr(im: Any) -> np.ndarray:
                return np.asarray(im, dtype=np.float32) / 255.0

            m = sample_metrics(arr(g.images[0]), arr(t.context), np.asarray(t.mask) >= 128, arr(t.target))
            rows.append((m.iou, m.area_log_error, m.psnr_outside, m.psnr_inside))
    mean = np.nanmean(np.array(rows, dtype=np.float64), axis=0)
    return {k: round(float(v), 4) for k, v in zip(("iou", "area_log_error", "psnr_outside", "psnr_inside"), mean)}
