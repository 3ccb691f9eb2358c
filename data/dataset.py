"""The training dataset: a source, its buckets, transforms, the mask hint, geometry targets and the cache.

Two modes, chosen by ``cache``:

- uncached (``cache=None``): each item is prepared from the images; what depends only on the
  sample is kept in memory (the decoded, resized pixels up to ``decoded_memory_mb``, the geometry
  targets, and, after :meth:`TripletDataset.encode_prompt_table`, the prompt embeddings), so a step
  only flips, draws the hint and encodes with the VAE;
- cached (``cache=LatentCache(...)``, after :func:`data.cache.build_cache`): each item is read
  from the cache; the VAE and text encoders are not needed.

An item is a :class:`TripletItem`: its :class:`SamplePixels` (uncached) or its :class:`SampleLatents` (cached, or
kept from an earlier use). The trainer, which owns the VAE, encodes the pixels of a batch's items
(:meth:`TripletItem.encoded`) and hands latents worth keeping back with :meth:`TripletDataset.remember_latents`;
:func:`make_train_batch` then turns the items of one batch into a :class:`TrainBatch`, the one thing the training
step reads. :func:`dataset_from_config` builds the dataset a ``data`` config section describes.

Per-sample randomness (flip, random crop) is a pure function of (seed, epoch, index); set the
epoch with :meth:`TripletDataset.set_epoch` before each epoch, or index with ``(index, epoch)`` tuples.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import torch

from losses import MaskTargets, compute_mask_targets

from .buckets import VAE_SCALE_FACTOR, make_buckets, nearest_bucket
from .cache import GEOMETRY_FIELDS, EncodeImages, EncodePrompts, LatentCache, build_cache
from .hint import MASK_HINT_MODES, apply_mask_hint, default_outline_width
from .sources import RawSample, TripletSource
from .transforms import flip_decision, prepare_sample, sample_rng

# Version of the pixel pipeline (resampling filters, crop rule, hint drawing); part of every cache key.
TRANSFORM_VERSION = "lanczos-rgb/area-mask/v1"


@dataclass
class SamplePixels:
    """One sample resized to its bucket.

    Attributes:
        target: ``[3, H, W]`` in [-1, 1].
        context: ``[3, H, W]`` in [-1, 1], the mask hint drawn (what the model is conditioned on).
        mask: ``[1, H, W]`` in [0, 1], the insertion mask.
        scene: ``[3, H, W]`` in [-1, 1], the context without the hint; None with ``mask_hint: none`` (the
            context is the scene).
    """

    target: torch.Tensor
    context: torch.Tensor
    mask: torch.Tensor
    scene: torch.Tensor | None = None


@dataclass
class SampleLatents:
    """VAE latents of one sample, ``[16, H/8, W/8]`` each (``(vae.encode(x).mode - shift) * scale``).

    Attributes:
        target: the target's (``x0``).
        context: the hinted context's.
        scene: the un-hinted scene's, which the geometry terms compare with; None when the scene is the context
            (``mask_hint: none``) or was not encoded (nothing reads it).
    """

    target: torch.Tensor
    context: torch.Tensor
    scene: torch.Tensor | None = None

    def nbytes(self) -> int:
        """Bytes the tensors hold (for the ``decoded_memory_mb`` budget)."""
        return sum(t.numel() * t.element_size() for t in (self.target, self.context, self.scene) if t is not None)


@dataclass
class TripletItem:
    """One item of a :class:`TripletDataset`: the sample as pixels or as latents, never both.

    Attributes:
        name, prompt: the sample's, for messages and the prompt embeddings.
        pixels: uncached: the pixels the trainer encodes with the VAE; None when ``latents`` is set.
        latents: cached, or kept from an earlier use of a centre-cropped sample; None when ``pixels`` is set.
        prompt_embeds: T5 ``[L, D]``; pooled_prompt_embeds: CLIP ``[Dp]``. Set when cached or after
            :meth:`TripletDataset.encode_prompt_table`, else None.
        geometry: the sample's ``losses.MaskTargets`` ``[1, 1, h, w]`` (float32), or None without ``with_geometry``.
        latent_key: uncached and centre-cropped: the (index, flip) under which
            :meth:`TripletDataset.remember_latents` keeps this item's latents once encoded; else None.
    """

    name: str
    prompt: str
    pixels: SamplePixels | None = None
    latents: SampleLatents | None = None
    prompt_embeds: torch.Tensor | None = None
    pooled_prompt_embeds: torch.Tensor | None = None
    geometry: MaskTargets | None = None
    latent_key: tuple[int, bool] | None = None

    def encoded(self, latents: SampleLatents) -> TripletItem:
        """This item with ``latents`` (its pixels, encoded) in place of its pixels."""
        return replace(self, pixels=None, latents=latents)


class TripletDataset(torch.utils.data.Dataset):
    """Indexable triplets ready for training.

    Args:
        source: a ``FolderSource``/``HFSource`` (validate it first with ``validate_source``).
        resolution, aspect_buckets: the buckets, as :func:`data.buckets.make_buckets` makes them;
            each sample goes to the bucket nearest its aspect ratio (:attr:`bucket_ids`, for
            ``BucketBatchSampler``). ``buckets`` (a list of (W, H)) overrides both.
        mask_hint: one of ``MASK_HINT_MODES``; drawn on the context before VAE encoding.
        random_flip: mirror each sample with probability 1/2, decided per (seed, epoch, index).
        random_crop: random instead of centred crop window (cannot be cached).
        seed: seeds flips and crops together with epoch and index.
        cache: a :class:`LatentCache` to read from, or None to prepare pixels on the fly.
        encode_images, encode_prompts: the encoders :meth:`build_cache` uses (see
            :func:`data.cache.build_cache` for their shapes); only needed with a cache.
        band_r, sdm_normalize: geometry parameters passed to ``losses.compute_mask_targets``.
        outline_width: band width in pixels for ``outline`` (None: ``default_outline_width``).
        with_geometry: include the geometry targets in each item.
        decoded_memory_mb: uncached only: MiB of decoded images kept in memory (8-bit, resized to the
            bucket with a centre crop, else at their original size with ``random_crop``); 0 decodes the
            files for every item.

    Items are :class:`TripletItem`: uncached, its :class:`SamplePixels` (with the prompt embeddings once
    :meth:`encode_prompt_table` has run, and a ``latent_key`` with a centre crop), or the latents kept by
    :meth:`remember_latents`; cached, its :class:`SampleLatents` and prompt embeddings. Both carry the
    geometry targets with ``with_geometry``.

    The model is conditioned on the hinted context; the geometry terms that ask "what changed" compare
    with the un-hinted scene (a grey-filled region would make a shrunk product look like a full change).
    """

    def __init__(
        self,
        source: TripletSource,
        resolution: int = 1024,
        aspect_buckets: bool = False,
        mask_hint: str = "none",
        random_flip: bool = False,
        random_crop: bool = False,
        seed: int = 0,
        cache: LatentCache | None = None,
        encode_images: EncodeImages | None = None,
        encode_prompts: EncodePrompts | None = None,
        band_r: int = 1,
        sdm_normalize: bool = True,
        outline_width: int | None = None,
        with_geometry: bool = True,
        buckets: list[tuple[int, int]] | None = None,
        prompt_memo_size: int = 32,
        decoded_memory_mb: int = 2048,
    ) -> None:
        if mask_hint not in MASK_HINT_MODES:
            raise ValueError(f"data.mask_hint must be one of {MASK_HINT_MODES}, got {mask_hint!r}")
        if cache is not None and random_crop:
            raise ValueError(
                "data.random_crop cannot be cached (every epoch has a new crop); turn data.random_crop off "
                "or turn caching off"
            )
        if buckets is None:
            buckets = make_buckets(resolution, aspect_buckets)
        if not buckets:
            raise ValueError("TripletDataset needs at least one bucket (see data.buckets.make_buckets)")
        for w, h in buckets:
            if w % 16 or h % 16:
                raise ValueError(f"bucket {w}x{h} is not divisible by 16; build buckets with data.buckets.make_buckets")
        self.source = source
        self.buckets = [tuple(b) for b in buckets]
        self.mask_hint = mask_hint
        self.outline_width = outline_width
        self.flip = bool(random_flip)
        self.crop = "random" if random_crop else "center"
        self.seed = int(seed)
        self.cache = cache
        self.encode_images = encode_images
        self.encode_prompts = encode_prompts
        self.band_r = int(band_r)
        self.sdm_normalize = bool(sdm_normalize)
        self.with_geometry = with_geometry
        self.epoch = 0
        self.bucket_ids = [nearest_bucket(*source.size(i), self.buckets) for i in range(len(source))]
        self._geometry_memo: dict[tuple[str, int], MaskTargets] = {}
        self._prompt_memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._prompt_memo_size = prompt_memo_size
        self._prompt_lock = threading.Lock()  # the trainer's prefetch thread and validation both read prompts
        # Prompt embeddings held in memory (all prompts of the set): filled by encode_prompt_table.
        self._prompt_table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Uncached: decoded images kept between epochs, up to a byte budget (first come, kept for the run).
        self._decoded_budget = max(0, int(decoded_memory_mb)) * 2**20
        self._decoded_bytes = 0
        self._decoded: dict[Any, Any] = {}
        self._latents: dict[tuple[int, bool], SampleLatents] = {}

    def build_cache(self, progress: bool = True, batch_size: int = 2) -> dict[str, int]:
        """Fill the cache with every entry this dataset reads (see :func:`data.cache.build_cache`); returns the counts."""
        if self.encode_images is None or self.encode_prompts is None:
            raise ValueError("build_cache needs encode_images and encode_prompts (pass them to TripletDataset)")
        return build_cache(self, self.encode_images, self.encode_prompts, batch_size=batch_size, progress=progress)

    def encode_prompt_table(self, batch_size: int = 2) -> int:
        """Encode every distinct prompt of the set once and keep the embeddings in memory (the uncached path:
        prompts do not change with crops or flips). ``batch_size`` prompts per ``encode_prompts`` call;
        returns how many prompts were encoded."""
        if self.encode_prompts is None:
            raise ValueError("encode_prompt_table needs encode_prompts (pass it to TripletDataset)")
        missing = sorted({self.source.prompt(i) for i in range(len(self))} - set(self._prompt_table))
        for s in range(0, len(missing), max(1, int(batch_size))):
            chunk = missing[s : s + max(1, int(batch_size))]
            embeds, pooled = self.encode_prompts(chunk)
            for j, p in enumerate(chunk):
                self._prompt_table[p] = (embeds[j].clone(), pooled[j].clone())
        return len(missing)

    def prompt_embeddings(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prompt_embeds [L,D], pooled [Dp])`` of one of the set's prompts, from memory or the cache."""
        return self._prompt_embeds(prompt, name=prompt)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for flips and random crops when indexed by a plain int."""
        self.epoch = int(epoch)

    def latent_size(self, i: int) -> tuple[int, int]:
        """(h, w) latent size of sample ``i`` = its bucket's (H/8, W/8)."""
        w, h = self.buckets[self.bucket_ids[i]]
        return h // VAE_SCALE_FACTOR, w // VAE_SCALE_FACTOR

    # -- pieces shared with the cache builder

    def orientations(self) -> list[bool]:
        """Flip states a sample can appear in."""
        return [False, True] if self.flip else [False]

    def geometry_params(self) -> dict[str, Any]:
        """``{"band_r", "sdm_normalize"}`` passed to ``losses.compute_mask_targets``."""
        return {"band_r": self.band_r, "sdm_normalize": self.sdm_normalize}

    def _outline_width(self, i: int) -> int | None:
        if self.mask_hint != "outline":
            return None
        w, h = self.buckets[self.bucket_ids[i]]
        return default_outline_width(h, w) if self.outline_width is None else int(self.outline_width)

    def transform_params(self, i: int, flip: bool) -> dict[str, Any]:
        """Everything besides content and model that decides sample ``i``'s cache entry."""
        return {
            "bucket": list(self.buckets[self.bucket_ids[i]]),
            "crop": self.crop,
            "flip": bool(flip),
            "mask_hint": self.mask_hint,
            "outline_width": self._outline_width(i),
            "transform": TRANSFORM_VERSION,
            **self.geometry_params(),
        }

    def cache_key(self, i: int, flip: bool) -> str:
        """Cache key of sample ``i`` in orientation ``flip`` (content fingerprint + transform + model)."""
        if self.cache is None:
            raise ValueError("cache_key: this dataset has no cache")
        return self.cache.sample_key(self.source.fingerprint(i), self.transform_params(i, flip))

    def cache_describe(self, i: int, flip: bool) -> dict[str, Any]:
        """Sample name and transform, stored in the cache entry's metadata for people reading the cache."""
        return {"name": self.source.names[i], **self.transform_params(i, flip)}

    def prompt_of(self, i: int) -> str:
        """Prompt of sample ``i``."""
        return self.source.prompt(i)

    def load_raw(self, i: int) -> RawSample:
        """Decoded sample ``i`` at its original size."""
        return self.source.load(i)

    def _rng_and_flip(self, i: int, epoch: int) -> tuple[Any, bool]:
        rng = sample_rng(self.seed, epoch, i)
        return rng, flip_decision(rng, self.flip)

    def prepared_pixels(self, i: int, flip: bool, raw: RawSample | None = None, rng: Any = None) -> SamplePixels:
        """Sample ``i`` resized to its bucket, the hint drawn on its context (the scene kept apart unless
        ``mask_hint`` is ``none``)."""
        raw = self.source.load(i) if raw is None else raw
        p = prepare_sample(raw, self.buckets[self.bucket_ids[i]], flip=flip, crop=self.crop, rng=rng)
        return self._hinted(i, target=p["target"], scene=p["context"], mask=p["mask"])

    def _hinted(self, i: int, target: torch.Tensor, scene: torch.Tensor, mask: torch.Tensor) -> SamplePixels:
        if self.mask_hint == "none":
            return SamplePixels(target=target, context=scene, mask=mask)
        context = apply_mask_hint(scene, mask, self.mask_hint, self._outline_width(i))
        return SamplePixels(target=target, context=context, mask=mask, scene=scene)

    # -- geometry

    def _geometry(self, i: int, mask: torch.Tensor | None, flip: bool) -> MaskTargets:
        """Geometry targets ``[1, 1, h, w]`` of sample ``i`` from its pixel mask ``[1, H, W]`` (None: the memo has them,
        the case of latents kept after a first use with pixels)."""
        h, w = self.latent_size(i)
        if self.crop == "random":
            # Every epoch has another window, so there is nothing to reuse.
            return compute_mask_targets(mask[None], (h, w), self.band_r, self.sdm_normalize)
        # Geometry of a mirrored mask is the mirrored geometry (area pooling at 8x, symmetric
        # morphology and distances), so one computation serves both orientations.
        key = (self.source.fingerprint(i), self.bucket_ids[i])
        if key not in self._geometry_memo:
            upright = torch.flip(mask, dims=[-1]) if flip else mask
            self._geometry_memo[key] = compute_mask_targets(upright[None], (h, w), self.band_r, self.sdm_normalize)
        upright_targets = self._geometry_memo[key]
        return MaskTargets(
            **{
                field: torch.flip(t, dims=[-1]) if flip else t.clone()
                for field, t in upright_targets.to_dict().items()
            }
        )

    # -- items

    def _prompt_embeds(self, prompt: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt in self._prompt_table:
            return self._prompt_table[prompt]
        cache = self.cache
        if cache is None:
            raise ValueError(
                f"no embeddings for the prompt of sample '{name}': run encode_prompt_table first (or use a cache)"
            )
        key = cache.prompt_key(prompt)
        with self._prompt_lock:
            if key in self._prompt_memo:
                self._prompt_memo.move_to_end(key)
                return self._prompt_memo[key]
        value = cache.load_prompt(key, what=f"the prompt of sample '{name}'")
        with self._prompt_lock:
            self._prompt_memo[key] = value
            if len(self._prompt_memo) > self._prompt_memo_size:
                self._prompt_memo.popitem(last=False)
        return value

    def __getitem__(self, key: int | tuple[int, int]) -> TripletItem:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        rng, flip = self._rng_and_flip(i, epoch)
        name = self.source.names[i]
        prompt = self.source.prompt(i)
        if self.cache is not None:
            entry = self.cache.load_sample(self.cache_key(i, flip), what=f"sample '{name}' (flip={flip})")
            embeds, pooled = self._prompt_embeds(prompt, name)
            geometry = None
            if self.with_geometry:
                geometry = MaskTargets(**{f: entry[f"geometry.{f}"][None] for f in GEOMETRY_FIELDS})
            return TripletItem(
                name=name,
                prompt=prompt,
                latents=SampleLatents(
                    target=entry["target_latents"],
                    context=entry["context_latents"],
                    scene=entry["scene_latents"] if self.mask_hint != "none" else None,
                ),
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                geometry=geometry,
            )
        item = TripletItem(name=name, prompt=prompt)
        kept = self._latents.get((i, flip))
        if kept is not None:  # centre crop: encoded on an earlier use (see remember_latents)
            item.latents = kept
        else:
            item.pixels = self._pixels(i, flip, rng)
            if self.crop == "center":
                item.latent_key = (i, flip)
        if prompt in self._prompt_table:
            item.prompt_embeds, item.pooled_prompt_embeds = self._prompt_table[prompt]
        if self.with_geometry:
            item.geometry = self._geometry(i, None if item.pixels is None else item.pixels.mask, flip)
        return item

    def remember_latents(self, key: tuple[int, bool], latents: SampleLatents) -> None:
        """Keep the VAE latents of an uncached, centre-cropped item (its ``latent_key``) for its later uses.

        With a centre crop the pixels of (sample, orientation) never change, and neither do their latents
        (the VAE's mode, no sampling): the first use encodes, later ones read these. They take the place of
        the kept pixels (a twelfth of their float size) in the ``decoded_memory_mb`` budget. With a hint drawn
        only complete latents (the scene's included) are kept, so a kept item serves any later use.
        """
        if self.crop != "center" or key in self._latents:
            return
        if self.mask_hint != "none" and latents.scene is None:
            return

        def kept_copy(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to("cpu", torch.float32).clone()

        kept = SampleLatents(
            target=kept_copy(latents.target),
            context=kept_copy(latents.context),
            scene=kept_copy(latents.scene) if self.mask_hint != "none" else None,
        )
        pixels = self._decoded.pop(key, None)
        if pixels is not None:
            self._decoded_bytes -= sum(t.numel() * t.element_size() for t in pixels.values())
        nbytes = kept.nbytes()
        if self._decoded_bytes + nbytes <= self._decoded_budget:
            self._latents[key] = kept
            self._decoded_bytes += nbytes

    # -- decoded images kept in memory (uncached)

    def _keep(self, key: Any, value: Any, nbytes: int) -> None:
        if self._decoded_bytes + nbytes <= self._decoded_budget:
            self._decoded[key] = value
            self._decoded_bytes += nbytes

    def _pixels(self, i: int, flip: bool, rng: Any) -> SamplePixels:
        """:meth:`prepared_pixels` of sample ``i``, from the images kept in memory where possible.

        Centre crop: the pixels of (sample, orientation) never change, so the resized images are kept as
        8 bits (exact: they come from 8-bit resampling) with the mask, and the hint is redrawn from them.
        Random crop: every item has another window, so the decoded originals are kept instead.
        """
        if self.crop == "random":
            raw = self._decoded.get(i)
            if raw is None:
                raw = self.source.load(i)
                w, h = raw.context.size
                self._keep(i, raw, 7 * w * h)  # two RGB images and an L mask
            return self.prepared_pixels(i, flip, raw=raw, rng=rng)
        kept = self._decoded.get((i, flip))
        if kept is None:
            pixels = self.prepared_pixels(i, flip, rng=rng)
            kept = {
                "target": _to_uint8(pixels.target),
                "scene": _to_uint8(pixels.context if pixels.scene is None else pixels.scene),
                "mask": pixels.mask,
            }
            self._keep((i, flip), kept, sum(t.numel() * t.element_size() for t in kept.values()))
            return pixels
        return self._hinted(
            i,
            target=kept["target"].float() / 127.5 - 1.0,
            scene=kept["scene"].float() / 127.5 - 1.0,
            mask=kept["mask"].clone(),
        )


def _to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] that came from 8-bit values (``x / 127.5 - 1``) -> those values, exactly."""
    return ((pixels + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class TrainBatch:
    """One micro-batch as the training step reads it (all tensors batched on dim 0).

    Attributes:
        target_latents: ``x0`` ``[B, 16, h, w]``.
        context_latents: the hinted context the model is conditioned on ``[B, 16, hc, wc]``.
        scene_latents: the un-hinted scene the geometry terms compare with (the context's latents with
            ``mask_hint: none``) ``[B, 16, h, w]``.
        prompt_embeds: T5 embeddings ``[B, L, D]``; pooled_prompt_embeds: CLIP ``[B, Dp]``.
        geometry: the samples' ``losses.MaskTargets`` ``[B, 1, h, w]``, or None when no loss needs them.
        names, prompts: per sample, for messages.
    """

    target_latents: torch.Tensor
    context_latents: torch.Tensor
    scene_latents: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    geometry: Any = None  # losses.MaskTargets | None
    names: list[str] | None = None
    prompts: list[str] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.target_latents.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "TrainBatch":
        """Latents and embeddings on ``device`` in ``dtype`` (the model's); the geometry targets stay float32."""

        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype, non_blocking=True)

        same_scene = self.scene_latents is self.context_latents
        ctx = mv(self.context_latents)
        return replace(
            self,
            target_latents=mv(self.target_latents),
            context_latents=ctx,
            scene_latents=ctx if same_scene else mv(self.scene_latents),
            prompt_embeds=mv(self.prompt_embeds),
            pooled_prompt_embeds=mv(self.pooled_prompt_embeds),
            geometry=None if self.geometry is None else self.geometry.to(device),
        )


def stack_one_bucket(values: list[torch.Tensor], what: str) -> torch.Tensor:
    """``torch.stack(values)``, or a ValueError naming ``what`` when the samples come from several buckets."""
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"'{what}' has shapes {sorted(shapes)}; batch samples of one bucket (BucketBatchSampler)")
    return torch.stack(values)


def make_train_batch(items: list[TripletItem], with_scene: bool = True) -> TrainBatch:
    """The :class:`TrainBatch` of the dataset items of one bucket, each with its latents (cached, kept from an
    earlier use, or its pixels encoded by the trainer: :meth:`TripletItem.encoded`) and its prompt embeddings
    (cached, or after :meth:`TripletDataset.encode_prompt_table`).

    ``with_scene=False`` (nothing reads the scene: the geometry terms are off), or an item without the scene's
    latents (no hint drawn), makes the batch's ``scene_latents`` the context's.
    """
    if not items:
        raise ValueError("make_train_batch: empty batch")
    if items[0].prompt_embeds is None or items[0].pooled_prompt_embeds is None:
        raise ValueError(
            "make_train_batch: the items lack ['prompt_embeds', 'pooled_prompt_embeds']; cache the dataset or run "
            "TripletDataset.encode_prompt_table"
        )
    unencoded = [item.name for item in items if item.latents is None]
    if unencoded:
        raise ValueError(
            f"make_train_batch: samples {unencoded} have pixels, not latents; encode them with the VAE first "
            "(TripletItem.encoded)"
        )
    latents = [item.latents for item in items]
    context = stack_one_bucket([z.context for z in latents], "context_latents")
    if with_scene and all(z.scene is not None for z in latents):
        scene = stack_one_bucket([z.scene for z in latents], "scene_latents")
    else:
        scene = context  # no hint drawn (the scene is the context), or nothing reads it
    geometry = None
    if items[0].geometry is not None:
        geometry = MaskTargets(
            **{f: torch.cat([getattr(item.geometry, f) for item in items]).float() for f in GEOMETRY_FIELDS}
        )
    return TrainBatch(
        target_latents=stack_one_bucket([z.target for z in latents], "target_latents"),
        context_latents=context,
        scene_latents=scene,
        prompt_embeds=stack_one_bucket([item.prompt_embeds for item in items], "prompt_embeds"),
        pooled_prompt_embeds=stack_one_bucket([item.pooled_prompt_embeds for item in items], "pooled_prompt_embeds"),
        geometry=geometry,
        names=[item.name for item in items],
        prompts=[item.prompt for item in items],
    )


def dataset_from_config(data_config: Any, source: TripletSource, seed: int, **options: Any) -> TripletDataset:
    """The :class:`TripletDataset` a ``data`` config section (``kontext.training.config.DataConfig``) describes over
    ``source``: its buckets, mask hint, flips and crops and decoded-image budget; the training set and a held-out
    validation set are built the same way.

    ``seed`` seeds flips and crops (``train.seed``); ``options`` are the other :class:`TripletDataset` arguments
    (``cache``, the encoders, the geometry parameters, ``with_geometry``).
    """
    return TripletDataset(
        source,
        resolution=data_config.resolution,
        aspect_buckets=data_config.aspect_buckets,
        mask_hint=data_config.mask_hint,
        outline_width=data_config.outline_width,
        random_flip=data_config.random_flip,
        random_crop=data_config.random_crop,
        decoded_memory_mb=data_config.decoded_memory_mb,
        seed=seed,
        **options,
    )
