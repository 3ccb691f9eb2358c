"""Load ``FluxKontextPipeline`` from a resolved model path or hub id: the code the trainer, inference and
evaluation share, with one user-facing error.

    from kontext.runtime.pipeline import PipelineLoadError, load_pipeline
    pipe = load_pipeline(model_path, torch.bfloat16, revision=None, variant=None, quantization="nf4")

``model_path`` is what :func:`kontext.runtime.model_path.resolve_model_path` returns (``tiny`` already
resolved to its folder). The pipeline stays where ``from_pretrained`` puts it (the CPU, or the GPU for a
bitsandbytes-quantized transformer); moving it is the caller's choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kontext.errors import UserError
from kontext.runtime.model_path import is_hub_id
from kontext.runtime.quantization import QUANTIZATION_MODES, quantized_transformer

if TYPE_CHECKING:
    from diffusers import FluxKontextPipeline

# The setting named in the error messages by default (callers with a command line pass their option, e.g. --model).
MODEL_OPTION = "model.pretrained_model_name_or_path"


class PipelineLoadError(UserError):
    """The pipeline could not be loaded; ``str(error)`` is the user-facing message (what failed and how to fix it)."""


def load_pipeline(
    model_path: str,
    dtype: torch.dtype,
    *,
    revision: str | None = None,
    variant: str | None = None,
    quantization: str = "none",
    option: str = MODEL_OPTION,
) -> FluxKontextPipeline:
    """``FluxKontextPipeline.from_pretrained(model_path)`` with every component in ``dtype``.

    Args:
        model_path: a local diffusers folder or a hub id.
        dtype: the weight dtype (the compute dtype of a quantized transformer).
        revision, variant: passed to ``from_pretrained`` when set (``model.revision`` / ``model.variant``).
        quantization: ``none``, or ``nf4`` / ``int8`` to load the transformer quantized with bitsandbytes
            (:func:`kontext.runtime.quantization.quantized_transformer`; needs CUDA).
        option: the setting that names the model, for the messages.

    Raises:
        PipelineLoadError: a local folder that does not exist, or ``from_pretrained`` failing with ``OSError``
            (no access to the gated hub model, no network, missing files); the message names ``model_path`` and
            ``option`` and says how to log in or what to point ``option`` at.
        kontext.runtime.quantization.QuantizationUnavailable: quantization asked for without CUDA or bitsandbytes.
    """
    from diffusers import FluxKontextPipeline

    if quantization not in QUANTIZATION_MODES:
        raise PipelineLoadError(
            f"model.quantization must be one of {', '.join(QUANTIZATION_MODES)}; got {quantization!r}"
        )
    folder = Path(model_path).expanduser()
    if not folder.exists() and not is_hub_id(model_path):
        # from_pretrained would say only "neither a valid local path nor a valid repo id" (a ValueError)
        raise PipelineLoadError(
            f"Could not load FLUX.1 Kontext from {model_path!r}: the folder {folder} does not exist. Point {option} "
            "at a local diffusers folder (or `tiny`), or at a hub id such as black-forest-labs/FLUX.1-Kontext-dev."
        )
    kwargs: dict[str, Any] = {"dtype": dtype}
    if revision:
        kwargs["revision"] = revision
    if variant:
        kwargs["variant"] = variant
    try:
        if quantization != "none":
            kwargs["transformer"] = quantized_transformer(model_path, quantization, dtype, kwargs)
        return FluxKontextPipeline.from_pretrained(model_path, **kwargs)
    except OSError as e:
        raise PipelineLoadError(
            f"Could not load FLUX.1 Kontext from {model_path!r} ({e}). For the gated hub model run "
            f"`hf auth login` after accepting its licence, or point {option} "
            "at a local diffusers folder (or `tiny`)."
        ) from None
