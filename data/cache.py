"""On-disk cache of VAE latents, text embeddings and mask geometry, keyed by content.

Layout under ``cache_dir``::

    samples/ab/<key>.safetensors   context_latents, target_latents, [scene_latents], geometry.{mask,band,outside,sdm}
    prompts/cd/<key>.safetensors   prompt_embeds [L,D], pooled_prompt_embeds [Dp]

A sample key is the SHA-256 of the sample's content fingerprint (the bytes of its three image
files), the transform (bucket, crop, flip, mask hint), the geometry parameters and the model
identity; a prompt key hashes the prompt text and the model identity. Never a step number or a
dataset position: reshuffling, adding or renaming samples cannot pair a caption with the wrong
image, and any change of a pixel, a parameter or the model yields a new key (the old entry is
simply not used; :meth:`LatentCache.prune` removes such entries). Files are written to a
temporary name and renamed, so an interrupted build never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from losses import compute_mask_targets

from .buckets import VAE_SCALE_FACTOR
from .errors import writing

# 2: entries of hinted samples also hold the un-hinted scene's latents (what the geometry terms compare with).
# 3: no pixel mask (training reads only the latent-resolution geometry).
# 4: crop windows in whole source pixels (the resampled pixels moved by a fraction of a pixel).
CACHE_FORMAT = 4
GEOMETRY_FIELDS = ("mask", "band", "outside", "sdm")
SAMPLE_TENSORS = ("context_latents", "target_latents", *(f"geometry.{f}" for f in GEOMETRY_FIELDS))
PROMPT_TENSORS = ("prompt_embeds", "pooled_prompt_embeds")
CACHE_WRITE_FIX = (
    "Free some space there, or set data.cache_dir to a writable folder with room (or data.cache_latents=false "
    "to encode every step instead); entries already written are kept and reused."
)

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodePrompts = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``parts`` (JSON with sorted keys, so dict order does not matter)."""
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with writing(path, "the latent cache entry", fix=CACHE_WRITE_FIX):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _has(path: Path, names: Iterable[str]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(names) <= set(f.keys())
    except Exception:  # noqa: BLE001 - an unreadable entry is rebuilt
        return False


class LatentCache:
    """A cache folder for one model identity.

    cache_dir: where entries live (shared between runs and configs: keys keep them apart).
    model_id: a string that changes whenever the encoders would produce other numbers, e.g. the
    base model's path or hub id with revision and the VAE/text-encoder dtype.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], model_id: str) -> None:
        if not model_id:
            raise ValueError("LatentCache needs a non-empty model_id (e.g. the base model path and dtype)")
        self.root = Path(cache_dir).expanduser().absolute()
        self.model_id = model_id

    def sample_key(self, fingerprint: str, params: dict[str, Any]) -> str:
        """Key of one prepared sample: content fingerprint + transform/geometry ``params`` + model id."""
        return cache_key({"kind": "sample", "fingerprint": fingerprint, "params": params, "model": self.model_id})

    def prompt_key(self, prompt: str) -> str:
        """Key of one prompt's embeddings: the text + model id."""
        return cache_key({"kind": "prompt", "prompt": prompt, "model": self.model_id})

    def sample_path(self, key: str) -> Path:
        """File of one sample entry (two-character shards keep folders small)."""
        return self.root / "samples" / key[:2] / f"{key}.safetensors"

    def prompt_path(self, key: str) -> Path:
        """File of one prompt entry."""
        return self.root / "prompts" / key[:2] / f"{key}.safetensors"

    def has_sample(self, key: str, with_scene: bool = False) -> bool:
        """True if a complete, readable entry exists for ``key`` (holding ``scene_latents`` if ``with_scene``)."""
        return _has(self.sample_path(key), SAMPLE_TENSORS + (("scene_latents",) if with_scene else ()))

    def has_prompt(self, key: str) -> bool:
        """True if a complete, readable prompt entry exists for ``key``."""
        return _has(self.prompt_path(key), PROMPT_TENSORS)

    def save_sample(self, key: str, tensors: dict[str, torch.Tensor], describe: dict[str, Any]) -> None:
        """Write one sample entry (tensors named as in :data:`SAMPLE_TENSORS`); ``describe`` goes into the file's metadata."""
        missing = [n for n in SAMPLE_TENSORS if n not in tensors]
        if missing:
            raise KeyError(f"save_sample: missing tensors {missing}")
        _atomic_save(tensors, self.sample_path(key), {"format": str(CACHE_FORMAT), "describe": json.dumps(describe)})

    def save_prompt(self, key: str, prompt: str, prompt_embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Write one prompt entry: prompt_embeds [L,D], pooled [Dp]."""
        _atomic_save(
            {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled},
            self.prompt_path(key),
            {"format": str(CACHE_FORMAT), "prompt": prompt, "model": self.model_id},
        )

    def _load(self, path: Path, what: str) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"latent cache has no entry for {what} ({path}); build the cache first (data.build_cache) "
                "or turn caching off"
            ) from err
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(f"latent cache entry {path} for {what} is unreadable ({err}); delete it and rebuild") from err

    def load_sample(self, key: str, what: str = "sample") -> dict[str, torch.Tensor]:
        """Tensors of one sample entry (names as in :data:`SAMPLE_TENSORS`)."""
        return self._load(self.sample_path(key), what)

    def load_prompt(self, key: str, what: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [L,D], pooled_prompt_embeds [Dp]) of one prompt."""
        d = self._load(self.prompt_path(key), what)
        return d["prompt_embeds"], d["pooled_prompt_embeds"]

    def prune(self, keep_sample_keys: Iterable[str], keep_prompt_keys: Iterable[str]) -> int:
        """Delete every entry not in the given key sets (e.g. after inputs changed); returns how many were removed.

        Only call this when no other run or configuration shares ``cache_dir``.
        """
        removed = 0
        for sub, keep in (("samples", set(keep_sample_keys)), ("prompts", set(keep_prompt_keys))):
            for p in (self.root / sub).glob("*/*.safetensors"):
                if p.stem not in keep:
                    p.unlink()
                    removed += 1
        return removed


class CacheableDataset(Protocol):
    """What :func:`build_cache` needs from a dataset (``data.dataset.TripletDataset`` provides it)."""

    cache: LatentCache | None
    bucket_ids: list[int]
    buckets: list[tuple[int, int]]
    mask_hint: str  # "none": the context is the scene; otherwise the scene's latents are cached too

    def __len__(self) -> int: ...

    def orientations(self) -> list[bool]:
        """Flip states to cache per sample."""

    def cache_key(self, i: int, flip: bool) -> str:
        """Key of sample ``i`` in orientation ``flip``."""

    def prompt_of(self, i: int) -> str:
        """Prompt of sample ``i``."""

    def prepared_pixels(self, i: int, flip: bool, raw: Any = None) -> Any:
        """A ``data.dataset.SamplePixels``: ``context`` [3,H,W] (hint drawn), ``target`` [3,H,W], ``mask`` [1,H,W],
        and ``scene`` [3,H,W] (the context without the hint) when a hint is drawn."""

    def load_raw(self, i: int) -> Any:
        """Decoded sample ``i`` (a ``RawSample``)."""

    def cache_describe(self, i: int, flip: bool) -> dict[str, Any]:
        """Readable description stored in the entry's metadata."""

    def geometry_params(self) -> dict[str, Any]:
        """``{"band_r": int, "sdm_normalize": bool}`` for ``losses.compute_mask_targets``."""


@torch.no_grad()
def build_cache(
    dataset: CacheableDataset,
    encode_images: EncodeImages,
    encode_prompts: EncodePrompts,
    batch_size: int = 2,
    progress: bool = True,
) -> dict[str, int]:
    """Fill ``dataset.cache`` with every entry the dataset will read; entries already present are reused.

    encode_images: pixels [B,3,H,W] float32 in [-1,1] (mask hint already drawn on contexts) ->
    latents [B,C,H/8,W/8] (e.g. ``(vae.encode(x).latent_dist.mode() - shift) * scale``).
    encode_prompts: list of B prompts -> (prompt_embeds [B,L,D], pooled [B,Dp]).
    batch_size: the most images per ``encode_images`` call and prompts per ``encode_prompts`` call (the
    activations of these calls are the memory peak of the cache build). The context, target and (for
    hinted samples) scene images of a sample always go through one call, so a call holds
    ``max(1, batch_size // images per sample)`` samples.
    With flips on, both orientations of every sample are cached. Returns counts
    ``{"samples_built", "samples_reused", "prompts_built", "prompts_reused"}``.
    """
    cache = dataset.cache
    if cache is None:
        raise ValueError("build_cache: the dataset has no LatentCache (pass cache=LatentCache(...) to TripletDataset)")
    if batch_size < 1:
        raise ValueError(f"build_cache: batch_size must be >= 1, got {batch_size}")
    todo: list[tuple[int, int, bool, str]] = []
    reused = 0
    hinted = dataset.mask_hint != "none"
    for i in range(len(dataset)):
        for fl in dataset.orientations():
            key = dataset.cache_key(i, fl)
            if cache.has_sample(key, with_scene=hinted):
                reused += 1
            else:
                todo.append((dataset.bucket_ids[i], i, fl, key))
    todo.sort()  # by bucket, so a batch has one size
    geometry_params = dataset.geometry_params()
    kinds = ["context", "target"] + (["scene"] if hinted else [])
    per_call = max(1, batch_size // len(kinds))
    bar = tqdm(total=len(todo), desc="Caching latents", unit="image", disable=not progress or not todo)
    k = 0
    while k < len(todo):
        bucket = todo[k][0]
        chunk = [t for t in todo[k : k + per_call] if t[0] == bucket]
        k += len(chunk)
        raws: dict[int, Any] = {}
        prepared = []
        for _, i, fl, _ in chunk:
            if i not in raws:
                raws[i] = dataset.load_raw(i)
            prepared.append(dataset.prepared_pixels(i, fl, raws[i]))
        n = len(chunk)
        pixels = torch.stack([getattr(p, kind) for kind in kinds for p in prepared])
        latents = encode_images(pixels)
        h, w = pixels.shape[-2] // VAE_SCALE_FACTOR, pixels.shape[-1] // VAE_SCALE_FACTOR
        if latents.dim() != 4 or latents.shape[0] != len(kinds) * n or tuple(latents.shape[-2:]) != (h, w):
            raise ValueError(
                f"encode_images returned {tuple(latents.shape)} for pixels {tuple(pixels.shape)}; expected "
                f"[{len(kinds) * n}, C, {h}, {w}] (8x downsampling)"
            )
        masks = torch.stack([p.mask for p in prepared])
        geo = compute_mask_targets(
            masks, (h, w), band_r=geometry_params["band_r"], sdm_normalize=geometry_params["sdm_normalize"]
        ).to_dict()
        for j, (_, i, fl, key) in enumerate(chunk):
            tensors = {
                "context_latents": latents[j].clone(),
                "target_latents": latents[n + j].clone(),
                **({"scene_latents": latents[2 * n + j].clone()} if hinted else {}),
                **{f"geometry.{f}": geo[f][j].clone() for f in GEOMETRY_FIELDS},
            }
            cache.save_sample(key, tensors, dataset.cache_describe(i, fl))
        bar.update(n)
    bar.close()

    prompts = sorted({dataset.prompt_of(i) for i in range(len(dataset))})
    missing = [p for p in prompts if not cache.has_prompt(cache.prompt_key(p))]
    for s in tqdm(range(0, len(missing), batch_size), desc="Caching prompts", unit="batch", disable=not progress or not missing):
        batch = missing[s : s + batch_size]
        embeds, pooled = encode_prompts(batch)
        if embeds.shape[0] != len(batch) or pooled.shape[0] != len(batch):
            raise ValueError(
                f"encode_prompts returned {tuple(embeds.shape)} and {tuple(pooled.shape)} for {len(batch)} prompts"
            )
        for j, p in enumerate(batch):
            cache.save_prompt(cache.prompt_key(p), p, embeds[j].clone(), pooled[j].clone())
    return {
        "samples_built": len(todo),
        "samples_reused": reused,
        "prompts_built": len(missing),
        "prompts_reused": len(prompts) - len(missing),
    }
