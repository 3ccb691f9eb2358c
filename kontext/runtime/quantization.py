"""Optional quantized frozen base (bitsandbytes NF4 / int8 through diffusers' ``BitsAndBytesConfig``).

A quantized base cuts the 12B transformer from ~24 GB (bf16) to ~6.7 GB (NF4) or ~12 GB (int8); the LoRA
on top still trains in float32. Needs a CUDA GPU and ``pip install -e '.[quantization]'``.
"""

from __future__ import annotations

from typing import Any

import torch

from kontext.errors import UserError

QUANTIZATION_MODES = ("none", "nf4", "int8")


class QuantizationUnavailable(UserError, RuntimeError):
    """The requested quantization cannot run here; the message says what is missing."""


def bnb_kwargs(mode: str, compute_dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments of ``diffusers.BitsAndBytesConfig`` for ``mode`` (``nf4`` or ``int8``)."""
    if mode == "nf4":
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": compute_dtype,
            # Double quantization saves ~0.4 bit/param more at no quality cost for frozen weights.
            "bnb_4bit_use_double_quant": True,
        }
    if mode == "int8":
        return {"load_in_8bit": True}
    raise ValueError(f"`model.quantization` must be one of {QUANTIZATION_MODES}; got {mode!r}.")


def check_available(mode: str) -> None:
    """Raise :class:`QuantizationUnavailable` naming the fix when ``mode`` cannot run on this machine."""
    if mode == "none":
        return
    if not torch.cuda.is_available():
        raise QuantizationUnavailable(
            f"`model.quantization: {mode}` needs a CUDA GPU (bitsandbytes kernels); set model.quantization=none here."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantizationUnavailable(
            f"`model.quantization: {mode}` needs bitsandbytes: pip install -e '.[quantization]'."
        ) from None


def quantized_transformer(model_path: str, mode: str, compute_dtype: torch.dtype, load_kwargs: dict[str, Any]):
    """Load the FLUX transformer of ``model_path`` quantized with ``mode`` (CUDA + bitsandbytes)."""
    check_available(mode)
    from diffusers import BitsAndBytesConfig, FluxTransformer2DModel

    extra = {k: v for k, v in load_kwargs.items() if k in ("revision", "variant")}
    return FluxTransformer2DModel.from_pretrained(
        model_path,
        subfolder="transformer",
        quantization_config=BitsAndBytesConfig(**bnb_kwargs(mode, compute_dtype)),
        dtype=compute_dtype,
        **extra,
    )
