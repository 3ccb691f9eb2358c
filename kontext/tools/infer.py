"""Generate with FLUX.1 Kontext and one or more trained LoRAs: ``python -m kontext.tools.infer``.

    python -m kontext.tools.infer --model black-forest-labs/FLUX.1-Kontext-dev --lora outputs/bottle \\
        --image scene.png --mask mask.png --prompt "insert the bottle" --composite --out result.png

    python -m kontext.tools.infer --model tiny --lora outputs/tiny:0.8 --lora other.safetensors:0.5 \\
        --image scene.png --prompt "insert the bottle" --mask mask.png --num-images 4 --steps 4 --out results/

``--lora PATH[:STRENGTH]`` takes a training output folder (or checkpoint folder) holding
``pytorch_lora_weights.safetensors``, or a ``.safetensors`` file; give it several times to combine LoRAs.
The mask hint is drawn from ``--mask`` with the code training uses; by default it is the one the first LoRA
was trained with (its folder's ``config.yaml``). See ``docs/inference.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image, UnidentifiedImageError

from data.hint import MASK_HINT_MODES
from kontext.runtime.dtypes import DTYPES
from kontext.runtime.generation import DEFAULT_MAX_AREA, generate
from kontext.runtime.lora import LORA_WEIGHTS_NAME

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class InferenceError(ValueError):
    """A command-line or input problem; the message names the argument and the fix."""


# ------------------------------------------------------------------------------------------- model
def resolve_model(name_or_path: str, option: str = "--model") -> str:
    """``tiny``, a diffusers folder or a hub id -> what ``from_pretrained`` takes (see ``kontext.runtime.model_path``)."""
    from kontext.runtime.model_path import ModelPathError, resolve_model_path

    try:
        return resolve_model_path(name_or_path, option)
    except ModelPathError as e:
        raise InferenceError(str(e)) from None


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(model: str, device: torch.device | str | None = None, dtype: str | None = None) -> Any:
    """Load ``FluxKontextPipeline`` from a resolved model path or hub id onto ``device``.

    ``dtype`` defaults to bfloat16 on CUDA and float32 on the CPU (where bf16 matmuls are slow).
    """
    from diffusers import FluxKontextPipeline

    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    try:
        pipe = FluxKontextPipeline.from_pretrained(model, dtype=DTYPES[dtype])
    except OSError as e:
        raise InferenceError(
            f"could not load FLUX.1 Kontext from {model!r} ({e}); for the gated hub model run `huggingface-cli login` "
            "after accepting its licence, or pass --model with a local diffusers folder or `tiny`"
        ) from None
    return pipe.to(device)


# -------------------------------------------------------------------------------------------- LoRAs
@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora PATH[:STRENGTH]``: the folder and file name of the weights, and the strength."""

    folder: Path
    weight_name: str
    strength: float
    text: str

    @property
    def path(self) -> Path:
        """The weights file."""
        return self.folder / self.weight_name


def _weights_in(folder: Path, option: str, text: str) -> str:
    if (folder / LORA_WEIGHTS_NAME).is_file():
        return LORA_WEIGHTS_NAME
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InferenceError(
            f"{option} {text!r}: the folder {folder} holds no {LORA_WEIGHTS_NAME} (nor any .safetensors); "
            "point it at a finished training output folder, a checkpoint-<step> folder, or the .safetensors file"
        )
    raise InferenceError(
        f"{option} {text!r}: the folder {folder} holds several .safetensors files ({', '.join(found)}) and no "
        f"{LORA_WEIGHTS_NAME}; name the file, e.g. {option} {folder / found[0]}"
    )


def parse_lora_spec(text: str, option: str = "--lora") -> LoraSpec:
    """Parse ``PATH[:STRENGTH]`` (a folder with ``pytorch_lora_weights.safetensors`` or a ``.safetensors`` file).

    A path that exists as written wins over a ``:`` split, so file names with colons work.
    Raises :class:`InferenceError` naming ``option`` for a missing path or a strength that is not a number.
    """
    path_text, strength = text, 1.0
    if not Path(text).expanduser().exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        # "C:\\x" style drive letters: a one-letter head followed by a path separator is not a strength
        if not (len(head) == 1 and tail[:1] in ("\\", "/")):
            try:
                strength = float(tail)
            except ValueError:
                raise InferenceError(
                    f"{option} {text!r}: the strength {tail!r} after ':' is not a number; write {option} PATH or "
                    f"{option} PATH:0.8"
                ) from None
            path_text = head
    p = Path(path_text).expanduser()
    if not p.exists():
        raise InferenceError(
            f"{option} {text!r}: {p} does not exist; give a training output folder, a checkpoint folder or a "
            ".safetensors file (optionally followed by :STRENGTH)"
        )
    if p.is_dir():
        return LoraSpec(p.resolve(), _weights_in(p, option, text), strength, text)
    if p.suffix != ".safetensors":
        raise InferenceError(f"{option} {text!r}: {p.name} is not a .safetensors file; give the LoRA weights file")
    return LoraSpec(p.resolve().parent, p.name, strength, text)


def load_loras(pipe: Any, specs: Sequence[LoraSpec], prefix: str = "lora") -> list[str]:
    """Load every LoRA as its own adapter (``<prefix>0``, ``<prefix>1``, ...) and activate them all at their strengths.

    Returns the adapter names.
    """
    names = []
    for k, s in enumerate(specs):
        name = f"{prefix}{k}"
        try:
            with warnings.catch_warnings():
                # PEFT warns whenever a second adapter joins a model; several named adapters are the intent here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                pipe.load_lora_weights(str(s.folder), weight_name=s.weight_name, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise InferenceError(
                f"--lora {s.text!r}: {s.path} could not be loaded into this model ({type(e).__name__}: {e}); "
                "check that it was trained for this base model (--model)"
            ) from None
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[s.strength for s in specs])
    return names


def trained_settings(spec: LoraSpec) -> dict[str, Any]:
    """``data`` settings of the run that produced a LoRA, from ``config.yaml`` beside it (or one folder up, for a
    checkpoint folder); ``{}`` when there is none. Keys: ``mask_hint``, ``outline_width``, ``resolution``,
    ``aspect_buckets``, ``default_prompt`` where present."""
    for folder in (spec.folder, spec.folder.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return {}
            d = data.get("data") or {}
            keys = ("mask_hint", "outline_width", "resolution", "aspect_buckets", "default_prompt")
            return {k: d[k] for k in keys if k in d}
    return {}


def choose_mask_hint(explicit: str | None, specs: Sequence[LoraSpec], has_mask: bool) -> tuple[str, int | None]:
    """The mask hint (and outline width) to draw: ``explicit`` if given, else the first LoRA's training setting,
    else ``fill`` with a mask and ``none`` without."""
    trained = trained_settings(specs[0]) if specs else {}
    if explicit is not None:
        return explicit, trained.get("outline_width") if explicit == "outline" else None
    if not has_mask:
        return "none", None
    return str(trained.get("mask_hint", "fill")), trained.get("outline_width")


# -------------------------------------------------------------------------------------------- files
def open_image(path: str, option: str, mode: str) -> Image.Image:
    """Open ``path`` as an image in ``mode`` (``RGB`` / ``L``), with an error naming ``option`` when it cannot."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InferenceError(f"{option} {path!r}: no such file; give the path of an existing image")
    try:
        with Image.open(p) as im:
            from PIL import ImageOps

            return ImageOps.exif_transpose(im).convert(mode)
    except (UnidentifiedImageError, OSError) as e:
        raise InferenceError(f"{option} {path!r}: not a readable image ({e}); give a PNG, JPEG or WebP file") from None


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


# ---------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``python -m kontext.tools.infer`` argument parser."""
    ap = argparse.ArgumentParser(
        prog="python -m kontext.tools.infer",
        description="Insert an object with FLUX.1 Kontext and trained LoRAs (see docs/inference.md).",
    )
    ap.add_argument(
        "--model", default="black-forest-labs/FLUX.1-Kontext-dev", help="hub id, local diffusers folder, or `tiny`"
    )
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
    ap.add_argument("--guidance", type=float, default=2.5, help="guidance embedding value (Kontext default 2.5)")
    ap.add_argument("--height", type=int, help="generation height (default: the image's, scaled to <= --max-area)")
    ap.add_argument("--width", type=int, help="generation width (default: the image's, scaled to <= --max-area)")
    ap.add_argument("--max-area", type=int, default=DEFAULT_MAX_AREA, help="largest generation area in pixels")
    ap.add_argument("--max-sequence-length", type=int, default=512, help="T5 prompt length")
    ap.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: bfloat16 on cuda, float32 on cpu)")
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
    hint, outline_width = choose_mask_hint(args.mask_hint, specs, mask is not None)
    if args.outline_width is not None:
        outline_width = args.outline_width
    pipe = load_pipeline(resolve_model(args.model), args.device, args.dtype)
    load_loras(pipe, specs)
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
            guidance_scale=args.guidance,
            width=args.width,
            height=args.height,
            max_area=args.max_area,
            max_sequence_length=args.max_sequence_length,
        )
    paths = output_paths(args.out, args.num_images, gen.seeds)
    for p, im in zip(paths, gen.images):
        p.parent.mkdir(parents=True, exist_ok=True)
        im.save(p)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for a usage error, with the message on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except InferenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
