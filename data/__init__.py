"""Triplet data for FLUX.1 Kontext LoRA training: (context, target, mask, prompt).

    from data import BucketBatchSampler, TripletDataset, open_source, validate_source
    src = open_source("folder", "datasets/my_product", default_prompt="insert the bottle")
    validate_source(src)                      # every problem at once, before anything expensive
    ds = TripletDataset(src, resolution=512, aspect_buckets=True, mask_hint="fill", random_flip=True, seed=0)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    items = [ds[i] for i in next(iter(sampler))]   # TripletItem: pixels, or latents with a cache; one bucket per batch

Training encodes the items' pixels with the VAE (``TripletItem.encoded``) and batches them with
``data.dataset.make_train_batch``; ``data.split.validation_split`` picks the held-out samples.

See docs/data.md for the folder layout, metadata.jsonl, Hugging Face columns, hints and caching.
"""

from __future__ import annotations

from .buckets import make_buckets, nearest_bucket
from .cache import LatentCache, build_cache, cache_key
from .dataset import SampleLatents, SamplePixels, TripletDataset, TripletItem, dataset_from_config, make_train_batch
from .errors import DatasetError
from .hint import MASK_HINT_MODES, apply_mask_hint, apply_mask_hint_pil, hint_region
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS
from .sampler import BucketBatchSampler
from .sources import FolderSource, HFSource, RawSample, open_configured_source, open_source
from .split import SubsetSource, validation_split
from .transforms import area_resize, crop_box, flip_decision, prepare_sample, sample_rng
from .validate import validate_source

__all__ = [
    "BucketBatchSampler",
    "DEFAULT_MAX_PIXELS",
    "DatasetError",
    "FolderSource",
    "HFSource",
    "IMAGE_EXTENSIONS",
    "LatentCache",
    "MASK_HINT_MODES",
    "RawSample",
    "SampleLatents",
    "SamplePixels",
    "SubsetSource",
    "TripletDataset",
    "TripletItem",
    "apply_mask_hint",
    "apply_mask_hint_pil",
    "area_resize",
    "build_cache",
    "cache_key",
    "crop_box",
    "dataset_from_config",
    "flip_decision",
    "hint_region",
    "make_buckets",
    "make_train_batch",
    "nearest_bucket",
    "open_configured_source",
    "open_source",
    "prepare_sample",
    "sample_rng",
    "validate_source",
    "validation_split",
]
