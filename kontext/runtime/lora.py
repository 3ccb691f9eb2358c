"""The PEFT LoRA on the FLUX transformer: its config, and attaching it.

``attach_lora`` freezes the base model and adds one adapter named ``default`` through diffusers'
``add_adapter`` (PEFT under the hood), with the LoRA parameters in float32 whatever the base dtype.
Reading and writing the LoRA's files is ``kontext.runtime.lora_io``.
"""

from __future__ import annotations

import torch
from peft import LoraConfig

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
