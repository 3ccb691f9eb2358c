"""The LoRA's files: gather, write, read, digest, and the checkpoint hooks (one module for every LoRA I/O path).

The trainer, the checkpoints and the tests all go through these functions:

- :func:`full_lora_state_dict` gathers the whole adapter on every process (a collective under FSDP2);
- :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` in diffusers/PEFT format with the *whole* LoRA
  config as ``lora_adapter_metadata`` (diffusers' loader needs more than rank and alpha);
- :func:`load_lora_file` / :func:`load_lora_state_dict` read it back into the ``default`` adapter;
- :func:`unwrapped` is the transformer under accelerate's wrappers (DDP, FSDP, ``torch.compile``);
- :func:`register_checkpoint_hooks` makes ``accelerator.save_state`` hold only the LoRA, never the frozen base;
- :func:`lora_digest` and :func:`check_replicas_agree` show that every process ended with the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from kontext.runtime.sharing import respect_umask, shareable_model_name

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def unwrapped(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The module ``accelerator.prepare`` was given: DDP/FSDP/DeepSpeed wrappers and ``torch.compile`` removed.

    ``accelerate launch --dynamo_backend ...`` compiles the prepared model, either whole (a wrapper whose
    parameter names start with ``_orig_mod.``) or, with ``--dynamo_use_regional_compilation``, as a copy whose
    repeated blocks are compiled. Saving, loading, validation and the weight checks all work on the original
    module, whose parameters are the ones being trained and whose names are the LoRA's file keys.
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def adapter_metadata(transformer: torch.nn.Module, base_model: str | None = None) -> dict[str, Any]:
    """The whole LoRA config as a JSON-safe dict (sets become sorted lists).

    ``base_model`` (a hub id or a local folder) is recorded as ``base_model_name_or_path`` in its shareable
    form (``kontext.runtime.sharing.shareable_model_name``: a hub id, or a local folder's name only).
    """
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


def full_lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The complete LoRA ``{peft_name: float32 CPU tensor}`` (``...lora_A.weight`` / ``...lora_B.weight``), sorted
    by name; call it on every process.

    Under FSDP2 each LoRA matrix is a ``DTensor`` sharded across processes, and ``full_tensor()`` is a
    collective all-gather, so all processes must reach this call in the same order. Under DDP and
    DeepSpeed ZeRO-2 the parameters are whole replicas and this is a plain copy.
    """
    from peft.utils import get_peft_model_state_dict

    sd = get_peft_model_state_dict(transformer, adapter_name="default")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(sd):
        v = sd[k].detach()
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.to("cpu", torch.float32).contiguous()
    return out


def save_lora(
    transformer: torch.nn.Module,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    base_model: str | None = None,
    write: bool = True,
) -> Path:
    """Gather the full LoRA and, where ``write`` (the main process), write ``pytorch_lora_weights.safetensors``.

    Call it on every process (the gather is a collective under FSDP2). The file gets the umask's mode
    (safetensors leaves 0600) and records ``base_model`` as a hub id or a folder name, never a local path
    (``kontext.runtime.sharing``). Returns the file's path on every process.
    """
    from diffusers import FluxKontextPipeline

    sd = full_lora_state_dict(transformer)
    path = Path(out_dir) / LORA_WEIGHTS_NAME
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        FluxKontextPipeline.save_lora_weights(
            save_directory=str(path.parent),
            transformer_lora_layers={k: v.to(dtype) for k, v in sd.items()},
            transformer_lora_adapter_metadata=adapter_metadata(transformer, base_model),
            weight_name=LORA_WEIGHTS_NAME,
            safe_serialization=True,
        )
        respect_umask(path)
    return path


def load_lora_state_dict(transformer: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load PEFT-named adapter weights into ``transformer``'s ``default`` adapter (strict on the LoRA keys)."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state_dict, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA weights have keys this adapter does not: {unexpected[:5]} ...")


def load_lora_file(transformer: torch.nn.Module, path: str | Path) -> None:
    """Load a file written by :func:`save_lora` (diffusers' ``transformer.`` key prefix) into the adapter."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    load_lora_state_dict(transformer, {k.removeprefix("transformer."): v for k, v in sd.items()})


def register_checkpoint_hooks(accelerator: Any, transformer: torch.nn.Module) -> None:
    """Checkpoints hold only the LoRA (plus what accelerate adds), never the frozen 12B base.

    ``accelerator.save_state`` then writes the LoRA with :func:`save_lora` (every process takes part in the
    gather, the main one writes) and ``load_state`` reads it back with :func:`load_lora_file`.
    """
    base = unwrapped(accelerator, transformer)

    def save_hook(models: list, weights: list, out_dir: str) -> None:
        for i in reversed(range(len(models))):
            if unwrapped(accelerator, models[i]) is base:
                save_lora(base, out_dir, write=accelerator.is_main_process)
                if weights:
                    weights.pop(i)

    def load_hook(models: list, in_dir: str) -> None:
        for i in reversed(range(len(models))):
            if unwrapped(accelerator, models[i]) is base:
                models.pop(i)
                load_lora_file(base, Path(in_dir) / LORA_WEIGHTS_NAME)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def lora_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names and float32 bytes of a LoRA state dict (order-independent)."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_replicas_agree(accelerator: Any, transformer: torch.nn.Module) -> list[str]:
    """Each process's LoRA digest (:func:`lora_digest`), gathered in rank order; raises if replicas diverged.

    Call on every process. With several processes the main one prints the list, so the log of a
    multi-process run shows that every replica ended with the same weights. One process: ``[]``.
    """
    if accelerator.num_processes == 1:
        return []
    from accelerate.utils import gather_object

    digests = gather_object([lora_digest(full_lora_state_dict(transformer))])
    accelerator.print(f"LoRA digest per process: {json.dumps(digests)}")
    if len(set(digests)) != 1:
        raise RuntimeError(
            f"LoRA replicas diverged across processes (digests {digests}); their gradients were not synchronised."
        )
    return digests
