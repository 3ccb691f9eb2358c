"""Generate with FLUX.1 Kontext and one or more trained LoRAs: ``python -m kontext.tools.infer``.

    python -m kontext.tools.infer --model black-forest-labs/FLUX.1-Kontext-dev --lora outputs/bottle \\
        --image scene.png --mask mask.png --prompt "insert the bottle" --composite --out result.png

    python -m kontext.tools.infer --model tiny --lora outputs/tiny:0.8 --lora other.safetensors:0.5 \\
        --image scene.png --prompt "insert the bottle" --mask mask.png --num-images 4 --steps 4 --out results/

``--lora PATH[:STRENGTH]`` takes a training output folder (or checkpoint folder) holding
``pytorch_lora_weights.safetensors``, or a ``.safetensors`` file; give it several times to combine LoRAs.
The mask hint is drawn from ``--mask`` with the code training uses. Mask hint, generation size (the trained
``data.resolution`` and its aspect bucket), prompt length and guidance default to the first LoRA's run (its
folder's ``config.yaml``); each flag overrides. The settings used are logged and stored in every PNG written
(text chunk ``kontext-lora``). See ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from data import make_buckets, nearest_bucket
from data.buckets import BUCKET_MULTIPLE
from data.errors import writing
from data.hint import MASK_HINT_MODES
from data.images import ImageProblem, ImageRef, decode_mask, decode_rgb, open_header
from kontext.runtime.generation import DEFAULT_MAX_AREA, generate
from kontext.tools.common import (
    InferenceError,
    add_model_argument,
    add_runtime_arguments,
    cli_main,
    guidance_setting,
    mask_hint_settings,
    open_pipeline,
    parse_lora_spec,
    prompt_length_setting,
    trained_settings,
)

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# The PNG text chunk that records the settings of a written image.
SETTINGS_CHUNK = "kontext-lora"


# -------------------------------------------------------------------------------------------- files
def open_image(path: str, option: str, mode: str) -> Image.Image:
    """Open ``path`` as an RGB image (``mode`` ``RGB``) or a mask (``L``), with an error naming ``option`` when it cannot.

    Decoded as training decodes its data (``data.images``): EXIF orientation applied, 16-bit greyscale scaled
    (Pillow's own ``convert`` clips it at 255, turning a 16-bit photo white), CMYK and palette converted, and a
    mask held to the training rules (grey and opaque, a 16-bit mask white at 65535).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InferenceError(f"{option} {path!r}: no such file; give the path of an existing image")
    try:
        with open_header(ImageRef(option, path=p)) as im:
            return decode_mask(im) if mode == "L" else decode_rgb(im)
    except ImageProblem as e:
        raise InferenceError(f"{option} {path!r} {e}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InferenceError(f"{option} {path!r}: not a readable image ({e}); give a PNG, JPEG or WebP file") from None


def check_mask_coverage(mask: Image.Image, path: str, composite: bool, hint: str) -> None:
    """Refuse an empty or full ``--mask`` (``L``) that is used, as training refuses such masks: the hint drawn from an
    empty mask marks nothing (the model is not shown where to insert) and ``--composite`` would return the scene
    unchanged; a full one greys out the whole scene. With ``--mask-hint none`` and no ``--composite`` the mask is
    not used, and any mask passes."""
    if hint == "none" and not composite:
        return
    low, high = mask.getextrema()
    if high < 128:
        scale = " (it holds only 0 and 1: scale it to 0 and 255)" if high == 1 else ""
        effect = (
            "with --composite only the masked region is taken from the result, so the output would be --image unchanged"
            if composite else "the mask hint would mark no region, so the model is not shown where the object goes"
        )
        raise InferenceError(
            f"--mask {path!r} is empty: no pixel is white (>= 128; white marks where the object goes){scale}, and "
            f"{effect}. Give a mask that marks the region, or drop --mask{' and --composite' if composite else ''}"
        )
    if low >= 128:
        raise InferenceError(
            f"--mask {path!r} is full: every pixel is white (>= 128), so the whole scene is marked for the object and "
            "nothing of it is kept. Paint the area outside the object black, or drop --mask"
        )


def output_paths(out: str, num_images: int, seeds: Sequence[int]) -> list[Path]:
    """Where the results go: ``out`` itself for one image with an image suffix, ``<stem>-<k><suffix>`` for several;
    otherwise ``out`` is a folder and the files are ``result-seed<seed>.png``."""
    p = Path(out).expanduser()
    if p.suffix.lower() in IMAGE_SUFFIXES:
        if num_images == 1:
            return [p]
        return [p.with_name(f"{p.stem}-{k}{p.suffix}") for k in range(num_images)]
    if p.exists() and not p.is_dir():
        raise InferenceError(f"--out {out!r} is an existing file without an image suffix; give a folder or a .png path")
    return [p / f"result-seed{s}.png" for s in seeds]


def trained_size(image_size: tuple[int, int], trained: dict[str, Any]) -> tuple[int, int] | None:
    """The generation size (W, H) at the LoRA run's ``data.resolution`` for an image of ``image_size``, or None
    without one: the nearest aspect bucket when the run used ``data.aspect_buckets`` (the size training gave
    such an image), else about ``resolution**2`` pixels at the image's aspect ratio, in multiples of 16."""
    resolution = trained.get("resolution")
    if not isinstance(resolution, int) or isinstance(resolution, bool):
        return None
    w, h = image_size
    if trained.get("aspect_buckets"):
        try:
            buckets = make_buckets(resolution, True)
        except ValueError as e:
            raise InferenceError(f"the LoRA run's data.resolution ({trained.get('config')}): {e}") from None
        return buckets[nearest_bucket(w, h, buckets)]
    scale = resolution / math.sqrt(w * h)
    return tuple(max(BUCKET_MULTIPLE, round(v * scale / BUCKET_MULTIPLE) * BUCKET_MULTIPLE) for v in (w, h))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kontext.tools.infer`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m kontext.tools.infer",
        description="Insert an object with FLUX.1 Kontext and trained LoRAs (see docs/inference.md).",
    )
    add_model_argument(ap)
    ap.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="training output folder, checkpoint folder or .safetensors file, optional strength (default 1); "
        "repeatable",
    )
    ap.add_argument("--image", required=True, help="the context image (the scene)")
    ap.add_argument("--prompt", required=True, help="the instruction")
    ap.add_argument("--mask", help="insertion mask (white where the object goes), same size as --image")
    ap.add_argument(
        "--mask-hint",
        choices=MASK_HINT_MODES,
        help="how the mask is drawn into the context (default: as the first LoRA was trained; `fill` without a config)",
    )
    ap.add_argument("--outline-width", type=int, help="band width in pixels of the `outline` hint")
    ap.add_argument("--composite", action="store_true", help="keep the context outside the mask exactly (needs --mask)")
    ap.add_argument("--feather", type=float, default=0.0, metavar="PX", help="soft composite edge, inside the mask")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    ap.add_argument("--num-images", type=int, default=1, help="number of images")
    ap.add_argument("--steps", type=int, default=28, help="sampler steps")
    ap.add_argument(
        "--guidance",
        type=float,
        help="guidance embedding value (default: the LoRA run's validation.guidance_scale, else Kontext's 2.5)",
    )
    size_default = "default: the LoRA run's data.resolution (its aspect bucket), else the image's; <= --max-area"
    ap.add_argument("--height", type=int, help=f"generation height ({size_default})")
    ap.add_argument("--width", type=int, help=f"generation width ({size_default})")
    ap.add_argument("--max-area", type=int, default=DEFAULT_MAX_AREA, help="largest generation area in pixels")
    add_runtime_arguments(ap)
    ap.add_argument("--out", required=True, help="output .png file, or a folder")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Argument checks that need no model; raises :class:`InferenceError`."""
    if args.num_images < 1:
        raise InferenceError(f"--num-images must be >= 1; got {args.num_images}")
    if args.steps < 1:
        raise InferenceError(f"--steps must be >= 1; got {args.steps}")
    for opt in ("height", "width"):
        v = getattr(args, opt)
        if v is not None and v < 16:
            raise InferenceError(f"--{opt} must be at least 16 pixels; got {v}")
    if args.composite and not args.mask:
        raise InferenceError("--composite keeps the scene outside the mask and needs --mask MASK")
    if args.mask_hint in ("fill", "outline") and not args.mask:
        raise InferenceError(f"--mask-hint {args.mask_hint} draws the mask into the image and needs --mask MASK")
    if args.feather < 0:
        raise InferenceError(f"--feather must be >= 0; got {args.feather}")


@contextlib.contextmanager
def generation_progress(pipe: Any, desc: str, **tqdm_kwargs: Any) -> Iterator[None]:
    """Show the pipeline's denoising bar, labelled ``desc``, inside the block; restore the caller's setting after.

    The images of one call are denoised together, so one bar over the sampler steps is the progress of all
    of them. ``tqdm_kwargs`` go to ``tqdm``; by default the bar shows only when stderr is a terminal.
    """
    old = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{"disable": None, "dynamic_ncols": True, **tqdm_kwargs, "desc": desc})
    try:
        yield
    finally:
        pipe._progress_bar_config = old


def run(args: argparse.Namespace) -> list[Path]:
    """Run one inference from parsed arguments; returns the written files."""
    check_args(args)
    specs = [parse_lora_spec(t) for t in args.lora]
    context = open_image(args.image, "--image", "RGB")
    mask = open_image(args.mask, "--mask", "L") if args.mask else None
    if mask is not None and mask.size != context.size:
        raise InferenceError(
            f"--mask {args.mask!r} is {mask.size[0]}x{mask.size[1]} but --image is "
            f"{context.size[0]}x{context.size[1]}; give a mask of the same size"
        )
    trained = trained_settings(specs[0] if specs else None)
    hint, outline_width = mask_hint_settings(args.mask_hint, args.outline_width, trained, has_mask=mask is not None)
    if mask is not None:
        check_mask_coverage(mask, args.mask, args.composite, hint)
    guidance = guidance_setting(args.guidance, trained)
    width, height = args.width, args.height
    if width is None and height is None:
        width, height = trained_size(context.size, trained) or (None, None)
    opened = open_pipeline(args.model, specs, args.device, args.dtype)
    pipe = opened.pipe
    max_sequence_length = prompt_length_setting(args.max_sequence_length, trained, opened.model)
    what = f"generating {args.num_images} image{'s' if args.num_images > 1 else ''}"
    with generation_progress(pipe, what):
        gen = generate(
            pipe,
            context,
            args.prompt,
            mask,
            mask_hint=hint,
            outline_width=outline_width,
            composite=args.composite,
            feather_px=args.feather,
            num_images=args.num_images,
            seed=args.seed,
            num_inference_steps=args.steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            max_area=args.max_area,
            max_sequence_length=max_sequence_length,
        )
    settings = {
        "model": opened.model,
        "loras": [{"path": str(s.path), "strength": s.strength} for s in specs],
        "run_config": trained.get("config"),
        "prompt": args.prompt,
        "size": list(gen.raw_images[0].size),
        "mask_hint": hint,
        "outline_width": outline_width,
        "steps": args.steps,
        "guidance": guidance,
        "max_sequence_length": max_sequence_length,
        "composite": bool(args.composite),
        "feather": args.feather,
    }
    logger.info("settings: %s", json.dumps(settings))
    paths = output_paths(args.out, args.num_images, gen.seeds)
    for p, im, seed in zip(paths, gen.images, gen.seeds):
        with writing(p, "the image", partial=[p]):
            p.parent.mkdir(parents=True, exist_ok=True)
            if p.suffix.lower() == ".png":
                info = PngInfo()
                info.add_text(SETTINGS_CHUNK, json.dumps({**settings, "seed": seed}))
                im.save(p, pnginfo=info)
            else:
                im.save(p)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for a usage error, with the message on stderr)."""
    return cli_main(build_parser(), run, _print_paths, argv)


def _print_paths(paths: list[Path]) -> None:
    for p in paths:
        print(p)


if __name__ == "__main__":
    sys.exit(main())
