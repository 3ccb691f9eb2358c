"""Shared generation helper and the inference command, on the real tiny pipeline (CPU, 2 sampler steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.hint import apply_mask_hint
from kontext.runtime.generation import (
    composite_inside_mask,
    feather_alpha,
    fit_size,
    generate,
    mask_array,
    pil_to_tensor,
    to_pil,
)
from kontext.tools.infer import InferenceError, main, parse_lora_spec

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


def make_lora(tiny_model_dir: Path, out: Path, seed: int) -> Path:
    """A random tiny-model LoRA (see conftest.make_random_lora)."""
    from conftest import make_random_lora

    return make_random_lora(tiny_model_dir, out, seed)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: Path):
    from diffusers import FluxKontextPipeline

    p = FluxKontextPipeline.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    """A 64x48 context with texture and a rectangular mask, written as PNGs."""
    d = tmp_path_factory.mktemp("scene")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    img = np.stack([xx * 3, yy * 4, 255 - xx * 2], axis=-1) + rng.integers(0, 20, size=(48, 64, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / "ctx.png")
    m = np.zeros((48, 64), np.uint8)
    m[12:36, 16:44] = 255
    Image.fromarray(m).save(d / "mask.png")
    return {"image": d / "ctx.png", "mask": d / "mask.png", "dir": d}


@pytest.fixture(scope="module")
def loras(tiny_model_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("loras")
    return make_lora(tiny_model_dir, d / "a", 1).parent, make_lora(tiny_model_dir, d / "b", 2).parent


def _open(scene, key, mode):
    return Image.open(scene[key]).convert(mode)


# --------------------------------------------------------------------------------------- generation
def test_generation_keeps_the_sample_size(pipe, scene):
    ctx, mask = _open(scene, "image", "RGB"), _open(scene, "mask", "L")
    out = generate(pipe, ctx, "a bottle", mask, num_inference_steps=STEPS, num_images=2)
    # without max_area=W*H and _auto_resize=False the pipeline would generate at ~1024 px
    assert [im.size for im in out.images] == [(64, 48), (64, 48)]
    assert tuple(out.latents.shape) == (2, 16, 6, 8)
    # one side given: the other follows the aspect ratio (64x48 -> 32x24, floored to 32x16)
    half = generate(pipe, ctx, "a bottle", mask, num_inference_steps=STEPS, width=32)
    assert half.images[0].size == (32, 16) and half.mask.size == (32, 16)
    # sizes that are not multiples of 16 are floored for generation
    assert fit_size(70, 50) == (64, 48)
    assert fit_size(4000, 3000, 1024 * 1024)[0] * fit_size(4000, 3000, 1024 * 1024)[1] <= 1024 * 1024


def test_generation_draws_the_training_hint(pipe, scene):
    ctx, mask = _open(scene, "image", "RGB"), _open(scene, "mask", "L")
    out = generate(pipe, ctx, "a bottle", mask, mask_hint="fill", num_inference_steps=STEPS, seed=3)
    # the hint is the training code's (tensor version), pixel for pixel
    m = torch.from_numpy(np.asarray(mask, np.float32) / 255.0)[None]
    expected = to_pil(apply_mask_hint(pil_to_tensor(ctx)[0], m, "fill"))[0]
    assert np.array_equal(np.asarray(out.hinted_context), np.asarray(expected))
    assert (np.asarray(out.hinted_context)[np.asarray(mask) >= 128] == 128).all()
    # and it is what the model saw: the same result as hinting by hand and generating without a hint
    by_hand = generate(pipe, expected, "a bottle", None, mask_hint="none", num_inference_steps=STEPS, seed=3)
    assert np.array_equal(np.asarray(out.raw_images[0]), np.asarray(by_hand.raw_images[0]))
    plain = generate(pipe, ctx, "a bottle", mask, mask_hint="none", num_inference_steps=STEPS, seed=3)
    assert not np.array_equal(np.asarray(out.raw_images[0]), np.asarray(plain.raw_images[0]))


def test_generation_seeds_are_per_image(pipe, scene):
    ctx, mask = _open(scene, "image", "RGB"), _open(scene, "mask", "L")
    batch = generate(pipe, ctx, "a bottle", mask, num_inference_steps=STEPS, seed=10, num_images=2)
    single = generate(pipe, ctx, "a bottle", mask, num_inference_steps=STEPS, seed=11)
    assert batch.seeds == [10, 11]
    np.testing.assert_allclose(batch.latents[1], single.latents[0], atol=1e-5)
    assert not torch.allclose(batch.latents[0], batch.latents[1])


def test_composite_leaves_the_outside_untouched(pipe, scene):
    ctx, mask = _open(scene, "image", "RGB"), _open(scene, "mask", "L")
    m = np.asarray(mask) >= 128
    for feather in (0.0, 4.0):
        out = generate(pipe, ctx, "a bottle", mask, composite=True, feather_px=feather, num_inference_steps=STEPS)
        res, raw, c = (np.asarray(x) for x in (out.images[0], out.raw_images[0], ctx))
        assert np.array_equal(res[~m], c[~m])
        assert not np.array_equal(res[m], c[m])
        core = feather_alpha(m, feather) == 1.0
        assert core.any() and np.array_equal(res[core], raw[core])
    # a context whose size is not a multiple of 16: generated at 64x48, composited back at 70x50
    big = ctx.resize((70, 50))
    bigm = mask.resize((70, 50), Image.Resampling.NEAREST)
    out = generate(pipe, big, "a bottle", bigm, composite=True, num_inference_steps=STEPS)
    assert out.raw_images[0].size == (64, 48) and out.images[0].size == (70, 50)
    bm = np.asarray(bigm) >= 128
    assert np.array_equal(np.asarray(out.images[0])[~bm], np.asarray(big)[~bm])


def test_feather_and_composite_by_hand():
    m = np.zeros((9, 9), bool)
    m[2:7, 2:7] = True
    a = feather_alpha(m, 2.0)
    assert (a[~m] == 0).all() and a[4, 4] == 1.0 and a[2, 4] == pytest.approx(0.5)
    gen = Image.new("RGB", (9, 9), (200, 0, 0))
    ctx = Image.new("RGB", (9, 9), (0, 0, 100))
    out = np.asarray(composite_inside_mask(gen, ctx, Image.fromarray((m * 255).astype(np.uint8)), 2.0))
    assert tuple(out[0, 0]) == (0, 0, 100) and tuple(out[4, 4]) == (200, 0, 0) and tuple(out[2, 4]) == (100, 0, 50)


def test_generation_errors(pipe, scene):
    ctx = _open(scene, "image", "RGB")
    with pytest.raises(ValueError, match="give a mask"):
        generate(pipe, ctx, "x", None, mask_hint="fill")
    with pytest.raises(ValueError, match="same size"):
        generate(pipe, ctx, "x", Image.new("L", (10, 10)), mask_hint="fill")


# -------------------------------------------------------------------------------------------- CLI
def _args(scene, out, *extra):
    return ["--model", "tiny", "--image", str(scene["image"]), "--prompt", "a bottle", "--steps", str(STEPS), "--max-sequence-length", "64", "--out", str(out), *extra]


def test_infer_writes_n_images(scene, loras, tmp_path, capsys):
    a, _ = loras
    rc = main(_args(scene, tmp_path / "res", "--lora", f"{a}:0.8", "--mask", str(scene["mask"]), "--num-images", "3", "--seed", "5"))
    assert rc == 0
    files = sorted((tmp_path / "res").iterdir())
    assert [f.name for f in files] == ["result-seed5.png", "result-seed6.png", "result-seed7.png"]
    assert all(Image.open(f).size == (64, 48) for f in files)
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    # a file name with two images: numbered beside it
    assert main(_args(scene, tmp_path / "one.png", "--num-images", "2", "--mask", str(scene["mask"]))) == 0
    assert (tmp_path / "one-0.png").is_file() and (tmp_path / "one-1.png").is_file()


def test_infer_lora_strengths(scene, loras, tmp_path):
    a, b = loras
    mask = ["--mask", str(scene["mask"]), "--composite"]

    def run(name, *loras_args):
        assert main(_args(scene, tmp_path / f"{name}.png", *mask, *loras_args)) == 0
        return np.asarray(Image.open(tmp_path / f"{name}.png"))

    base = run("base")
    assert np.array_equal(run("zero", "--lora", f"{a}:0"), base)  # strength 0 is the base model
    full = run("full", "--lora", str(a))
    assert not np.array_equal(full, base)
    # the weights file itself, strength 1 spelled out, and a second LoRA at strength 0 change nothing
    assert np.array_equal(run("file", "--lora", f"{a / 'pytorch_lora_weights.safetensors'}:1.0"), full)
    assert np.array_equal(run("pair", "--lora", str(a), "--lora", f"{b}:0"), full)
    assert not np.array_equal(run("both", "--lora", str(a), "--lora", f"{b}:1"), full)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--lora", "{a}:strong"], "the strength 'strong' after ':' is not a number; write --lora PATH or --lora PATH:0.8"),
        (["--lora", "{missing}:0.5"], "does not exist"),
        (["--composite"], "--composite keeps the scene outside the mask and needs --mask MASK"),
        (["--mask-hint", "outline"], "--mask-hint outline draws the mask into the image and needs --mask MASK"),
        (["--num-images", "0"], "--num-images must be >= 1"),
    ],
)
def test_infer_usage_errors(scene, loras, tmp_path, capsys, extra, needle):
    a, _ = loras
    extra = [e.format(a=a, missing=tmp_path / "nope") for e in extra]
    assert main(_args(scene, tmp_path / "x.png", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert not (tmp_path / "x.png").exists()


def test_infer_missing_image_and_bad_mask(scene, tmp_path, capsys):
    missing = tmp_path / "nope.png"
    args = _args(scene, tmp_path / "x.png")
    args[args.index("--image") + 1] = str(missing)
    assert main(args) == 2
    assert f"--image '{missing}': no such file" in capsys.readouterr().err
    Image.new("L", (10, 10)).save(tmp_path / "small.png")
    assert main(_args(scene, tmp_path / "x.png", "--mask", str(tmp_path / "small.png"))) == 2
    assert "is 10x10 but --image is 64x48" in capsys.readouterr().err


def test_infer_opens_images_as_training_does(tmp_path, capsys):
    """--image/--mask are decoded like training data: a 16-bit greyscale photo keeps its tones (Pillow's convert
    clipped it at 255: an all-white scene), a 16-bit mask is scaled, and a mask training refuses is refused."""
    from kontext.tools.infer import open_image

    grey = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)  # 0 .. 64491
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    ctx = np.asarray(open_image(str(tmp_path / "g16.png"), "--image", "RGB"), dtype=np.int16)
    assert ctx.shape == (48, 64, 3)
    assert np.abs(ctx[..., 0] - np.round(grey / 257.0)).max() <= 1
    m16 = np.zeros((48, 64), np.uint16)
    m16[10:30, 20:40] = 65535
    m16[10:30, 40:42] = 32768
    Image.fromarray(m16).save(tmp_path / "m16.png")
    m = np.asarray(open_image(str(tmp_path / "m16.png"), "--mask", "L"))
    assert m[15, 25] == 255 and m[15, 41] == 128 and m[0, 0] == 0
    red = np.zeros((48, 64, 3), np.uint8)
    red[10:30, 20:40] = (255, 0, 0)
    Image.fromarray(red).save(tmp_path / "red.png")
    with pytest.raises(InferenceError, match=r"--mask '.*red.png' is not single-channel"):
        open_image(str(tmp_path / "red.png"), "--mask", "L")
    low = np.zeros((48, 64), np.uint16)
    low[10:30, 20:40] = 255
    Image.fromarray(low).save(tmp_path / "low16.png")
    with pytest.raises(InferenceError, match="values stop at 255"):
        open_image(str(tmp_path / "low16.png"), "--mask", "L")


@pytest.mark.parametrize(
    "value, extra, needle",
    [
        (0, [], "is empty: no pixel is white (>= 128; white marks where the object goes), and the mask hint would mark no region"),
        (1, [], "(it holds only 0 and 1: scale it to 0 and 255)"),
        (0, ["--composite"], "the output would be --image unchanged"),
        (255, [], "is full: every pixel is white (>= 128)"),
    ],
)
def test_infer_refuses_an_empty_or_full_mask(scene, tmp_path, capsys, value, extra, needle):
    """An all-black mask (or a 0/1 one) generated without complaint when --composite was not given: the hint marked
    nothing, so the model was not shown where to insert. Training refuses such masks; so does inference."""
    Image.new("L", (64, 48), value).save(tmp_path / "m.png")
    assert main(_args(scene, tmp_path / "x.png", "--mask", str(tmp_path / "m.png"), *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --mask '{tmp_path / 'm.png'}' ") and needle in err
    assert not (tmp_path / "x.png").exists()


def test_parse_lora_spec(tmp_path, loras):
    a, _ = loras
    s = parse_lora_spec(f"{a}:0.25")
    assert s.strength == 0.25 and s.path == a / "pytorch_lora_weights.safetensors"
    weird = tmp_path / "odd:name"
    weird.mkdir()
    (weird / "w.safetensors").write_bytes((a / "pytorch_lora_weights.safetensors").read_bytes())
    s = parse_lora_spec(str(weird))  # an existing path with a colon is a path
    assert s.strength == 1.0 and s.weight_name == "w.safetensors"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InferenceError, match="holds no pytorch_lora_weights.safetensors"):
        parse_lora_spec(str(empty))


def _run_folder(tiny_model_dir: Path, out: Path, seed: int, **config) -> Path:
    """A LoRA folder with the ``config.yaml`` a training run leaves beside it (only the given sections)."""
    import yaml

    folder = make_lora(tiny_model_dir, out, seed).parent
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_run_settings_are_the_defaults_and_flags_override(tiny_model_dir, tmp_path, caplog):
    from kontext.tools.common import guidance_setting, prompt_length_setting, trained_settings
    from kontext.tools.infer import trained_size

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (folder / "config.yaml").write_text(
        "model: {max_sequence_length: 24}\ndata: {mask_hint: outline, resolution: 128, aspect_buckets: true}\n"
        "validation: {guidance_scale: 3.5}\n"
    )
    trained = trained_settings(parse_lora_spec(str(folder)))
    assert trained == {"config": str(folder / "config.yaml"), "mask_hint": "outline", "resolution": 128,
                       "aspect_buckets": True, "max_sequence_length": 24, "guidance": 3.5}
    assert trained_settings(parse_lora_spec(str(folder / "pytorch_lora_weights.safetensors"))) == trained
    assert guidance_setting(None, trained) == 3.5 and guidance_setting(1.0, trained) == 1.0
    assert guidance_setting(None, {}) == 2.5
    tiny = str(tiny_model_dir)
    assert prompt_length_setting(None, trained, tiny) == 24
    assert prompt_length_setting(None, {}, tiny) == 32  # the base's own record
    assert prompt_length_setting(None, {}, "black-forest-labs/FLUX.1-Kontext-dev") == 512
    assert not caplog.records
    assert prompt_length_setting(64, trained, tiny) == 64
    assert "--max-sequence-length is 64" in caplog.text and "pass --max-sequence-length 32" in caplog.text
    # Size: the aspect bucket training gave an image of this shape; without buckets, resolution**2 pixels.
    assert trained_size((640, 480), trained) == (144, 112)
    assert trained_size((640, 480), {"resolution": 128}) == (144, 112)
    assert trained_size((100, 100), {"resolution": 128}) == (128, 128)
    assert trained_size((640, 480), {}) is None


def test_infer_generates_as_the_run_trained_and_records_it(scene, tiny_model_dir, tmp_path):
    import json
    import logging

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            library_notes.append(record.getMessage())

    library_notes: list[str] = []
    keep = Keep(logging.WARNING)
    logging.getLogger("diffusers").addHandler(keep)
    logging.getLogger("diffusers").setLevel(logging.WARNING)  # as a fresh process starts

    run = _run_folder(tiny_model_dir, tmp_path / "run", 4, model={"max_sequence_length": 16},
                      data={"resolution": 32, "aspect_buckets": False}, validation={"guidance_scale": 3.0})
    out = tmp_path / "r.png"
    args = ["--model", "tiny", "--image", str(scene["image"]), "--mask", str(scene["mask"]), "--prompt", "a can",
            "--steps", "1", "--lora", str(run), "--out", str(out)]
    try:
        assert main(args) == 0
    finally:
        logging.getLogger("diffusers").removeHandler(keep)
    # e.g. diffusers' note that the LoRA has no text-encoder layers: nothing for the user to act on
    assert not library_notes, library_notes
    image = Image.open(out)
    assert image.size == (32, 32)  # 64x48 at about 32x32 pixels, in multiples of 16
    settings = json.loads(image.text["kontext-lora"])
    assert settings["max_sequence_length"] == 16 and settings["guidance"] == 3.0 and settings["size"] == [32, 32]
    assert settings["run_config"] == str(run / "config.yaml") and settings["seed"] == 0
    assert main(args[:-2] + ["--width", "64", "--guidance", "2.0", "--max-sequence-length", "8", "--out", str(out)]) == 0
    settings = json.loads(Image.open(out).text["kontext-lora"])
    assert settings["size"] == [64, 48] and settings["guidance"] == 2.0 and settings["max_sequence_length"] == 8


@pytest.mark.slow
def test_infer_module_command(scene, loras, tmp_path):
    a, _ = loras
    out = tmp_path / "cli.png"
    cmd = [sys.executable, "-m", "kontext.tools.infer", *_args(scene, out, "--lora", f"{a}:0.5", "--mask", str(scene["mask"]))]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(out).size == (64, 48)  # (its usage errors, exit status 2: test_infer_usage_errors)


def test_generation_progress_shows_one_labelled_bar_and_restores(pipe, scene):
    import io

    from kontext.tools.infer import generation_progress

    buf = io.StringIO()
    before = dict(pipe._progress_bar_config)
    with generation_progress(pipe, "generating 2 images", file=buf, disable=False):
        generate(pipe, _open(scene, "image", "RGB"), "a bottle", _open(scene, "mask", "L"), num_images=2,
                 num_inference_steps=STEPS, max_sequence_length=64)
    assert "generating 2 images" in buf.getvalue() and f"{STEPS}/{STEPS}" in buf.getvalue()
    assert pipe._progress_bar_config == before



def test_generate_decodes_16_bit_images_and_masks_as_training_does(pipe):
    """``generate`` called from Python with a 16-bit greyscale context and mask (as ``Image.open`` gives them):
    scaled 0..65535 -> 0..255 as training reads them, not clipped to white by Pillow's own convert."""
    import numpy as np

    context = Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16))  # mode I;16, a mid grey
    mask16 = np.zeros((64, 64), dtype=np.uint16)
    mask16[16:48, 16:48] = 65535
    mask = Image.fromarray(mask16)
    assert context.mode.startswith("I") and mask.mode.startswith("I")
    out = generate(pipe, context, "a bottle", mask, mask_hint="none", num_inference_steps=1, max_sequence_length=32)
    seen = np.asarray(out.context, dtype=np.float64)
    assert out.context.mode == "RGB" and abs(seen.mean() - 30000 / 257) < 1.0, seen.mean()
    assert mask_array(out.mask).sum() == 32 * 32

# ----------------------------------------------------------------------------------- pipeline loading
def test_load_pipeline_errors_name_the_path_and_the_setting(tmp_path):
    from kontext.runtime.pipeline import PipelineLoadError, load_pipeline

    missing = tmp_path / "no" / "such-model"
    with pytest.raises(PipelineLoadError) as e:
        load_pipeline(str(missing), torch.float32)
    assert f"the folder {missing} does not exist" in str(e.value)
    assert "Point model.pretrained_model_name_or_path at a local diffusers folder (or `tiny`)" in str(e.value)
    # a folder that is not a diffusers pipeline: from_pretrained's OSError, with the login / folder advice
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineLoadError) as e:
        load_pipeline(str(tmp_path / "empty"), torch.float32, option="--model")
    msg = str(e.value)
    assert msg.startswith(f"Could not load FLUX.1 Kontext from {str(tmp_path / 'empty')!r} (")
    assert "`hf auth login`" in msg and "point --model at a local diffusers folder (or `tiny`)" in msg
    with pytest.raises(PipelineLoadError, match="model.quantization must be one of none, nf4, int8; got 'int4'"):
        load_pipeline(str(tmp_path / "empty"), torch.float32, quantization="int4")


def test_infer_reports_an_unloadable_model(scene, tmp_path, capsys):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "FluxKontextPipeline", "vae": ["diffusers", "AutoencoderKL"]}')
    args = _args(scene, tmp_path / "x.png")
    args[args.index("--model") + 1] = str(broken)
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after diffusers' "Loading pipeline components" bar
    assert err.startswith(f"error: Could not load FLUX.1 Kontext from {str(broken)!r}") and "point --model at" in err
    assert not (tmp_path / "x.png").exists()


def test_infer_reports_a_model_path_that_is_neither_folder_nor_hub_id(scene, tmp_path, capsys):
    # The runtime's own error (ModelPathError) reaches the command runner as it is: one line, exit status 2.
    args = _args(scene, tmp_path / "x.png")
    args[args.index("--model") + 1] = str(tmp_path / "no" / "such" / "model")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --model {str(tmp_path / 'no' / 'such' / 'model')!r} is neither an existing folder")
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    from kontext.runtime.model_path import cache_root

    monkeypatch.setenv("KONTEXT_LORA_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.setenv("KONTEXT_LORA_CACHE", "~/kl-cache")
    assert cache_root() == Path.home() / "kl-cache"
    for unset in (monkeypatch.delenv, lambda k: monkeypatch.setenv(k, "")):
        unset("KONTEXT_LORA_CACHE")
        assert cache_root() == Path.home() / ".cache" / "kontext-lora"
