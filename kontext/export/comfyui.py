"""Export a diffusers/PEFT FLUX LoRA as a file ComfyUI applies at the trained strength (the library; the command
is ``python -m kontext.tools.comfyui``, see :mod:`kontext.tools.comfyui`).

Two layouts, both applied exactly by ComfyUI's LoRA loader (``comfy/lora.py``):

``split`` (the default, smallest): one LoRA per diffusers module, keys
``transformer.<module>.{lora_A.weight, lora_B.weight, alpha}``. ComfyUI's ``model_lora_keys_unet`` maps, for a FLUX
model, ``transformer.`` + every diffusers FLUX Linear to its original layer (``comfy.utils.flux_to_diffusers``);
q/k/v and ``proj_mlp`` map to a *slice* of the fused original weight (``(dim, start, length)``, e.g.
``attn.to_k`` -> rows ``[d, 2d)`` of ``img_attn.qkv``), the patch is added to ``weight.narrow(dim, start, length)``,
and ``norm_out.linear`` maps to ``final_layer.adaLN_modulation.1`` with ComfyUI's own [scale; shift] -> [shift; scale]
swap. Each module's ``.alpha`` is its PEFT alpha (``alpha * sqrt(r)`` with rsLoRA), so ComfyUI's
``alpha / rank(lora_A)`` is the PEFT scale and ``lora_B`` / ``lora_A`` are the trained factors unchanged, exact in
any dtype. The file is the diffusers file's tensors plus those alphas: ComfyUI never reads the diffusers file's
``lora_adapter_metadata``, where diffusers keeps alpha.

``fused``: kohya's ``lora_unet_<original FLUX module>.{lora_down.weight,lora_up.weight,alpha}``, the names kohya
sd-scripts and diffusers' kohya reader know. Diffusers splits layers that the original FLUX fuses (a double block's
``img_attn.qkv`` is ``to_q``/``to_k``/``to_v``, ``txt_attn.qkv`` is ``add_q_proj``/``add_k_proj``/``add_v_proj``, a
single block's ``linear1`` is ``[to_q; to_k; to_v; proj_mlp]`` on the output axis). A LoRA on the parts becomes one
LoRA on the fused layer without approximation: ``down`` is the parts' ``lora_A`` stacked on the rank axis and ``up``
the block-diagonal of the parts' ``lora_B`` (parts without a LoRA contribute zero rows), which makes this layout
1.77 times the split one at rank 16 with the default targets. When every part of a layer has the same PEFT
scale ``s`` it goes into ``alpha = s * rank`` and ``up`` keeps the trained factors (exact in bf16 too); otherwise
each part's scale is multiplied into its block of ``up`` and ``alpha`` = rank. ``final_layer`` layers always
carry their scale in ``up`` (diffusers' kohya reader ignores their alpha), and their adaLN ``up`` rows are swapped
by halves ([scale; shift] -> [shift; scale]). Q/K/V rows need no permutation (both layouts order heads, then
head channels).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.errors import writing
from kontext.errors import UserError
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.runtime.sharing import respect_umask, shareable_model_name

COMFYUI_LORA_NAME = "lora_comfyui.safetensors"
FLUX1_WIDTH = 3072  # FLUX.1's inner_dim (24 heads x 128), fixed in ComfyUI's FLUX detection
KOHYA_PREFIX = "lora_unet_"
METADATA_KEY = "lora_adapter_metadata"
SPLIT, FUSED = "split", "fused"
LAYOUTS = (SPLIT, FUSED)

logger = logging.getLogger(__name__)

# Diffusers' FluxSingleTransformerBlock is built with mlp_ratio=4 and the model offers no way to change it.
SINGLE_MLP_RATIO = 4

# Fused BFL layers: (diffusers part suffixes in output-row order, BFL suffix). Widths as multiples of inner_dim.
_DOUBLE_FUSED = {
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), (1, 1, 1)),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (1, 1, 1)),
}
_SINGLE_FUSED = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (1, 1, 1, SINGLE_MLP_RATIO)),
}
_DOUBLE_PLAIN = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
_SINGLE_PLAIN = {
    "proj_out": "linear2",
    "norm.linear": "modulation.lin",
}
_TOP_PLAIN = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
# BFL layers whose output rows are ordered differently from diffusers': [shift; scale] vs [scale; shift].
_SWAP_HALVES = {"final_layer.adaLN_modulation.1"}
# Layers whose `.alpha` diffusers' kohya reader does not apply (it reads final_layer as if alpha == rank).
_ALPHA_IGNORED = {"final_layer.linear", "final_layer.adaLN_modulation.1"}

_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_LORA_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class ExportError(UserError, ValueError):
    """A LoRA file cannot be converted as asked; the message names the file (or option) and the fix."""


class LoraFileMissing(ExportError, FileNotFoundError):
    """The LoRA file (or the output folder's) to convert does not exist."""


@dataclass(frozen=True)
class _Target:
    """Where one diffusers module lands: BFL module name, part index and relative widths of its fused group."""

    bfl: str
    part: int
    group: tuple[str, ...]  # diffusers module names of every part, in output-row order
    width_mult: tuple[int, ...]


def _target_for(module: str) -> _Target | None:
    """Map a diffusers transformer module name (no ``transformer.`` prefix) to its BFL layer, or None."""
    m = _BLOCK_RE.match(module)
    if m is None:
        if module in _TOP_PLAIN:
            return _Target(_TOP_PLAIN[module], 0, (module,), (0,))
        return None
    kind, idx, rest = m.group(1), m.group(2), m.group(3)
    fused, plain, bfl_block = (
        (_DOUBLE_FUSED, _DOUBLE_PLAIN, f"double_blocks.{idx}")
        if kind == "transformer_blocks"
        else (_SINGLE_FUSED, _SINGLE_PLAIN, f"single_blocks.{idx}")
    )
    if rest in plain:
        return _Target(f"{bfl_block}.{plain[rest]}", 0, (module,), (0,))
    for bfl_suffix, (parts, mults) in fused.items():
        if rest in parts:
            group = tuple(f"{kind}.{idx}.{p}" for p in parts)
            return _Target(f"{bfl_block}.{bfl_suffix}", parts.index(rest), group, mults)
    return None


def kohya_key(bfl_module: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv`` (ComfyUI/kohya naming)."""
    return KOHYA_PREFIX + bfl_module.replace(".", "_")


def parse_adapter_metadata(metadata: Mapping[str, Any] | str | None) -> dict[str, Any] | None:
    """The PEFT ``LoraConfig`` dict from diffusers' ``lora_adapter_metadata``.

    Accepts the JSON string stored in the safetensors header, the dict it decodes to (whose keys diffusers
    prefixes with ``transformer.``), or an unprefixed ``LoraConfig.to_dict()``. Returns None for None.
    """
    if metadata is None:
        return None
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    if not isinstance(metadata, Mapping):
        raise TypeError(f"adapter metadata must be a dict or JSON string; got {type(metadata).__name__}")
    prefixed = {k[len("transformer.") :]: v for k, v in metadata.items() if k.startswith("transformer.")}
    if prefixed:
        return prefixed
    other = sorted({k.split(".")[0] for k in metadata if "." in k})
    if other and not any(k in metadata for k in ("r", "lora_alpha")):
        raise ExportError(
            f"adapter metadata describes {other} but no transformer LoRA; only the transformer can be exported"
        )
    return dict(metadata)


def module_scale(module: str, rank: int, config: Mapping[str, Any] | None, source: str = "LoRA") -> float:
    """PEFT's multiplier for one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    ``rank`` is the module's actual rank (``lora_A.shape[0]``). ``alpha`` follows PEFT's own pattern matching
    (``alpha_pattern`` over the module name relative to the transformer, else ``lora_alpha``). Without a
    config the scale is 1, which is what diffusers assumes for a file with neither metadata nor alphas.
    """
    if config is None:
        return 1.0
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    expected_rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r"))
    if expected_rank is not None and int(expected_rank) != rank:
        raise ExportError(
            f"{source}: module {module!r} has rank {rank} in its weights but the adapter metadata says "
            f"{expected_rank} (r / rank_pattern); the metadata does not describe this file"
        )
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank))
    if config.get("use_rslora", False):
        return float(alpha) / math.sqrt(rank)
    return float(alpha) / rank


def module_alpha(module: str, rank: int, config: Mapping[str, Any] | None, source: str = "LoRA") -> float:
    """The kohya/ComfyUI ``alpha`` for one module: the value whose ``alpha / rank`` is PEFT's scale.

    That is the module's PEFT alpha (``alpha_pattern`` or ``lora_alpha``), ``alpha * sqrt(r)`` with rsLoRA, and
    ``rank`` (scale 1) without a config. Computed directly rather than as ``scale * rank`` so that the usual
    integer alphas are stored exactly.
    """
    if config is None:
        return float(rank)
    module_scale(module, rank, config, source)  # the same rank check
    alpha_pattern = config.get("alpha_pattern") or {}
    alpha = float(alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank)))
    return alpha * math.sqrt(rank) if config.get("use_rslora", False) else alpha


def _inner_dim_from_config(transformer_config: Mapping[str, Any] | None) -> int | None:
    if transformer_config is None:
        return None
    try:
        return int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    except KeyError as e:
        raise ExportError(
            f"transformer_config lacks {e.args[0]!r}; pass the FluxTransformer2DModel config (transformer.config)"
        ) from None


def _check_block_index(module: str, transformer_config: Mapping[str, Any] | None, source: str) -> None:
    if transformer_config is None:
        return
    m = _BLOCK_RE.match(module)
    if m is None:
        return
    limit_key = "num_layers" if m.group(1) == "transformer_blocks" else "num_single_layers"
    limit = transformer_config.get(limit_key)
    if limit is not None and int(m.group(2)) >= int(limit):
        raise ExportError(
            f"{source}: {module!r} is beyond the transformer's {limit_key}={limit}; "
            "the LoRA was trained on a different base model"
        )


def convert_diffusers_lora_to_comfyui(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, Any] | str | None,
    transformer_config: Mapping[str, Any] | None = None,
    source: str = "LoRA",
    dtype: torch.dtype | None = None,
    layout: str = SPLIT,
) -> dict[str, torch.Tensor]:
    """Convert a diffusers/PEFT FLUX transformer LoRA to the tensors of a file ComfyUI applies exactly.

    Args:
        state_dict: ``{transformer.<module>.lora_A.weight: [r, in], ...lora_B.weight: [out, r]}`` as written by
            ``FluxKontextPipeline.save_lora_weights`` (the ``transformer.`` prefix is optional).
        metadata: the adapter's ``LoraConfig`` as a dict or JSON (see :func:`parse_adapter_metadata`), or None
            (every module then has scale 1, as diffusers assumes without metadata).
        transformer_config: optional ``FluxTransformer2DModel`` config; when given, widths and block indices are
            checked against it. Fused-layer widths are otherwise inferred from the LoRA itself (each part's
            input width is the model width ``d``; q/k/v are ``d`` wide, ``proj_mlp`` ``4 d``).
        source: name used in error messages (the file path).
        dtype: output dtype; defaults to the dtype of the input LoRA weights.
        layout: ``"split"`` (one LoRA per diffusers module, the smallest file) or ``"fused"`` (one LoRA per
            original FLUX layer, kohya names); see the module docstring.

    Returns:
        split: ``{transformer.<module>.lora_A.weight: [r, in], .lora_B.weight: [out, r], .alpha: 0-d float32}``
        with ``alpha / r`` the module's PEFT scale. fused: ``{lora_unet_<bfl>.lora_down.weight: [R, in],
        .lora_up.weight: [out, R], .alpha: 0-d float32}`` with ``alpha / R * up @ down`` equal to the PEFT scale
        times ``lora_B @ lora_A`` on every original layer (zero rows for parts without a LoRA).

    Raises:
        ValueError: a key that is not a transformer LoRA weight of a known FLUX layer, a DoRA/bias adapter,
            a missing A/B half, or widths that contradict the model.
    """
    if layout not in LAYOUTS:
        raise ExportError(f"layout must be one of {LAYOUTS}; got {layout!r}")
    config = parse_adapter_metadata(metadata)
    if config is not None:
        if config.get("use_dora"):
            raise ExportError(f"{source}: DoRA adapters (use_dora=true) have no kohya/ComfyUI LoRA equivalent")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    groups: dict[str, _Target] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        name = key[len("transformer.") :] if key.startswith("transformer.") else key
        m = _LORA_KEY_RE.match(name)
        target = _target_for(m.group("module")) if m is not None else None
        if m is None or target is None:
            unknown.append(key)
            continue
        pairs.setdefault(m.group("module"), {})[m.group("ab")] = value
        groups.setdefault(target.bfl, target)
    if unknown:
        hint = (
            "DoRA magnitudes / LoRA biases cannot be exported"
            if any("magnitude" in k or "lora_B.bias" in k for k in unknown)
            else "expected transformer.<FLUX module>.lora_A.weight / .lora_B.weight of a FluxTransformer2DModel"
        )
        raise ExportError(f"{source}: unrecognised LoRA keys {sorted(unknown)[:6]} ({len(unknown)} in all); {hint}")
    if not pairs:
        raise ExportError(f"{source}: no transformer LoRA weights found")
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ExportError(f"{source}: {module} has no {missing}.weight; the LoRA file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ExportError(
                f"{source}: {module} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a linear LoRA pair"
            )
        _check_block_index(module, transformer_config, source)

    out_dtype = dtype or next(iter(state_dict.values())).dtype
    cfg_inner = _inner_dim_from_config(transformer_config)
    result: dict[str, torch.Tensor] = {}
    # checked for both layouts: ComfyUI slices the fused weights of the split layout at these same widths
    part_widths = {bfl: _part_widths(pairs, bfl, t, cfg_inner, source) for bfl, t in sorted(groups.items())}
    if layout == SPLIT:
        for module in sorted(pairs):
            a, b = pairs[module]["A"], pairs[module]["B"]
            key = f"transformer.{module}"
            result[f"{key}.lora_A.weight"] = a.to(out_dtype).contiguous()
            result[f"{key}.lora_B.weight"] = b.to(out_dtype).contiguous()
            result[f"{key}.alpha"] = torch.tensor(module_alpha(module, a.shape[0], config, source), dtype=torch.float32)
        return result
    for bfl, t in sorted(groups.items()):
        downs: list[torch.Tensor] = []
        ups: list[tuple[torch.Tensor, float, int]] = []  # (up [out_i, r_i], PEFT scale, row offset)
        widths = part_widths[bfl]
        offset = 0
        for i, module in enumerate(t.group):
            if module in pairs:
                a = pairs[module]["A"].to(torch.float32)
                b = pairs[module]["B"].to(torch.float32)
                downs.append(a)
                ups.append((b, module_scale(module, a.shape[0], config, source), offset))
            offset += widths[i]
        rank = sum(d.shape[0] for d in downs)
        scales = {scale for _, scale, _ in ups}
        # One scale for the whole layer goes into alpha, leaving the trained factors unrounded; several cannot.
        shared = scales.pop() if len(scales) == 1 and bfl not in _ALPHA_IGNORED else None
        down = torch.cat(downs, dim=0)
        up = torch.zeros(offset, rank, dtype=torch.float32)
        col = 0
        for u, scale, row in ups:
            up[row : row + u.shape[0], col : col + u.shape[1]] = u if shared is not None else u * scale
            col += u.shape[1]
        if bfl in _SWAP_HALVES:
            first, second = up.chunk(2, dim=0)
            up = torch.cat([second, first], dim=0)
        key = kohya_key(bfl)
        result[f"{key}.lora_down.weight"] = down.to(out_dtype).contiguous()
        result[f"{key}.lora_up.weight"] = up.to(out_dtype).contiguous()
        # loaders multiply by alpha / rank: the shared scale, or 1 when the scales already live in `up`
        alpha = shared * rank if shared is not None else float(rank)
        result[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return result


def _part_widths(
    pairs: Mapping[str, Mapping[str, torch.Tensor]], bfl: str, t: _Target, inner: int | None, source: str
) -> list[int]:
    """Output rows of each part of the original layer ``bfl``, checked against the LoRA and the model width."""
    present = [m for m in t.group if m in pairs]
    in_features = {pairs[m]["A"].shape[1] for m in present}
    if len(in_features) != 1:
        raise ExportError(f"{source}: parts of {bfl} ({present}) disagree on input width {sorted(in_features)}")
    (in_dim,) = in_features
    if len(t.group) == 1:
        return [pairs[t.group[0]]["B"].shape[0]]
    # Every part of a fused FLUX layer reads the hidden state, so its input width is the model width.
    d = inner if inner is not None else in_dim
    if in_dim != d:
        raise ExportError(
            f"{source}: {present[0]} reads {in_dim} features but the transformer config has "
            f"inner_dim={d}; the LoRA belongs to another model"
        )
    widths = [mult * d for mult in t.width_mult]
    for i, module in enumerate(t.group):
        rows = pairs[module]["B"].shape[0] if module in pairs else widths[i]
        if rows != widths[i]:
            raise ExportError(
                f"{source}: {module}.lora_B has {rows} output rows but {bfl} needs {widths[i]} there "
                f"(part {i} of {len(t.group)}); unsupported FLUX variant"
            )
    return widths


def _resolve_input(path: Path) -> Path:
    if path.is_dir():
        candidate = path / LORA_WEIGHTS_NAME
        if not candidate.is_file():
            raise LoraFileMissing(
                f"{path} has no {LORA_WEIGHTS_NAME}; pass a training output folder or a LoRA .safetensors file"
            )
        return candidate
    if not path.is_file():
        raise LoraFileMissing(f"{path} does not exist")
    if path.suffix != ".safetensors":
        raise ExportError(f"{path}: only .safetensors LoRA files can be converted")
    return path


def _run_config_for(folder: Path) -> Path | None:
    """The run's ``config.yaml`` for a LoRA in ``folder``: beside it (a training output folder), or one folder up
    when ``folder`` is one of the run's ``checkpoint-<step>`` folders; None when there is none."""
    for candidate in (folder, folder.parent) if folder.name.startswith("checkpoint-") else (folder,):
        if (candidate / "config.yaml").is_file():
            return candidate / "config.yaml"
    return None


def _base_model_of(folder: Path) -> str | None:
    """The run's base model from its ``config.yaml`` (:func:`_run_config_for`), when there is one."""
    cfg = _run_config_for(folder)
    if cfg is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
        value = data["model"]["pretrained_model_name_or_path"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError):
        return None
    return str(value) if value is not None else None


def _base_transformer_config(folder: Path) -> dict[str, Any] | None:
    """The transformer config of the run's base model, when the run's ``config.yaml`` (:func:`_run_config_for`) names a
    local diffusers folder (the LoRA's widths are then checked against it), else None."""
    base = _base_model_of(folder)
    if base is None:
        return None
    try:
        return json.loads((Path(base).expanduser() / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _lora_width(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The model width a LoRA was trained for: the input width of any attention projection's lora_A."""
    for k, v in state_dict.items():
        if re.search(r"attn\.to_[qkv]\.lora_A\.weight$", k):
            return int(v.shape[1])
    return None


def export_comfyui(
    lora_path_or_output_dir: str | Path,
    out_path: str | Path | None = None,
    transformer_config: Mapping[str, Any] | None = None,
    layout: str = SPLIT,
) -> Path:
    """Read a diffusers FLUX LoRA file (or an output folder holding one) and write its ComfyUI/kohya twin.

    Args:
        lora_path_or_output_dir: ``pytorch_lora_weights.safetensors`` or the folder that holds it.
        out_path: output file; default ``lora_comfyui.safetensors`` beside the input.
        transformer_config: optional ``FluxTransformer2DModel`` config for width checks.
        layout: ``"split"`` (default, smallest) or ``"fused"`` (original FLUX names for kohya tools).

    Returns:
        The written path. The safetensors header records the format, source file, base model and ranks.
    """
    src = _resolve_input(Path(lora_path_or_output_dir))
    out = Path(out_path) if out_path is not None else src.parent / COMFYUI_LORA_NAME
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; name the file to write, e.g. {out / COMFYUI_LORA_NAME}")
    if src.stat().st_size == 0:
        raise ExportError(f"{src} is empty (0 bytes); convert the LoRA file a finished run wrote")
    try:
        with safe_open(str(src), framework="pt") as f:
            header = f.metadata() or {}
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ExportError(
            f"{src} is not a complete safetensors file (truncated, or another kind of file under this name): "
            f"{str(e).splitlines()[0][:200]}. Convert the LoRA file a finished run wrote"
        ) from None
    if not any(".lora_A." in k or ".lora_B." in k for k in state_dict):
        raise ExportError(f"{src} holds no LoRA (no lora_A/lora_B tensors); pass a diffusers FLUX LoRA file")
    if transformer_config is None:
        transformer_config = _base_transformer_config(src.parent)
    width = _lora_width(state_dict)
    if transformer_config is None and width is not None and width != FLUX1_WIDTH:
        logger.warning(
            "%s is a LoRA for a model %d wide; FLUX.1, the model ComfyUI loads, is %d wide, so ComfyUI cannot apply "
            "the converted file (no base model config beside it to check against).", src, width, FLUX1_WIDTH,
        )
    raw_meta = header.get(METADATA_KEY)
    try:
        config = parse_adapter_metadata(raw_meta)
    except json.JSONDecodeError as e:
        raise ExportError(f"{src}: the {METADATA_KEY} header is not valid JSON ({e})") from None
    converted = convert_diffusers_lora_to_comfyui(
        state_dict, config, transformer_config, source=str(src), layout=layout
    )
    down_suffix = ".lora_A.weight" if layout == SPLIT else ".lora_down.weight"
    ranks = sorted({v.shape[0] for k, v in converted.items() if k.endswith(down_suffix)})
    file_meta = {
        "format": "pt",
        "ss_base_model_version": "flux1",
        "modelspec.architecture": "flux-1-dev/lora",
        "ss_network_dim": str(config.get("r")) if config else str(max(ranks)),
        "ss_network_alpha": str(config.get("lora_alpha")) if config else str(max(ranks)),
        "layout": layout,
        "source_file": src.name,
    }
    if layout == SPLIT:
        file_meta["lora_format"] = "transformer.<diffusers FLUX module>.lora_A / lora_B / alpha, one LoRA per module"
        file_meta["alpha_convention"] = "alpha / rank(lora_A) is the module's PEFT scale; lora_A / lora_B as trained"
    else:
        file_meta["lora_format"] = "kohya lora_unet_* (lora_down / lora_up / alpha), original FLUX module names"
        file_meta["ss_network_module"] = "networks.lora_flux"
        file_meta["alpha_convention"] = (
            "alpha / rank(lora_down) is the layer's scale when its parts share one PEFT scale (lora_up as trained); "
            "otherwise alpha == rank and each part's scale is folded into its block of lora_up"
        )
        file_meta["fused_ranks"] = ",".join(str(r) for r in ranks)
    base = _base_model_of(src.parent)
    if base is not None:
        file_meta["base_model"] = shareable_model_name(base)  # a hub id or a folder name, never a local path
    with writing(out, "the ComfyUI LoRA"):
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(converted, str(out), metadata=file_meta)
    return respect_umask(out)  # safetensors leaves 0600; others (a ComfyUI container) must read it
