"""Tests for the tiny FLUX.1 Kontext: real layout, the committed pretrained weights load and insert,
tokenizers, VAE quality, the build recipe and its cache.

The default tiny model is the committed build (``kontext/tiny/tiny_flux_kontext``): nothing is built. Cache and
builder behaviour is tested on a cheap definition (two VAE and two pretraining steps) in a temporary folder;
a full rebuild, compared with the committed quality, is marked ``rebuild`` and left out of the default run
(``python -m pytest -m rebuild tests/test_tiny_model.py``).
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from data.synthetic import make_triplet
from kontext.tiny import model as tiny

PROMPT = "Insert the Kolo orange soda can into the marked region"
# The VAE must reconstruct synthetic scenes clearly better than a randomly initialised or barely trained one
# (about 13 dB) and clearly better than a plain-MSE trial (~17 dB); the build reaches about 22.8 dB.
MIN_VAE_PSNR_DB = 20.0
# The committed base scores IoU 0.33 and 24.1 dB outside on the samples of the insertion floor test; a random
# transformer scores IoU ~0.01 and ~17 dB (it paints noise over the whole image).
MIN_INSERTION_IOU = 0.15
MIN_PSNR_OUTSIDE_DB = 20.0


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return tiny.tiny_model_path(progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> Any:
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(tiny_dir)


def _cheap_definition(**vae_training: Any) -> dict[str, Any]:
    definition = copy.deepcopy(tiny.TINY_DEFINITION)
    definition["vae_training"].update(steps=2, num_scenes=2, eval_scenes=1, crop=32, batch_size=2)
    definition["vae_training"].update(vae_training)
    definition["pretraining"].update(steps=2, batch_size=2, num_samples=4, eval_samples=1, eval_steps=2, warmup_steps=1)
    return definition


def _image_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0


# ------------------------------------------------------------------------------------- layout and shapes


def test_components_have_the_real_geometry(pipe: Any) -> None:
    vae, transformer = pipe.vae, pipe.transformer
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
    assert pipe.vae_scale_factor == 8
    assert vae.config.latent_channels == 16
    assert vae.config.shift_factor == pytest.approx(0.1159)
    assert vae.config.scaling_factor == pytest.approx(0.3611)
    assert vae.quant_conv is None and vae.post_quant_conv is None
    assert transformer.config.in_channels == 64 and transformer.out_channels == 64
    assert transformer.config.guidance_embeds is True
    assert sum(transformer.config.axes_dims_rope) == transformer.config.attention_head_dim
    assert transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert 1 <= transformer.config.num_layers <= 4 and 1 <= transformer.config.num_single_layers <= 4
    # black-forest-labs/FLUX.1-Kontext-dev scheduler/scheduler_config.json
    expected = {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "num_train_timesteps": 1000,
    }
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    for key, value in expected.items():
        assert pipe.scheduler.config[key] == value, key


def test_vae_latents_and_packed_tokens_have_real_shapes(pipe: Any) -> None:
    x = torch.zeros(1, 3, 128, 96)
    with torch.no_grad():
        z = pipe.vae.encode(x).latent_dist.mode()
        assert z.shape == (1, 16, 16, 12)
        assert pipe.vae.decode(z).sample.shape == (1, 3, 128, 96)
    image = torch.rand(1, 3, 128, 96) * 2 - 1
    latents, image_latents, latent_ids, image_ids = pipe.prepare_latents(
        image, 1, 16, 128, 96, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0)
    )
    n_tokens = (128 // 16) * (96 // 16)
    assert latents.shape == (1, n_tokens, 64)
    assert image_latents.shape == (1, n_tokens, 64)
    assert latent_ids.shape == image_ids.shape == (n_tokens, 3)
    assert torch.all(latent_ids[:, 0] == 0) and torch.all(image_ids[:, 0] == 1)
    torch.testing.assert_close(latent_ids[:, 1:], image_ids[:, 1:])

    prompt_embeds, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=32)
    assert prompt_embeds.shape == (1, 32, pipe.text_encoder_2.config.d_model)
    assert pooled.shape == (1, pipe.text_encoder.config.hidden_size)
    with torch.no_grad():
        out = pipe.transformer(
            hidden_states=torch.cat([latents, image_latents], dim=1),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([2.5]),
            pooled_projections=pooled,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=torch.cat([latent_ids, image_ids], dim=0),
            return_dict=False,
        )[0]
    assert out.shape == (1, 2 * n_tokens, 64)


def test_pipeline_generates_an_image(pipe: Any) -> None:
    context = make_triplet(np.random.default_rng(0), 64, 64).context
    kwargs = dict(
        image=context,
        prompt=PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=2.5,
        max_area=64 * 64,
        _auto_resize=False,
        max_sequence_length=32,
    )
    out = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(out, Image.Image) and out.size == (64, 64)
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_array_equal(np.asarray(out), np.asarray(again))
    latents = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, (64 // 16) ** 2, 64)


def test_tokenizers_encode_a_prompt(pipe: Any) -> None:
    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    ids = clip(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 == clip.model_max_length
    assert ids[0] == clip.bos_token_id
    first_eos = ids.index(clip.eos_token_id)
    # Corpus words are whole tokens: "insert", "the", "kolo" ... one id each, then </w> end-of-word.
    assert first_eos == 1 + len(PROMPT.split())
    assert clip.decode(ids[1:first_eos]) == PROMPT.lower()
    odd = clip("zygomorphic xylophone 42").input_ids
    assert clip.unk_token_id not in odd[1:-1], "byte-level BPE encodes any text"

    t5_ids = t5(PROMPT).input_ids
    assert t5_ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0
    assert len(t5_ids) == len(PROMPT.split()) + 1
    assert t5.decode(t5_ids, skip_special_tokens=True) == PROMPT
    odd_t5 = t5("zygomorphic Xylophone").input_ids
    assert t5.unk_token_id not in odd_t5, "unknown words fall back to single characters"
    padded = t5(PROMPT, padding="max_length", max_length=40).input_ids
    assert len(padded) == 40 and padded[-1] == 0

    with torch.no_grad():
        clip_out = pipe.text_encoder(torch.tensor([ids]))
        t5_out = pipe.text_encoder_2(torch.tensor([padded]))[0]
    assert clip_out.pooler_output.shape == (1, pipe.text_encoder.config.hidden_size)
    assert t5_out.shape == (1, 40, pipe.text_encoder_2.config.d_model)
    assert max(ids) < pipe.text_encoder.config.vocab_size and max(t5_ids) < pipe.text_encoder_2.config.vocab_size


def test_transformer_training_step_reaches_every_parameter(pipe: Any) -> None:
    """Forward + backward at 128x128 px with the context tokens: every transformer weight gets a gradient.

    (Its speed is measured in benchmarks/bench_train_step.py, not asserted here.)
    """
    transformer = pipe.transformer
    n = (128 // 16) ** 2
    ids = pipe._prepare_latent_image_ids(1, 8, 8, torch.device("cpu"), torch.float32)
    ctx_ids = ids.clone()
    ctx_ids[:, 0] = 1
    gen = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 2 * n, 64, generator=gen),
        timestep=torch.tensor([0.7]),
        guidance=torch.tensor([1.0]),
        pooled_projections=torch.randn(1, pipe.transformer.config.pooled_projection_dim, generator=gen),
        encoder_hidden_states=torch.randn(1, 77, pipe.transformer.config.joint_attention_dim, generator=gen),
        txt_ids=torch.zeros(77, 3),
        img_ids=torch.cat([ids, ctx_ids]),
        return_dict=False,
    )
    transformer.requires_grad_(True)
    try:
        out = transformer(**inputs)[0][:, :n]
        out.pow(2).mean().backward()
        assert out.shape == (1, n, 64)
        no_grad = [k for k, p in transformer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
        assert not no_grad, no_grad[:5]
        assert sum(p.grad.abs().sum() > 0 for p in transformer.parameters()) > 0.9 * len(list(transformer.parameters()))
    finally:
        transformer.zero_grad(set_to_none=True)
        transformer.requires_grad_(False)
    assert sum(p.numel() for p in transformer.parameters()) < 2_000_000


# --------------------------------------------------------------------------------------------- the VAE


def _fresh_vae_images(seed: int, n: int = 3) -> dict[str, torch.Tensor]:
    """Images no build saw (a new seed): targets, their contexts, and the grey-filled contexts, ``[n, 3, 128, 128]``."""
    rng = np.random.default_rng(seed)
    kinds: dict[str, list[torch.Tensor]] = {"target": [], "context": [], "grey_fill": []}
    for _ in range(n):
        t = make_triplet(rng, 128, 128)
        grey = np.where(np.asarray(t.mask)[..., None] >= 128, 127.5, np.asarray(t.context, dtype=np.float32))
        kinds["target"].append(_image_tensor(t.target))
        kinds["context"].append(_image_tensor(t.context))
        kinds["grey_fill"].append(_image_tensor(Image.fromarray(grey.astype(np.uint8))))
    return {k: torch.cat(v) for k, v in kinds.items()}


def test_vae_reconstructs_synthetic_scenes(pipe: Any) -> None:
    """Measured here, on images the build never saw: every kind of image the trainer encodes comes back clearly."""
    from kontext.runtime.flux import encode_images

    images = _fresh_vae_images(2024)
    with torch.no_grad():
        for kind, x in images.items():
            psnr = tiny.vae_psnr(pipe.vae, x)
            assert psnr.mean() > MIN_VAE_PSNR_DB, (kind, psnr)
        # Independent check of the PSNR formula on one image.
        x = images["target"][:1]
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        mse01 = float((((recon + 1) / 2 - (x + 1) / 2) ** 2).mean())
        assert float(tiny.vae_psnr(pipe.vae, x)[0]) == pytest.approx(-10 * np.log10(mse01), abs=1e-3)
        # The latents FLUX's shift and scale normalise have a spread of order 1, so noise levels keep their meaning.
        z = encode_images(pipe.vae, torch.cat(list(images.values())))
    assert 0.3 < float(z.std()) < 3.0


# ------------------------------------------------------------------------------ committed, pretrained base


def test_tiny_is_the_committed_build_and_nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    from kontext.tiny.model import resolve_model_path

    def refuse(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("the default tiny model must not be built")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", refuse)
    # The committed build is returned only while it matches the current definition and builder version.
    assert tiny.tiny_model_path(progress=False) == tiny.COMMITTED_DIR
    assert resolve_model_path("tiny") == str(tiny.COMMITTED_DIR)
    size = sum(f.stat().st_size for f in tiny.COMMITTED_DIR.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"committed tiny model is {size / 2**20:.1f} MiB; the budget is 20 MiB"


def test_base_records_its_prompt_length_and_longer_requests_warn(tmp_path: Path) -> None:
    from kontext.runtime.model_path import text_length_warning, trained_text_length

    committed = str(tiny.COMMITTED_DIR)
    assert trained_text_length(committed) == tiny.TINY_DEFINITION["pretraining"]["max_sequence_length"] == 32
    warning = text_length_warning(committed, 512)
    assert warning is not None and "model.max_sequence_length is 512" in warning and "set model.max_sequence_length to 32" in warning
    assert text_length_warning(committed, 32) is None and text_length_warning(committed, 16) is None
    assert "--max-sequence-length is 77" in (text_length_warning(committed, 77, "--max-sequence-length") or "")
    # Nothing recorded, nothing to say: hub ids, folders without build_info.json or without the key.
    assert text_length_warning("black-forest-labs/FLUX.1-Kontext-dev", 512) is None
    assert text_length_warning(str(tmp_path), 512) is None
    (tmp_path / "build_info.json").write_text('{"seed": 0}')
    assert text_length_warning(str(tmp_path), 512) is None


def test_committed_base_inserts_into_the_hinted_region(pipe: Any) -> None:
    """The base edits like FLUX.1 Kontext: it changes the hinted region and keeps the rest of the scene.

    A quick floor on held-out samples of the general insertion task (seed apart from pretraining and from the
    build's own evaluation); a random transformer scores IoU ~0 and PSNR outside ~8 dB here.
    """
    from kontext.tiny.pretrain import insertion_quality

    q = insertion_quality(pipe, num_samples=6, seed=77, num_inference_steps=8)
    assert q["iou"] > MIN_INSERTION_IOU, q
    assert q["psnr_outside"] > MIN_PSNR_OUTSIDE_DB, q


@pytest.mark.rebuild
def test_rebuild_reaches_the_committed_quality(tmp_path: Path, pipe: Any) -> None:
    """The recipe rebuilds the committed model's quality (not its bits: another CPU rounds differently), both
    measured here on the same fresh images and insertion samples."""
    from diffusers import FluxKontextPipeline

    from kontext.tiny.pretrain import insertion_quality

    out = tiny.build_tiny_pipeline(tmp_path / "rebuilt", progress=False)
    rebuilt = FluxKontextPipeline.from_pretrained(out)
    images = torch.cat(list(_fresh_vae_images(7).values()))
    with torch.no_grad():
        psnr_committed = float(tiny.vae_psnr(pipe.vae, images).mean())
        psnr_rebuilt = float(tiny.vae_psnr(rebuilt.vae, images).mean())
    assert psnr_rebuilt > psnr_committed - 1.0
    q_committed = insertion_quality(pipe, num_samples=6, seed=78, num_inference_steps=8)
    q_rebuilt = insertion_quality(rebuilt, num_samples=6, seed=78, num_inference_steps=8)
    assert q_rebuilt["iou"] > q_committed["iou"] - 0.1, (q_rebuilt, q_committed)
    assert q_rebuilt["psnr_outside"] > q_committed["psnr_outside"] - 1.5, (q_rebuilt, q_committed)


# ----------------------------------------------------------------------------------------------- cache


class _CountingBuilder:
    """Wraps the real builder and counts calls (the build itself still happens)."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = tiny.build_tiny_pipeline
        self._lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        with self._lock:
            self.calls += 1
        return self._real(*args, **kwargs)


def test_cache_is_reused_and_rebuilt_when_the_definition_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = _CountingBuilder()
    monkeypatch.setattr(tiny, "build_tiny_pipeline", builder)
    definition = _cheap_definition()

    first = tiny.tiny_model_path(tmp_path, progress=False, definition=definition)
    stamp = (first / "build_info.json").stat().st_mtime_ns
    assert builder.calls == 1
    assert first.name == f"tiny-flux-kontext-{tiny.definition_hash(definition)}"
    assert (first / "model_index.json").is_file()

    second = tiny.tiny_model_path(tmp_path, progress=False, definition=definition)
    assert second == first and builder.calls == 1
    assert (second / "build_info.json").stat().st_mtime_ns == stamp

    changed = _cheap_definition(steps=3)
    third = tiny.tiny_model_path(tmp_path, progress=False, definition=changed)
    assert third != first and builder.calls == 2

    # A new builder version changes the hash even for the same definition.
    monkeypatch.setattr(tiny, "BUILDER_VERSION", tiny.BUILDER_VERSION + 1000)
    fourth = tiny.tiny_model_path(tmp_path, progress=False, definition=definition)
    assert fourth not in (first, third) and builder.calls == 3
    assert not list(tmp_path.glob(".tiny-flux-kontext-*.tmp-*")), "no temporary build folders left behind"


def test_failed_build_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that fails half-way leaves neither the model folder nor its temporary folder."""

    def half_build(out: Path, **kwargs: Any) -> Path:
        (Path(out) / "model_index.json").write_text("{}")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(tiny, "build_tiny_pipeline", half_build)
    definition = _cheap_definition()
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny.tiny_model_path(tmp_path, progress=False, definition=definition)
    assert not (tmp_path / f"tiny-flux-kontext-{tiny.definition_hash(definition)}").exists()
    assert not list(tmp_path.glob(".tiny-flux-kontext-*.tmp-*"))


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    builder = _CountingBuilder()
    monkeypatch.setattr(tiny, "build_tiny_pipeline", builder)
    definition = _cheap_definition()
    results: list[Path] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            results.append(tiny.tiny_model_path(tmp_path, progress=False, definition=definition))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 2 and results[0] == results[1]
    assert builder.calls == 1


def test_build_is_deterministic(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    definition = _cheap_definition()
    a = tiny.build_tiny_pipeline(tmp_path / "a", definition=definition, progress=False)
    b = tiny.build_tiny_pipeline(tmp_path / "b", definition=definition, progress=False)
    # The builder records the prompt length the transformer was trained with.
    assert json.loads((a / "build_info.json").read_text())["max_sequence_length"] == definition["pretraining"]["max_sequence_length"]
    for component in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (fa,) = sorted((a / component).glob("*.safetensors"))
        (fb,) = sorted((b / component).glob("*.safetensors"))
        ta, tb = load_file(fa), load_file(fb)
        assert ta.keys() == tb.keys()
        for key in ta:
            # Same seeds, same process. Multi-threaded kernels may sum in another order, and Adam turns a
            # rounding-level change of a near-zero gradient into a step of up to lr in either direction, so
            # trained weights agree within 2 * lr per step; the untrained text encoders agree to rounding.
            steps = {"vae": definition["vae_training"], "transformer": definition["pretraining"]}.get(component)
            atol = 2.0 * steps["lr"] * steps["steps"] if steps else 1e-6
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=atol, msg=f"{component}/{key}")


def test_rope_axes_must_sum_to_head_dim(tmp_path: Path) -> None:
    definition = _cheap_definition()
    definition["transformer"]["axes_dims_rope"] = [4, 4, 4]
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny.build_tiny_pipeline(tmp_path / "bad", definition=definition, progress=False)
