"""The training dataset: a source, its buckets, transforms, the mask hint, geometry targets and the cache.

Two modes, chosen by ``cache``:

- uncached (``cache=None``): each item is prepared from the images; what depends only on the
  sample is kept in memory (the decoded, resized pixels up to ``decoded_memory_mb``, the geometry
  targets, and, after :meth:`TripletDataset.encode_prompt_table`, the prompt embeddings), so a step
  only flips, draws the hint and encodes with the VAE;
- cached (``cache=LatentCache(...)``, after :func:`data.cache.build_cache`): each item is read
  from the cache; the VAE and text encoders are no longer needed.

:func:`make_train_batch` turns the items of one batch (either mode) into a :class:`TrainBatch`, the
one thing the training step reads.

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

    Items (uncached): ``name``, ``prompt``, ``target_pixels`` [3,H,W] and ``context_pixels``
    [3,H,W] in [-1,1] (hint drawn), ``mask_px`` [1,H,W] in [0,1], ``geometry`` dict of
    ``mask, band, outside, sdm`` each [1,H/8,W/8], with a hint drawn ``scene_pixels`` [3,H,W]
    (the context without it), and ``prompt_embeds`` [L,D] / ``pooled_prompt_embeds`` [Dp] once
    :meth:`encode_prompt_table` has run. Cached: ``name``, ``prompt``, ``target_latents``/
    ``context_latents``/``scene_latents`` [C,H/8,W/8] (the scene's are the context's with
    ``mask_hint: none``), ``prompt_embeds`` [L,D], ``pooled_prompt_embeds`` [Dp], ``geometry``.

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
        self._geometry_memo: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self._prompt_memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._prompt_memo_size = prompt_memo_size
        self._prompt_lock = threading.Lock()  # the trainer's prefetch thread and validation both read prompts
        # Prompt embeddings held in memory (all prompts of the set): filled by encode_prompt_table.
        self._prompt_table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Uncached: decoded images kept between epochs, up to a byte budget (first come, kept for the run).
        self._decoded_budget = max(0, int(decoded_memory_mb)) * 2**20
        self._decoded_bytes = 0
        self._decoded: dict[Any, Any] = {}
        self._latents: dict[tuple[int, bool], dict[str, torch.Tensor]] = {}

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

    def prepared_pixels(self, i: int, flip: bool, raw: RawSample | None = None, rng: Any = None) -> dict[str, torch.Tensor]:
        """Sample ``i`` resized to its bucket: ``context_pixels`` (hint drawn), ``target_pixels``, ``mask_px``, and
        ``scene_pixels`` (the context without the hint) unless ``mask_hint`` is ``none``."""
        raw = self.source.load(i) if raw is None else raw
        p = prepare_sample(raw, self.buckets[self.bucket_ids[i]], flip=flip, crop=self.crop, rng=rng)
        out = {"target_pixels": p["target"], "mask_px": p["mask"]}
        if self.mask_hint == "none":
            out["context_pixels"] = p["context"]
        else:
            out["context_pixels"] = apply_mask_hint(p["context"], p["mask"], self.mask_hint, self._outline_width(i))
            out["scene_pixels"] = p["context"]
        return out

    # -- geometry

    def _geometry(self, i: int, mask_px: torch.Tensor, flip: bool) -> dict[str, torch.Tensor]:
        h, w = self.latent_size(i)
        if self.crop == "random":
            # Every epoch has another window, so there is nothing to reuse.
            return {k: v[0] for k, v in compute_mask_targets(mask_px[None], (h, w), self.band_r, self.sdm_normalize).to_dict().items()}
        # Geometry of a mirrored mask is the mirrored geometry (area pooling at 8x, symmetric
        # morphology and distances), so one computation serves both orientations.
        key = (self.source.fingerprint(i), self.bucket_ids[i])
        if key not in self._geometry_memo:
            upright = torch.flip(mask_px, dims=[-1]) if flip else mask_px
            t = compute_mask_targets(upright[None], (h, w), self.band_r, self.sdm_normalize).to_dict()
            self._geometry_memo[key] = {k: v[0] for k, v in t.items()}
        g = self._geometry_memo[key]
        return {k: torch.flip(v, dims=[-1]) for k, v in g.items()} if flip else {k: v.clone() for k, v in g.items()}

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

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, epoch = (int(key[0]), int(key[1])) if isinstance(key, tuple) else (int(key), self.epoch)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        rng, flip = self._rng_and_flip(i, epoch)
        name = self.source.names[i]
        prompt = self.source.prompt(i)
        if self.cache is not None:
            d = self.cache.load_sample(self.cache_key(i, flip), what=f"sample '{name}' (flip={flip})")
            embeds, pooled = self._prompt_embeds(prompt, name)
            item: dict[str, Any] = {
                "name": name,
                "prompt": prompt,
                "target_latents": d["target_latents"],
                "context_latents": d["context_latents"],
                "scene_latents": d["scene_latents"] if self.mask_hint != "none" else d["context_latents"],
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
            }
            if self.with_geometry:
                item["geometry"] = {f: d[f"geometry.{f}"] for f in GEOMETRY_FIELDS}
            return item
        kept = self._latents.get((i, flip))
        if kept is not None:  # centre crop: encoded on an earlier use (see remember_latents)
            item = {"name": name, "prompt": prompt, **kept}
        else:
            item = {"name": name, "prompt": prompt, **self._pixels(i, flip, rng)}
            if self.crop == "center":
                item["latent_key"] = (i, flip)
        if prompt in self._prompt_table:
            item["prompt_embeds"], item["pooled_prompt_embeds"] = self._prompt_table[prompt]
        if self.with_geometry:
            item["geometry"] = self._geometry(i, item.get("mask_px"), flip)
        return item

    def remember_latents(self, key: tuple[int, bool], latents: dict[str, torch.Tensor]) -> None:
        """Keep the VAE latents of an uncached, centre-cropped item (``latent_key``) for its later uses.

        With a centre crop the pixels of (sample, orientation) never change, and neither do their latents
        (the VAE's mode, no sampling): the first use encodes, later ones read these. They take the place of
        the kept pixels (a twelfth of their float size) in the ``decoded_memory_mb`` budget. ``latents`` holds
        ``target_latents``, ``context_latents`` and, with a hint drawn, ``scene_latents`` (``[16, h, w]`` each).
        """
        if self.crop != "center" or key in self._latents:
            return
        if self.mask_hint != "none" and "scene_latents" not in latents:
            return
        kept = {k: v.detach().to("cpu", torch.float32).clone() for k, v in latents.items()}
        if self.mask_hint == "none":
            kept["scene_latents"] = kept["context_latents"]
        pixels = self._decoded.pop(key, None)
        if pixels is not None:
            self._decoded_bytes -= sum(t.numel() * t.element_size() for t in pixels.values())
        nbytes = sum(t.numel() * t.element_size() for k, t in kept.items() if k != "scene_latents" or self.mask_hint != "none")
        if self._decoded_bytes + nbytes <= self._decoded_budget:
            self._latents[key] = kept
            self._decoded_bytes += nbytes

    # -- decoded images kept in memory (uncached)

    def _keep(self, key: Any, value: Any, nbytes: int) -> None:
        if self._decoded_bytes + nbytes <= self._decoded_budget:
            self._decoded[key] = value
            self._decoded_bytes += nbytes

    def _pixels(self, i: int, flip: bool, rng: Any) -> dict[str, torch.Tensor]:
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
            p = self.prepared_pixels(i, flip, rng=rng)
            scene = p.get("scene_pixels", p["context_pixels"])
            kept = {
                "target": _to_uint8(p["target_pixels"]),
                "scene": _to_uint8(scene),
                "mask_px": p["mask_px"],
            }
            self._keep((i, flip), kept, sum(t.numel() * t.element_size() for t in kept.values()))
            return p
        scene = kept["scene"].float() / 127.5 - 1.0
        out = {"target_pixels": kept["target"].float() / 127.5 - 1.0, "mask_px": kept["mask_px"].clone()}
        if self.mask_hint == "none":
            out["context_pixels"] = scene
        else:
            out["context_pixels"] = apply_mask_hint(scene, kept["mask_px"], self.mask_hint, self._outline_width(i))
            out["scene_pixels"] = scene
        return out


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


def make_train_batch(
    items: list[dict[str, Any]],
    encode_images: EncodeImages | None = None,
    with_scene: bool = True,
    remember: Any = None,
) -> TrainBatch:
    """The :class:`TrainBatch` of dataset items of one bucket: latent items (cached, or kept from an earlier
    use) and pixel items, in any mix.

    The pixel items are encoded with ``encode_images`` (pixels ``[N, 3, H, W]`` in [-1, 1] -> latents
    ``[N, 16, H/8, W/8]``), their targets, contexts and (hint drawn) scenes in one call.
    ``with_scene=False`` (nothing reads the scene: the geometry terms are off) skips encoding the scenes of
    items that will not be remembered; the batch's ``scene_latents`` are then the context's.
    ``remember(latent_key, latents)`` (``TripletDataset.remember_latents``) receives the new latents of each
    item that carries a ``latent_key``. Every item must carry its prompt embeddings (cached, or after
    :meth:`TripletDataset.encode_prompt_table`).
    """
    if not items:
        raise ValueError("make_train_batch: empty batch")
    missing = [k for k in ("prompt_embeds", "pooled_prompt_embeds") if k not in items[0]]
    if missing:
        raise ValueError(
            f"make_train_batch: the items lack {missing}; cache the dataset or run TripletDataset.encode_prompt_table"
        )

    def stack(vals: list[torch.Tensor], what: str) -> torch.Tensor:
        shapes = {tuple(v.shape) for v in vals}
        if len(shapes) > 1:
            raise ValueError(f"make_train_batch: '{what}' has shapes {sorted(shapes)}; batch samples of one bucket")
        return torch.stack(vals)

    latents: list[dict[str, torch.Tensor]] = [{} for _ in items]
    pending = [j for j, it in enumerate(items) if "target_latents" not in it]
    for j, it in enumerate(items):
        if j not in pending:
            latents[j] = {k: it[k] for k in ("target_latents", "context_latents")}
            if it.get("scene_latents", it["context_latents"]) is not it["context_latents"]:
                latents[j]["scene_latents"] = it["scene_latents"]
    if pending:
        if encode_images is None:
            raise ValueError("make_train_batch: pixel items need encode_images")
        keep = remember is not None and any("latent_key" in items[j] for j in pending)
        kinds = ["target", "context"] + (["scene"] if (with_scene or keep) and "scene_pixels" in items[pending[0]] else [])
        pixels = [stack([items[j][f"{k}_pixels"] for j in pending], f"{k}_pixels") for k in kinds]
        with torch.no_grad():
            z = encode_images(torch.cat(pixels)).chunk(len(kinds))  # one VAE call for the batch
        for n, j in enumerate(pending):
            latents[j] = {f"{k}_latents": z[m][n] for m, k in enumerate(kinds)}
            if remember is not None and "latent_key" in items[j]:
                remember(items[j]["latent_key"], latents[j])
    target = stack([d["target_latents"] for d in latents], "target_latents")
    context = stack([d["context_latents"] for d in latents], "context_latents")
    if with_scene and all("scene_latents" in d for d in latents):
        scene = stack([d["scene_latents"] for d in latents], "scene_latents")
    else:
        scene = context  # no hint drawn (the scene is the context), or nothing reads it
    geometry = None
    if "geometry" in items[0]:
        geometry = MaskTargets(**{f: torch.stack([it["geometry"][f] for it in items]).float() for f in GEOMETRY_FIELDS})
    return TrainBatch(
        target_latents=target,
        context_latents=context,
        scene_latents=scene,
        prompt_embeds=stack([it["prompt_embeds"] for it in items], "prompt_embeds"),
        pooled_prompt_embeds=stack([it["pooled_prompt_embeds"] for it in items], "pooled_prompt_embeds"),
        geometry=geometry,
        names=[it["name"] for it in items],
        prompts=[it["prompt"] for it in items],
    )


def collate_triplets(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items of one bucket: tensors stacked on a new dim 0, strings listed, ``geometry`` collated field by field."""
    if not items:
        raise ValueError("collate_triplets: empty batch")
    out: dict[str, Any] = {}
    for k, v in items[0].items():
        vals = [it[k] for it in items]
        if isinstance(v, torch.Tensor):
            shapes = {tuple(x.shape) for x in vals}
            if len(shapes) > 1:
                raise ValueError(
                    f"collate_triplets: '{k}' has shapes {sorted(shapes)}; batch samples of one bucket "
                    "(use BucketBatchSampler)"
                )
            out[k] = torch.stack(vals)
        elif isinstance(v, dict):
            out[k] = collate_triplets(vals)
        else:
            out[k] = vals
    return out
