"""The latent cache: keys follow content and parameters only, entries round-trip, uncached and cached agree.

Encoders are real: a tiny diffusers AutoencoderKL (8x, 16 latent channels) and a tiny byte-level
text encoder, both randomly initialised with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data.dataset
import losses
from data import (
    BucketBatchSampler,
    FolderSource,
    LatentCache,
    TripletDataset,
    build_cache,
    make_buckets,
    make_train_batch,
    validate_source,
)
from data.dataset import TrainBatch
from kontext.training.inputs import encode_items, train_batch

# One sample has its own prompt and the rest use the default (prompts key the cache by their text): expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*have no prompt of their own:data.validate.DatasetWarning")

SHIFT, SCALE = 0.1159, 0.3611  # FLUX.1's VAE shift and scaling factors


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    ).eval()
    return model


@pytest.fixture(scope="module")
def encoders(vae):
    torch.manual_seed(1)
    emb = torch.nn.Embedding(256, 12)
    proj = torch.nn.Linear(12, 6)

    @torch.no_grad()
    def encode_images(x: torch.Tensor) -> torch.Tensor:
        encode_images.calls += x.shape[0]
        return (vae.encode(x).latent_dist.mode() - SHIFT) * SCALE

    @torch.no_grad()
    def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encode_prompts.calls += len(prompts)
        ids = torch.zeros(len(prompts), 10, dtype=torch.long)
        for k, p in enumerate(prompts):
            b = list(p.encode("utf-8"))[:10]
            ids[k, : len(b)] = torch.tensor(b)
        seq = emb(ids)
        return seq, proj(seq.mean(1))

    encode_images.calls = 0
    encode_prompts.calls = 0
    return encode_images, encode_prompts


def _write(root: Path, n: int = 4) -> None:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (48, 64), (64, 64), (80, 48)]
    for k in range(n):
        w, h = sizes[k % len(sizes)]
        ctx = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 5 : h // 2 + k, w // 6 : w // 2] = 255
        tgt = ctx.copy()
        tgt[mask > 0] = rng.integers(0, 256, 3)
        for role, arr in (("context", ctx), ("target", tgt), ("mask", mask)):
            (root / role).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / role / f"s{k}.png")
    (root / "prompts").mkdir(exist_ok=True)
    (root / "prompts" / "s1.txt").write_text("insert the cube, small")


def _dataset(root: Path, cache: LatentCache | None, **kw) -> TripletDataset:
    src = FolderSource(root, default_prompt="insert the cube")
    validate_source(src, progress=False)
    args = dict(resolution=64, aspect_buckets=True, mask_hint="fill", random_flip=True, seed=11, cache=cache)
    args.update(kw)
    return TripletDataset(src, **args)


def _keys(ds: TripletDataset) -> dict[tuple[str, bool], str]:
    return {(ds.source.names[i], f): ds.cache_key(i, f) for i in range(len(ds)) for f in ds.orientations()}


def test_keys_change_with_pixels_and_parameters_only(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write(root)
    cache = LatentCache(tmp_path / "cache", model_id="tiny-vae@fp32")
    base = _keys(_dataset(root, cache))
    assert len(set(base.values())) == len(base) == 8
    assert _keys(_dataset(root, cache)) == base, "stable across runs"
    # Reordering (a rename moves the sample to the end of the sorted list) keeps every key.
    for role in ("context", "target", "mask"):
        (root / role / "s0.png").rename(root / role / "zz.png")
    renamed = _keys(_dataset(root, cache))
    assert {k: v for k, v in renamed.items() if k[0] != "zz"} == {k: v for k, v in base.items() if k[0] != "s0"}
    assert renamed[("zz", True)] == base[("s0", True)]
    # One context pixel changes that sample's keys and no other.
    arr = np.asarray(Image.open(root / "context" / "s2.png")).copy()
    arr[0, 0, 0] ^= 1
    Image.fromarray(arr).save(root / "context" / "s2.png")
    edited = _keys(_dataset(root, cache))
    assert [k for k in edited if edited[k] != renamed[k]] == [("s2", False), ("s2", True)]
    # Every transform, geometry or model parameter changes every key.
    variants = {
        "resolution": dict(buckets=make_buckets(128, aspect_buckets=True)),
        "hint": dict(mask_hint="outline"),
        "outline width": dict(mask_hint="outline", outline_width=3),
        "band": dict(band_r=2),
        "sdm": dict(sdm_normalize=False),
        "model": dict(cache=LatentCache(tmp_path / "cache", model_id="tiny-vae@bf16")),
    }
    for what, kw in variants.items():
        other = _keys(_dataset(root, **{"cache": cache, **kw}))
        assert not set(other.values()) & set(edited.values()), what
    # Fixed 64x64 buckets: the square sample s2 is processed exactly as before (same key), the others not.
    fixed = _keys(_dataset(root, cache, buckets=make_buckets(64, aspect_buckets=False)))
    assert [k for k in fixed if fixed[k] == edited[k]] == [("s2", False), ("s2", True)]
    # Orientation is part of the key; the seed (which only picks the orientation) is not.
    assert _keys(_dataset(root, cache, seed=999)) == edited


def test_cached_items_equal_fresh_computation_and_are_reused(tmp_path: Path, encoders) -> None:
    encode_images, encode_prompts = encoders
    root = tmp_path / "set"
    _write(root)
    cache = LatentCache(tmp_path / "cache", model_id="tiny")
    cached = _dataset(root, cache)
    cached.encode_images, cached.encode_prompts = encode_images, encode_prompts
    stats = cached.build_cache(progress=False, batch_size=3)
    assert stats == {"samples_built": 8, "samples_reused": 0, "prompts_built": 2, "prompts_reused": 0}
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 10 and not list((tmp_path / "cache").rglob(".tmp-*"))

    fresh = _dataset(root, None)
    for epoch in (0, 1, 2):
        cached.set_epoch(epoch)
        fresh.set_epoch(epoch)
        for i in range(len(fresh)):
            c, f = cached[i], fresh[i]
            assert c.name == f.name and c.prompt == f.prompt
            assert c.pixels is None and f.latents is None  # training reads the latent-resolution geometry only
            h, w = f.pixels.mask.shape[-2] // 8, f.pixels.mask.shape[-1] // 8
            assert c.latents.target.shape == c.latents.context.shape == (16, h, w)
            lat = encode_images(torch.stack([f.pixels.context, f.pixels.target, f.pixels.scene]))
            torch.testing.assert_close(c.latents.context, lat[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.latents.target, lat[1], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c.latents.scene, lat[2], atol=1e-5, rtol=1e-5)
            for g in ("mask", "band", "outside", "sdm"):
                assert getattr(c.geometry, g).shape == (1, 1, h, w)
                torch.testing.assert_close(getattr(c.geometry, g), getattr(f.geometry, g), atol=1e-3, rtol=0)
            pe, pooled = encode_prompts([f.prompt])
            torch.testing.assert_close(c.prompt_embeds, pe[0])
            torch.testing.assert_close(c.pooled_prompt_embeds, pooled[0])
    # The hint went into the context latents and not into the scene's: the scene is the un-hinted context.
    plain = _dataset(root, None, mask_hint="none")
    assert plain[0].pixels.scene is None
    raw_lat = encode_images(plain[0].pixels.context[None])[0]
    assert not torch.allclose(raw_lat, cached[(0, 0)].latents.context, atol=1e-3)
    torch.testing.assert_close(raw_lat, cached[(0, 0)].latents.scene, atol=1e-5, rtol=1e-5)
    hinted_px, scene_px, mask_px = fresh[(0, 0)].pixels.context, fresh[(0, 0)].pixels.scene, fresh[(0, 0)].pixels.mask
    assert torch.equal(hinted_px != scene_px, (mask_px >= 0.5).expand_as(hinted_px) & (scene_px != 0))

    # A second build reuses everything; editing one target rebuilds exactly its two orientations.
    calls = encode_images.calls
    again = build_cache(_dataset(root, cache), encode_images, encode_prompts, progress=False)
    assert again == {"samples_built": 0, "samples_reused": 8, "prompts_built": 0, "prompts_reused": 2}
    assert encode_images.calls == calls
    arr = np.asarray(Image.open(root / "target" / "s3.png")).copy()
    arr[5, 5] = 255 - arr[5, 5]
    Image.fromarray(arr).save(root / "target" / "s3.png")
    (root / "prompts" / "s1.txt").write_text("insert the cube, large")
    third = build_cache(_dataset(root, cache), encode_images, encode_prompts, progress=False)
    assert third == {"samples_built": 2, "samples_reused": 6, "prompts_built": 1, "prompts_reused": 1}
    # A half-written (corrupt) entry is rebuilt rather than trusted.
    victim = cache.sample_path(_dataset(root, cache).cache_key(0, True))
    victim.write_bytes(victim.read_bytes()[:100])
    assert build_cache(_dataset(root, cache), encode_images, encode_prompts, progress=False)["samples_built"] == 1
    removed = cache.prune(_keys(_dataset(root, cache)).values(), [cache.prompt_key(p) for p in ("insert the cube", "insert the cube, large")])
    assert removed == 3  # the two stale orientations of s3 and the old prompt


def test_batches_through_the_sampler(tmp_path: Path, encoders) -> None:
    root = tmp_path / "set"
    _write(root, n=8)
    cache = LatentCache(tmp_path / "cache", model_id="tiny")
    ds = _dataset(root, cache)
    build_cache(ds, *encoders, progress=False)
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    n = 0
    for indices in sampler:
        n += 1
        batch = make_train_batch([ds[i] for i in indices])
        b, c, h, w = batch.target_latents.shape
        assert (b, c) == (2, 16) and batch.context_latents.shape == batch.scene_latents.shape == (2, 16, h, w)
        assert batch.prompt_embeds.shape == (2, 10, 12) and batch.pooled_prompt_embeds.shape == (2, 6)
        assert {k: v.shape for k, v in batch.geometry.to_dict().items()} == {
            g: (2, 1, h, w) for g in ("mask", "band", "outside", "sdm")
        }
        assert batch.names == [ds.source.names[i] for i in indices] and all(isinstance(p, str) for p in batch.prompts)
    assert n == len(sampler) == 4
    # Samples of two buckets, or pixels nobody encoded, are refused with the fix.
    other_bucket = next(i for i in range(len(ds)) if ds.bucket_ids[i] != ds.bucket_ids[0])
    with pytest.raises(ValueError, match="batch samples of one bucket"):
        make_train_batch([ds[0], ds[other_bucket]])
    fresh = _dataset(root, None, encode_prompts=encoders[1])
    fresh.encode_prompt_table()
    with pytest.raises(ValueError, match="encode them with the VAE first"):
        make_train_batch([fresh[i] for i in next(iter(sampler))])


def test_geometry_computed_once_per_sample_without_cache(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "set"
    _write(root)
    calls = []
    real = losses.compute_mask_targets

    def counting(mask_px, *a, **k):
        calls.append(mask_px.shape)
        return real(mask_px, *a, **k)

    monkeypatch.setattr(data.dataset, "compute_mask_targets", counting)
    ds = _dataset(root, None)
    for epoch in range(4):  # flips vary across epochs; both orientations come from one computation
        ds.set_epoch(epoch)
        items = [ds[i] for i in range(len(ds))]
    assert len(calls) == len(ds)
    flips = {
        (e, i): bool(torch.equal(ds[(i, e)].pixels.mask, ds[(i, 0)].pixels.mask.flip(-1)))
        for e in range(4)
        for i in range(4)
    }
    assert len(set(flips.values())) == 2, "some samples appear mirrored, some not"
    direct = real(items[0].pixels.mask[None], ds.latent_size(0), 1, True).to_dict()
    for g, v in direct.items():
        torch.testing.assert_close(getattr(items[0].geometry, g), v)


def test_geometry_of_mirrored_mask_is_mirrored_geometry() -> None:
    rng = np.random.default_rng(0)
    m = torch.from_numpy((rng.random((3, 1, 64, 96)) > 0.6).astype(np.float32))
    m = torch.nn.functional.avg_pool2d(m, 5, 1, 2)  # soft, irregular
    a = losses.compute_mask_targets(m.flip(-1), (8, 12), band_r=1, sdm_normalize=True).to_dict()
    b = losses.compute_mask_targets(m, (8, 12), band_r=1, sdm_normalize=True).to_dict()
    for g in a:
        torch.testing.assert_close(a[g], b[g].flip(-1))


def test_cache_misuse_is_explained(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _write(root)
    cache = LatentCache(tmp_path / "cache", model_id="tiny")
    with pytest.raises(ValueError, match="data.random_crop cannot be cached"):
        _dataset(root, cache, random_crop=True)
    with pytest.raises(ValueError, match="needs encode_images and encode_prompts"):
        _dataset(root, cache).build_cache(progress=False)
    with pytest.raises(FileNotFoundError, match="build the cache first"):
        _dataset(root, cache)[0]


def test_cache_build_bounds_the_images_per_encoder_call(tmp_path: Path, encoders) -> None:
    encode_images, encode_prompts = encoders
    root = tmp_path / "set"
    _write(root, n=8)
    sizes: list[int] = []

    def recording(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        return encode_images(x)

    ds = _dataset(root, LatentCache(tmp_path / "cache", model_id="tiny"))
    assert build_cache(ds, recording, encode_prompts, batch_size=6, progress=False)["samples_built"] == 16
    assert max(sizes) == 6 and sum(sizes) == 16 * 3  # two hinted samples (context, target, scene) per call
    sizes.clear()
    ds2 = _dataset(root, LatentCache(tmp_path / "cache2", model_id="tiny"))
    build_cache(ds2, recording, encode_prompts, batch_size=1, progress=False)
    assert set(sizes) == {3}  # never fewer than one sample's images


def test_uncached_batches_equal_cached_ones_and_reuse_decoded_images(tmp_path: Path, encoders, monkeypatch) -> None:
    """One batch contract: a TrainBatch from pixel items (one VAE call) equals the one read from the cache."""
    encode_images, encode_prompts = encoders
    root = tmp_path / "set"
    _write(root, n=8)
    cached = _dataset(root, LatentCache(tmp_path / "cache", model_id="tiny"))
    build_cache(cached, encode_images, encode_prompts, progress=False)
    fresh = _dataset(root, None, encode_prompts=encode_prompts)
    with pytest.raises(ValueError, match="encode_prompt_table"):
        make_train_batch(encode_items([fresh[0]], encode_images, with_scene=True))
    prompt_calls = encode_prompts.calls
    assert fresh.encode_prompt_table(batch_size=1) == 2  # two distinct prompts, encoded once for the run
    assert encode_prompts.calls == prompt_calls + 2
    loads: list[int] = []
    real_load = fresh.source.load
    monkeypatch.setattr(fresh.source, "load", lambda i: loads.append(i) or real_load(i))
    sampler = BucketBatchSampler(fresh.bucket_ids, batch_size=2, seed=0)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        cached.set_epoch(epoch)
        fresh.set_epoch(epoch)
        for indices in sampler:
            calls = encode_images.calls
            a = make_train_batch(encode_items([fresh[i] for i in indices], encode_images, with_scene=True))
            assert encode_images.calls == calls + 3 * len(indices)
            b = make_train_batch([cached[i] for i in indices])
            assert isinstance(a, TrainBatch) and a.names == b.names and a.prompts == b.prompts
            for name in ("target_latents", "context_latents", "scene_latents", "prompt_embeds", "pooled_prompt_embeds"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5)
            for g in ("mask", "band", "outside", "sdm"):
                torch.testing.assert_close(getattr(a.geometry, g), getattr(b.geometry, g))
            assert a.geometry.mask.shape == (len(indices), 1, *a.target_latents.shape[-2:])
    # Each (sample, orientation) was decoded once (one of them before the count began, for the error above);
    # later epochs read the images kept in memory.
    assert len(loads) + 1 == len(fresh._decoded) <= 16
    assert len(set(loads)) <= 8 and len(loads) < 3 * 8
    # Kept images give the very pixels a decode gives.
    plain = _dataset(root, None, decoded_memory_mb=0)
    for key in list(fresh._decoded)[:4]:
        i, flip = key
        e = next(e for e in range(8) if fresh._rng_and_flip(i, e)[1] == flip)
        for k in ("context", "target", "scene", "mask"):
            assert torch.equal(getattr(fresh[(i, e)].pixels, k), getattr(plain[(i, e)].pixels, k)), k
    assert not plain._decoded


def test_train_batch_to_device_keeps_the_geometry_float32(tmp_path: Path, encoders) -> None:
    root = tmp_path / "set"
    _write(root, n=4)
    ds = _dataset(root, LatentCache(tmp_path / "cache", model_id="tiny"), mask_hint="none")
    build_cache(ds, *encoders, progress=False)
    batch = make_train_batch([ds[2]]).to("cpu", torch.bfloat16)
    assert batch.target_latents.dtype == batch.prompt_embeds.dtype == torch.bfloat16
    assert batch.scene_latents is batch.context_latents  # no hint: the scene is the context
    assert batch.geometry.sdm.dtype == torch.float32


def test_centre_cropped_uncached_latents_are_encoded_once_and_equal_fresh_ones(tmp_path: Path, encoders) -> None:
    encode_images, encode_prompts = encoders
    root = tmp_path / "set"
    _write(root, n=8)
    ds = _dataset(root, None, encode_prompts=encode_prompts)
    ds.encode_prompt_table()
    sampler = BucketBatchSampler(ds.bucket_ids, batch_size=2, seed=0)
    encoded_per_epoch = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        calls = encode_images.calls
        for indices in sampler:
            got = train_batch(ds, indices, epoch, encode_images, with_scene=epoch % 2 == 0)
            fresh = [ds.prepared_pixels(i, ds._rng_and_flip(i, epoch)[1]) for i in indices]
            want = encode_images(torch.stack([getattr(f, k) for k in ("target", "context", "scene") for f in fresh]))
            n = len(indices)
            torch.testing.assert_close(got.target_latents, want[:n])
            torch.testing.assert_close(got.context_latents, want[n : 2 * n])
            if epoch % 2 == 0:
                torch.testing.assert_close(got.scene_latents, want[2 * n :])
            else:
                assert got.scene_latents is got.context_latents  # geometry off: the scene is not read
        encoded_per_epoch.append(encode_images.calls - calls - 3 * 8)  # minus the reference encodes above
    # 16 (sample, orientation) pairs: each encoded (3 images) on its first use only.
    assert sum(encoded_per_epoch) == 3 * len(ds._latents) and len(ds._latents) <= 16
    assert encoded_per_epoch[0] > 0 and encoded_per_epoch[-1] < encoded_per_epoch[0]
    assert not any(key in ds._decoded for key in ds._latents)  # the latents replaced the kept pixels
    # Random crops change every epoch: nothing is kept.
    rc = _dataset(root, None, random_crop=True, encode_prompts=encode_prompts)
    rc.encode_prompt_table()
    batch = train_batch(rc, [0, 4] if rc.bucket_ids[0] == rc.bucket_ids[4] else [0], 0, encode_images, with_scene=True)
    assert batch.scene_latents is not batch.context_latents and not rc._latents
