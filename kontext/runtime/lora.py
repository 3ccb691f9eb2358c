"""The PEFT LoRA on the FLUX transformer: attach, read out, and write the diffusers-format file.

``attach_lora`` freezes the base model and adds one adapter named ``default`` through diffusers'
``add_adapter`` (PEFT under the hood), with the LoRA parameters in float32 whatever the base dtype.
``save_lora`` writes ``pytorch_lora_weights.safetensors`` through ``FluxKontextPipeline.save_lora_weights``
with the *whole* LoRA config as ``lora_adapter_metadata`` (diffusers' loader needs more than rank and alpha).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxKontextPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

_INIT = {"gaussian": "gaussian", "default": True, "pissa": "pissa", "olora": "olora"}


def make_lora_config(rank: int, alpha: float, dropout: float, init: str, target_modules: list[str]) -> LoraConfig:
    """The PEFT ``LoraConfig`` for the transformer."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights=_INIT[init],
        target_modules=list(target_modules),
    )


def attach_lora(transformer: torch.nn.Module, config: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze ``transformer``, add the LoRA adapter, and return its (float32) trainable parameters.

    Raises ValueError naming the config key when no module matches ``target_modules``.
    """
    transformer.requires_grad_(False)
    try:
        transformer.add_adapter(config)
    except ValueError as e:
        raise ValueError(
            f"`lora.target_modules` = {sorted(config.target_modules)} matched no module of the transformer ({e}). "
            "Use module-name suffixes such as attn.to_q, attn.to_out.0, ff.net.2, proj_mlp."
        ) from None
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        # Optimiser state and updates in float32 even when the frozen base is bf16/fp16.
        p.data = p.data.float()
    return params


def adapter_metadata(transformer: torch.nn.Module, base_model: str | None = None) -> dict[str, Any]:
    """The whole LoRA config as a JSON-safe dict (sets become sorted lists).

    ``base_model`` (a hub id or a local folder) is recorded as ``base_model_name_or_path`` in its shareable
    form (``kontext.runtime.sharing.shareable_model_name``: a hub id, or a local folder's name only).
    """
    from kontext.runtime.sharing import shareable_model_name

    raw = transformer.peft_config["default"].to_dict()

    def clean(v: Any) -> Any:
        if isinstance(v, (set, frozenset)):
            return sorted(clean(x) for x in v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    meta = clean(raw)
    if base_model is not None:
        meta["base_model_name_or_path"] = shareable_model_name(base_model)
    elif meta.get("base_model_name_or_path") is not None:
        meta["base_model_name_or_path"] = shareable_model_name(meta["base_model_name_or_path"])
    json.dumps(meta)  # fail here, not inside safetensors, if anything is not serialisable
    return meta


def lora_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT's names (``...lora_A.weight`` / ``...lora_B.weight``), on the CPU."""
    sd = get_peft_model_state_dict(transformer, adapter_name="default")
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in sd.items()}


def load_lora_state_dict(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load PEFT-named adapter weights into ``transformer``'s ``default`` adapter (strict on the LoRA keys)."""
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA weights have keys this adapter does not: {unexpected[:5]} ...")


def save_lora(
    transformer: torch.nn.Module, output_dir: str | Path, dtype: torch.dtype = torch.float32, base_model: str | None = None
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers/PEFT format + ``lora_adapter_metadata``), mode per umask."""
    from kontext.runtime.sharing import respect_umask

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    FluxKontextPipeline.save_lora_weights(
        save_directory=str(output_dir),
        transformer_lora_layers=lora_state_dict(transformer, dtype),
        transformer_lora_adapter_metadata=adapter_metadata(transformer, base_model),
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    return respect_umask(output_dir / LORA_WEIGHTS_NAME)
