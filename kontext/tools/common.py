"""What ``python -m kontext.tools.infer`` and ``python -m kontext.tools.evaluate`` share: the error type, the model
and runtime options, ``--lora PATH[:STRENGTH]`` specs, opening the pipeline with its LoRAs, the LoRA run's
settings (and the mask hint, prompt length and guidance they imply), and the command-line entry with its exit
statuses.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from data.errors import file_in_the_way
from kontext.errors import UserError
from kontext.runtime.dtypes import DTYPES
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.runtime.model_path import text_length_warning, trained_text_length
from kontext.runtime.pipeline import load_pipeline
from kontext.tiny.model import resolve_model_path

DEFAULT_MODEL = "black-forest-labs/FLUX.1-Kontext-dev"
# Without a flag or a LoRA run's config.yaml: FLUX.1 Kontext's own prompt length and guidance.
DEFAULT_MAX_SEQUENCE_LENGTH = 512
DEFAULT_GUIDANCE = 2.5
# What a LoRA run's config.yaml says about generating with it: the tools' name -> (section, key).
RUN_SETTINGS = {
    "mask_hint": ("data", "mask_hint"),
    "outline_width": ("data", "outline_width"),
    "resolution": ("data", "resolution"),
    "aspect_buckets": ("data", "aspect_buckets"),
    "default_prompt": ("data", "default_prompt"),
    "max_sequence_length": ("model", "max_sequence_length"),
    "guidance": ("validation", "guidance_scale"),
}

logger = logging.getLogger(__name__)


class InferenceError(UserError, ValueError):
    """A command-line or input problem; the message names the argument and the fix."""


# ------------------------------------------------------------------------------------------ options
def add_model_argument(ap: argparse.ArgumentParser) -> None:
    """``--model`` (the base model), the first option of both commands."""
    ap.add_argument("--model", default=DEFAULT_MODEL, help="hub id, local diffusers folder, or `tiny`")


def add_runtime_arguments(ap: argparse.ArgumentParser) -> None:
    """``--max-sequence-length``, ``--device`` and ``--dtype``, in this order (both commands end with them, then ``--out``)."""
    ap.add_argument(
        "--max-sequence-length",
        type=int,
        help="T5 prompt length (default: the LoRA run's model.max_sequence_length, else what the base was trained "
        f"with where its folder records it, else {DEFAULT_MAX_SEQUENCE_LENGTH})",
    )
    ap.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: bfloat16 on cuda, float32 on cpu)")


def cli_main(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Any],
    show: Callable[[Any], None],
    argv: Sequence[str] | None,
) -> int:
    """Parse ``argv``, ``run`` the parsed arguments and ``show`` what it returns; returns the exit status.

    Any :class:`~kontext.errors.UserError` (an option, a file, a folder, the model: every project error a user can
    fix) prints ``error: <message>`` on stderr and returns 2 (argparse's own usage errors exit with 2 as well);
    success returns 0.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Libraries only when something is wrong (as in training): diffusers' notes on a LoRA without text-encoder
    # layers, for one, concern nothing the user can change.
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.set_verbosity_error()
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show(result)
    return 0


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as the folder a command writes into: refused (before any model loads) when it is a file or runs
    through one."""
    out = Path(path).expanduser()
    if where := file_in_the_way(out):
        raise InferenceError(f"{option} {out} {where}; name a folder to write into (it is created if missing)")
    return out


# -------------------------------------------------------------------------------------------- model
def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class OpenedPipeline:
    """What :func:`open_pipeline` returns: the resolved ``model``, the pipeline and one adapter name per LoRA."""

    model: str
    pipe: Any
    adapters: list[str]


def open_pipeline(
    model: str,
    specs: Sequence[LoraSpec],
    device: torch.device | str | None = None,
    dtype: str | None = None,
    prefix: str = "lora",
) -> OpenedPipeline:
    """Resolve ``--model`` (``tiny``, a diffusers folder or a hub id; see ``kontext.runtime.model_path``), load
    ``FluxKontextPipeline`` onto ``device`` and every LoRA of ``specs`` as its own adapter (see :func:`load_loras`).

    ``device`` defaults to :func:`default_device`; ``dtype`` (a :data:`~kontext.runtime.dtypes.DTYPES` name)
    to bfloat16 on CUDA and float32 on the CPU (where bf16 matmuls are slow).
    """
    resolved = resolve_model_path(model, "--model")
    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise InferenceError(f"--dtype must be one of {sorted(DTYPES)}; got {dtype!r}")
    pipe = load_pipeline(resolved, DTYPES[dtype], option="--model").to(device)
    return OpenedPipeline(resolved, pipe, load_loras(pipe, specs, prefix))


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
            if not math.isfinite(strength):  # nan or inf would scale every LoRA delta into NaN: a black image
                raise InferenceError(
                    f"{option} {text!r}: the strength {tail!r} is not a finite number; write e.g. {option} PATH:0.8"
                )
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


def trained_settings(spec: LoraSpec | None) -> dict[str, Any]:
    """The settings of the run that produced a LoRA, from ``config.yaml`` beside it (or one folder up, for a
    checkpoint folder); ``{}`` when there is none (or no LoRA).

    Keys (where the config has them): those of :data:`RUN_SETTINGS` (``mask_hint``, ``outline_width``,
    ``resolution``, ``aspect_buckets``, ``default_prompt``, ``max_sequence_length``, ``guidance`` = the run's
    ``validation.guidance_scale``) and ``config``, the file's path.
    """
    if spec is None:
        return {}
    for folder in (spec.folder, spec.folder.parent):
        cfg = folder / "config.yaml"
        if cfg.is_file():
            try:
                data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return {}
            out: dict[str, Any] = {"config": str(cfg)}
            for name, (section, key) in RUN_SETTINGS.items():
                values = data.get(section) if isinstance(data, dict) else None
                if isinstance(values, dict) and key in values:
                    out[name] = values[key]
            return out
    return {}


def mask_hint_settings(
    mask_hint: str | None, outline_width: int | None, trained: dict[str, Any], has_mask: bool = True
) -> tuple[str, int | None]:
    """The mask hint and outline width to draw: each given value (``--mask-hint``, ``--outline-width``), else the
    LoRA run's (``trained``, see :func:`trained_settings`), else ``fill`` (``none`` without a mask) and the
    training default width."""
    if mask_hint is None:
        mask_hint = str(trained.get("mask_hint", "fill")) if has_mask else "none"
    return mask_hint, outline_width if outline_width is not None else trained.get("outline_width")


def guidance_setting(guidance: float | None, trained: dict[str, Any]) -> float:
    """The guidance embedding value: ``--guidance``, else the LoRA run's ``validation.guidance_scale``, else 2.5."""
    return float(guidance if guidance is not None else trained.get("guidance", DEFAULT_GUIDANCE))


def prompt_length_setting(given: int | None, trained: dict[str, Any], model_path: str) -> int:
    """The T5 prompt length: ``--max-sequence-length``, else the LoRA run's ``model.max_sequence_length``, else
    the length the base at ``model_path`` was trained with (where its folder records it), else 512.

    Logs a warning when the length exceeds what the base was trained with (see
    :func:`kontext.runtime.model_path.text_length_warning`).
    """
    if given is not None:
        length, option = given, "--max-sequence-length"
    elif "max_sequence_length" in trained:
        length, option = int(trained["max_sequence_length"]), f"model.max_sequence_length of the LoRA run ({trained['config']})"
    else:
        length, option = trained_text_length(model_path) or DEFAULT_MAX_SEQUENCE_LENGTH, "--max-sequence-length"
    if length < 1:
        raise InferenceError(f"--max-sequence-length must be >= 1; got {length}")
    warning = text_length_warning(model_path, length, option, fix="pass --max-sequence-length {trained}")
    if warning:
        logger.warning(warning)
    return length
