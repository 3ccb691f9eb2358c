"""The training inputs: the dataset with its encodings computed once, the encoders, and the batch stream.

- :func:`build_dataset`: every prompt's embeddings once (on disk with ``data.cache_latents``, else in
  memory), and with caching every sample's latents too;
- :func:`free_text_encoders`: CLIP and T5 deleted once every prompt is encoded (validation reads stored
  embeddings through the pipeline's ``encode_prompt``);
- :func:`batches`: ``TrainBatch`` after ``TrainBatch`` from a saved data position, optionally prepared one
  ahead in a background thread; the pixels of uncached items are VAE-encoded here (:func:`encode_items`), and
  the latents of centre-cropped samples handed back to the dataset to keep.
"""

from __future__ import annotations

import gc
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from data import (
    DatasetError,
    LatentCache,
    SampleLatents,
    TripletDataset,
    TripletItem,
    dataset_from_config,
    make_buckets,
    make_train_batch,
    open_configured_source,
    validate_source,
    validation_split,
)
from data.dataset import TrainBatch, stack_one_bucket
from data.errors import file_in_the_way
from kontext.errors import UserError
from kontext.runtime.flux import encode_images, encode_prompts
from kontext.runtime.model_path import cache_root

Embeddings = tuple[torch.Tensor, torch.Tensor]


def open_sources(cfg: Any) -> tuple[Any, Any]:
    """The training source and the held-out validation source (or None), validated in full before any model loads.

    Every problem of the data is reported at once; masks that vanish at the training size (nothing left for the
    geometry terms) are warned about. ``validation.holdout`` withholds samples from training, and
    ``validation.data_root`` is checked like ``data.root``.
    """
    data_config = cfg.data
    if data_config.cache_latents:
        check_cache_dir(latent_cache_dir(data_config.cache_dir))
    try:
        source = open_configured_source(data_config, data_config.root)
        buckets = make_buckets(data_config.resolution, data_config.aspect_buckets)
        validate_source(source, max_pixels=data_config.max_pixels, buckets=buckets)
        return validation_split(source, data_config, cfg.validation)
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


def build_dataset(cfg: Any, source: Any, pipe: Any, accelerator: Any, encoders_device: torch.device) -> TripletDataset:
    """The training ``TripletDataset`` with every prompt's embeddings computed once (cached on disk with
    ``data.cache_latents``, else held in memory) and, when cached, every sample's latents too.

    With caching the VAE is parked on the CPU until validation.
    """
    data_config, geometry = cfg.data, cfg.loss.geometry
    model_id = f"{cfg.model.pretrained_model_name_or_path}|{cfg.model.dtype}|msl{cfg.model.max_sequence_length}"
    cache = None
    if data_config.cache_latents:
        cache = LatentCache(latent_cache_dir(data_config.cache_dir), model_id=model_id)
    dataset = dataset_from_config(
        data_config,
        source,
        cfg.train.seed,
        band_r=geometry.band_r,
        sdm_normalize=geometry.sdm_normalize,
        cache=cache,
        encode_images=image_encoder(pipe, encoders_device, to_cpu=True),
        encode_prompts=prompt_encoder(pipe, cfg.model.max_sequence_length, encoders_device),
        # Mask-derived targets (latent mask, band, outside, SDM) are computed once per sample.
        with_geometry=geometry.enabled or cfg.loss.masked.enabled,
    )
    if cache is not None:
        # Main process fills the shared cache; the others then read it.
        with accelerator.main_process_first():
            dataset.build_cache(progress=accelerator.is_local_main_process, batch_size=data_config.cache_batch_size)
        if encoders_device.type != "cpu":
            # The VAE is not needed until validation: give its memory to training.
            pipe.vae.to("cpu")
    else:
        # Prompts do not change with crops or flips: encode them once, not in every step.
        dataset.encode_prompt_table(batch_size=data_config.cache_batch_size)
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


def encode_items(
    items: list[TripletItem], encode_images: Callable[[torch.Tensor], torch.Tensor] | None, with_scene: bool
) -> list[TripletItem]:
    """``items`` with latents: those that hold pixels VAE-encoded with ``encode_images``, the targets, contexts and
    (hint drawn) scenes of the batch in one call (``image_encoder`` bounds the images per VAE call); the others as
    they are.

    The un-hinted scene is encoded when ``with_scene`` (the geometry terms read it), or when the dataset keeps the
    latents (a ``latent_key``: a centre crop encodes each sample once per run, so what is kept serves every use).
    """
    pending = [j for j, item in enumerate(items) if item.latents is None]
    if not pending:
        return items
    if encode_images is None:
        raise ValueError("the batch holds uncached samples (pixels) but no VAE encoder was given")
    pixels = [items[j].pixels for j in pending]
    keeps = any(items[j].latent_key is not None for j in pending)
    kinds = ["target", "context"]
    if (with_scene or keeps) and pixels[0].scene is not None:
        kinds.append("scene")
    images = [stack_one_bucket([getattr(p, kind) for p in pixels], f"{kind} pixels") for kind in kinds]
    with torch.no_grad():
        latents = dict(zip(kinds, encode_images(torch.cat(images)).chunk(len(kinds))))  # one VAE call for the batch
    scenes = latents.get("scene")
    out = list(items)
    for n, j in enumerate(pending):
        scene = None if scenes is None else scenes[n]
        out[j] = items[j].encoded(SampleLatents(target=latents["target"][n], context=latents["context"][n], scene=scene))
    return out


def train_batch(
    dataset: TripletDataset,
    indices: list[int],
    epoch: int,
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None,
    with_scene: bool,
) -> TrainBatch:
    """The :class:`TrainBatch` of samples ``indices`` (one bucket) as drawn in ``epoch``: the items read, their pixels
    encoded (:func:`encode_items`), the new latents of centre-cropped samples handed to the dataset to keep."""
    # Flips (and random crops) are drawn per (seed, epoch, index).
    items = encode_items([dataset[(i, epoch)] for i in indices], encode_images, with_scene)
    # Uncached with a centre crop, a sample's latents never change: encoded on first use, then kept.
    for item in items:
        if item.latent_key is not None:
            dataset.remember_latents(item.latent_key, item.latents)
    return make_train_batch(items, with_scene)


def batches(
    dataset: TripletDataset,
    sampler: Any,
    state: dict[str, int],
    encode_images: Callable[[torch.Tensor], torch.Tensor] | None,
    with_scene: bool,
    prefetch: bool,
) -> Iterator[TrainBatch]:
    """Micro-batches (:class:`TrainBatch`, on the encoders' device) forever, epoch after epoch, from the data
    position ``state`` (``{"epoch", "position"}``, updated in place). Uncached samples are VAE-encoded here
    with ``encode_images`` (:func:`encode_items`); ``with_scene``: also the un-hinted scene (read only by the
    geometry terms).

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
        return epoch, train_batch(dataset, indices, epoch, encode_images, with_scene)

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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        ahead = pool.submit(build, *next(todo))
        for nxt in todo:
            epoch, batch = ahead.result()
            ahead = pool.submit(build, *nxt)
            hand_out(epoch)
            yield batch
