"""The training dataset: a source, its buckets, transforms, the mask hint, geometry targets and the cache.

Two modes, chosen by ``cache``:

- uncached (``cache=None``): each item is prepared from the images; geometry targets are
  computed once per sample and kept in memory;
- cached (``cache=LatentCache(...)``, after :func:`data.cache.build_cache`): each item is read
  from the cache; the VAE and text encoders are no longer needed.

Per-sample randomness (flip, random crop) is a pure function of (seed, epoch, index); set the
epoch with :meth:`TripletDataset.set_epoch` before each epoch (DataLoader workers copy the
dataset when an iterator starts, so set it before ``iter(loader)`` and do not use
``persistent_workers``), or index with ``(index, epoch)`` tuples.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .buckets import make_buckets, nearest_bucket
from .cache import GEOMETRY_FIELDS, EncodeImages, EncodePrompts, LatentCache, build_cache
from .hint import MASK_HINT_MODES, apply_mask_hint, default_outline_width
from .sources import RawSample, TripletSource
from .transforms import flip_decision, prepare_sample, sample_rng

LATENT_DOWNSAMPLE = 8
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

    Items (uncached): ``name``, ``prompt``, ``target_pixels`` [3,H,W] and ``context_pixels``
    [3,H,W] in [-1,1] (hint drawn), ``mask_px`` [1,H,W] in [0,1], ``geometry`` dict of
    ``mask, band, outside, sdm`` each [1,H/8,W/8], and with a hint drawn ``scene_pixels`` [3,H,W]
    (the context without it). Cached: ``name``, ``prompt``, ``target_latents``/``context_latents``/
    ``scene_latents`` [C,H/8,W/8] (the scene's are the context's with ``mask_hint: none``),
    ``prompt_embeds`` [L,D], ``pooled_prompt_embeds`` [Dp], ``mask_px``, ``geometry``.

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

    def build_cache(self, progress: bool = True, batch_size: int = 4) -> dict[str, int]:
        """Fill the cache with every entry this dataset reads (see :func:`data.cache.build_cache`); returns the counts."""
        if self.encode_images is None or self.encode_prompts is None:
            raise ValueError("build_cache needs encode_images and encode_prompts (pass them to TripletDataset)")
        return build_cache(self, self.encode_images, self.encode_prompts, batch_size=batch_size, progress=progress)

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Epoch used for flips and random crops when indexed by a plain int."""
        self.epoch = int(epoch)

    def latent_size(self, i: int) -> tuple[int, int]:
        """(h, w) latent size of sample ``i`` = its bucket's (H/8, W/8)."""
        w, h = self.buckets[self.bucket_ids[i]]
        return h // LATENT_DOWNSAMPLE, w // LATENT_DOWNSAMPLE

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
        from losses import compute_mask_targets

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
        cache = self.cache
        if cache is None:
            raise ValueError("prompt embeddings come from the cache; this dataset has none")
        key = cache.prompt_key(prompt)
        if key in self._prompt_memo:
            self._prompt_memo.move_to_end(key)
            return self._prompt_memo[key]
        value = cache.load_prompt(key, what=f"the prompt of sample '{name}'")
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
                "mask_px": d["mask_px"].float(),
            }
            if self.with_geometry:
                item["geometry"] = {f: d[f"geometry.{f}"] for f in GEOMETRY_FIELDS}
            return item
        p = self.prepared_pixels(i, flip, rng=rng)
        item = {"name": name, "prompt": prompt, **p}
        if self.with_geometry:
            item["geometry"] = self._geometry(i, p["mask_px"], flip)
        return item


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
