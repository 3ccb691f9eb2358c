"""The training inputs: the dataset with its encodings computed once, the encoders, and the batch stream.

- :func:`build_dataset`: every prompt's embeddings once (on disk with ``data.cache_latents``, else in
  memory), and with caching every sample's latents too;
- :func:`free_text_encoders`: CLIP and T5 deleted once every prompt is encoded (validation reads stored
  embeddings through the pipeline's ``encode_prompt``);
- :func:`batches`: ``TrainBatch`` after ``TrainBatch`` from a saved data position, optionally prepared one
  ahead in a background thread.
"""

from __future__ import annotations

import gc
import types
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data import DatasetError, LatentCache, make_buckets, open_configured_source, validate_source
from data.dataset import TrainBatch, TripletDataset, make_train_batch
from data.errors import file_in_the_way
from kontext.errors import UserError
from kontext.runtime.flux import encode_images, encode_prompts
from kontext.runtime.model_path import cache_root
from kontext.training.validation import validation_sources

Embeddings = tuple[torch.Tensor, torch.Tensor]


def open_sources(cfg: Any) -> tuple[Any, Any]:
    """The training source and the held-out validation source (or None), validated in full before any model loads.

    Every problem of the data is reported at once; masks that vanish at the training size (nothing left for the
    geometry terms) are warned about. ``validation.holdout`` withholds samples from training, and
    ``validation.data_root`` is checked like ``data.root``.
    """
    d = cfg.data
    if d.cache_latents:
        check_cache_dir(latent_cache_dir(d.cache_dir))
    try:
        source = open_configured_source(d, d.root)
        validate_source(source, max_pixels=d.max_pixels, buckets=make_buckets(d.resolution, d.aspect_buckets))
        return validation_sources(cfg, source)
    except DatasetError as e:
        raise UserError(str(e)) from None


def latent_cache_dir(configured: str | None) -> Path:
    """``data.cache_dir``, or ``latents/`` under the project's cache root (``KONTEXT_LORA_CACHE``)."""
    if configured:
        return Path(configured).expanduser()
    return cache_root() / "latents"


def check_cache_dir(path: Path) -> None:
    """Refuse (before any model loads) a latent cache folder that is a file or runs through one."""
    if where := file_in_the_way(path):
        raise UserError(
            f"data.cache_dir {path} {where}, not a folder; set data.cache_dir to a folder (it is created if missing), "
            "or data.cache_latents=false."
        )


def build_dataset(cfg: Any, source: Any, pipe: Any, accelerator: Any, encoders_device: torch.device) -> Any:
    """The training ``TripletDataset`` with every prompt's embeddings computed once (cached on disk with
    ``data.cache_latents``, else held in memory) and, when cached, every sample's latents too.

    With caching the VAE is parked on the CPU until validation.
    """
    d = cfg.data
    g = cfg.loss.geometry
    model_id = f"{cfg.model.pretrained_model_name_or_path}|{cfg.model.dtype}|msl{cfg.model.max_sequence_length}"
    cache = LatentCache(latent_cache_dir(d.cache_dir), model_id=model_id) if d.cache_latents else None
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
        encode_images=image_encoder(pipe, encoders_device, to_cpu=True),
        encode_prompts=prompt_encoder(pipe, cfg.model.max_sequence_length, encoders_device),
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


def prompt_encoder(pipe: Any, max_sequence_length: int, device: torch.device) -> Callable[[list[str]], Embeddings]:
    """``prompts -> (prompt_embeds [B, L, D], pooled [B, Dp])`` with the pipeline's CLIP and T5 (float32, CPU)."""
    def encode(prompts: list[str]) -> Embeddings:
        pe, pooled = encode_prompts(pipe, prompts, max_sequence_length, device)
        return pe.float().cpu(), pooled.float().cpu()

    return encode


def prompt_table(pipe: Any, cfg: Any, prompts: list[str], device: torch.device) -> dict[str, Embeddings]:
    """``{prompt: (prompt_embeds [L, D], pooled [Dp])}`` of ``prompts``, ``data.cache_batch_size`` per encoder call."""
    encode, table, todo = prompt_encoder(pipe, cfg.model.max_sequence_length, device), {}, sorted(set(prompts))
    for s in range(0, len(todo), cfg.data.cache_batch_size):
        chunk = todo[s : s + cfg.data.cache_batch_size]
        pe, pooled = encode(chunk)
        table.update({p: (pe[j], pooled[j]) for j, p in enumerate(chunk)})
    return table


def image_encoder(pipe: Any, device: torch.device, to_cpu: bool, max_images: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``pixels [N, 3, H, W] -> latents [N, 16, H/8, W/8]`` with the pipeline's VAE on ``device`` (float32 out),
    at most ``max_images`` per VAE call: the encoder's activations, not the latents, are what costs memory, and on
    the uncached path they would add to the training step's own peak while the next batch is prepared."""
    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            parts = pixels.split(max_images or pixels.shape[0])
            z = torch.cat([encode_images(pipe.vae, p.to(device)).float() for p in parts])
        return z.cpu() if to_cpu else z

    return encode


def free_text_encoders(pipe: Any, dataset: Any, extra: dict[str, Embeddings]) -> None:
    """Delete CLIP and T5 (for FLUX.1 Kontext [dev] about 9.5 GB in bf16) once every prompt is encoded.

    The pipeline's ``encode_prompt`` then serves stored embeddings: ``extra`` (the held-out validation
    samples' prompts), else the training set's (validation without held-out data generates for training
    samples). Any other prompt is an error that says so. Evaluation and inference load their own pipeline.
    The VAE stays whole: validation encodes its contexts with it (the encoder is 34M parameters of FLUX's VAE,
    about 69 MB in bf16).
    """

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
    empty_cache()  # the modules are unreachable now; their memory goes back


def empty_cache() -> None:
    """Collect unreachable objects and hand the CUDA caching allocator's free blocks back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def use_prefetch(setting: bool | str, device: torch.device) -> bool:
    """Whether to prepare the next batch in a background thread (``data.prefetch``).

    ``"auto"`` is on for an accelerator and off on a CPU. On an accelerator the main thread mostly waits
    for the device, so a second thread uses a core that is idle anyway. On a CPU the step's OpenMP team
    already holds every core the launcher gave (its workers spin between kernels); a prefetch thread then
    preempts one of them and the whole team waits for it at the next barrier: at 512 px, 2 threads, the
    cached path stepped 16-20 % slower with prefetch than without, with 4x the system time.
    """
    if setting == "auto":
        return device.type != "cpu"
    return bool(setting)


def batches(
    dataset: Any,
    sampler: Any,
    state: dict[str, int],
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None,
    with_scene: bool,
    prefetch: bool,
) -> Iterator[TrainBatch]:
    """Micro-batches (:class:`TrainBatch`, on the encoders' device) forever, epoch after epoch, from the data
    position ``state`` (``{"epoch", "position"}``, updated in place). Uncached samples are VAE-encoded here
    with ``encode_images``, the batch's images in one call; ``with_scene``: also the un-hinted scene (read only
    by the geometry terms).

    With ``prefetch`` the next batch is prepared in a background thread while the caller computes on this one
    (the same batches in the same order). The position (epoch, batches consumed) is counted when a batch is
    handed out, not when it is prepared, so a checkpoint records exactly what training has consumed.
    """

    def plan() -> Iterator[tuple[int, list[int]]]:
        epoch, position = state["epoch"], state["position"]
        while True:
            sampler.set_epoch(epoch)
            sampler.load_state_dict({"epoch": epoch, "position": position})
            for indices in sampler:
                yield epoch, list(indices)
            epoch, position = epoch + 1, 0

    def build(epoch: int, indices: list[int]) -> tuple[int, TrainBatch]:
        # Flips (and random crops) are drawn per (seed, epoch, index).
        # Uncached with a centre crop, a sample's latents never change: encoded on first use, then kept.
        items = [dataset[(i, epoch)] for i in indices]
        return epoch, make_train_batch(items, encode_images, with_scene, remember=dataset.remember_latents)

    def hand_out(epoch: int) -> None:
        if epoch != state["epoch"]:
            state["epoch"], state["position"] = epoch, 0
        state["position"] += 1
        dataset.set_epoch(epoch)

    todo = plan()
    if not prefetch:
        for epoch, indices in todo:
            _, batch = build(epoch, indices)
            hand_out(epoch)
            yield batch
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(build, *next(todo))
        for nxt in todo:
            epoch, batch = ahead.result()
            ahead = pool.submit(build, *nxt)
            hand_out(epoch)
            yield batch
