"""The ComfyUI export keeps every layer's effective LoRA delta exactly, in both layouts.

A tiny real FluxTransformer2DModel gets a real PEFT LoRA (rank != alpha, a rank_pattern and an alpha_pattern
entry, one q/k/v part left out), is saved with FluxKontextPipeline.save_lora_weights exactly as the trainer does,
converted, applied to the original FLUX weights the way ComfyUI's loader applies a LoRA (its key map for FLUX,
slice offsets for q/k/v/mlp, the final adaLN's swap, ``alpha / rank``), and compared layer by layer with PEFT's
own per-module deltas. At FLUX.1's real width the LoRA tensors alone are built and merged into random weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxTransformer2DModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kontext.export.comfyui import (
    COMFYUI_LORA_NAME,
    LAYOUTS,
    convert_diffusers_lora_to_comfyui,
    export_comfyui,
)
from kontext.runtime.lora_io import LORA_WEIGHTS_NAME
from kontext.tools.comfyui import main as comfyui_main

REPO = Path(__file__).resolve().parents[1]

TINY = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
INNER = 32  # heads * head_dim

ALL_TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj",  # add_v_proj deliberately absent: its rows must be zero
    "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear",
    "proj_mlp", "proj_out", "x_embedder", "context_embedder", "linear_1", "linear_2",
]  # fmt: skip


# diffusers name -> original FLUX (BFL) name of the top-level Linear layers (norm_out.linear, whose halves swap,
# is handled on its own), written out here from ComfyUI's key map rather than taken from kontext.tools.comfyui.
_TE = "time_text_embed"
TOP_LEVEL_NAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    f"{_TE}.timestep_embedder.linear_1": "time_in.in_layer", f"{_TE}.timestep_embedder.linear_2": "time_in.out_layer",
    f"{_TE}.text_embedder.linear_1": "vector_in.in_layer", f"{_TE}.text_embedder.linear_2": "vector_in.out_layer",
    f"{_TE}.guidance_embedder.linear_1": "guidance_in.in_layer",
    f"{_TE}.guidance_embedder.linear_2": "guidance_in.out_layer",
}  # fmt: skip


def bfl_weight_names(num_double: int, num_single: int) -> list[str]:
    """Every Linear weight of BFL's original Flux model (flux/model.py), written out by hand."""
    names = ["img_in", "txt_in", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for emb in ("time_in", "vector_in", "guidance_in"):
        names += [f"{emb}.in_layer", f"{emb}.out_layer"]
    for i in range(num_double):
        for s in ("img", "txt"):
            names += [f"double_blocks.{i}.{s}_{m}" for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    for i in range(num_single):
        names += [f"single_blocks.{i}.{m}" for m in ("linear1", "linear2", "modulation.lin")]
    return names


def comfyui_key_map(num_double: int, num_single: int) -> set[str]:
    """ComfyUI's model_lora_keys_unet rule: lora_unet_ + each diffusion_model.*.weight key, dots to underscores."""
    return {"lora_unet_" + n.replace(".", "_") for n in bfl_weight_names(num_double, num_single)}


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def comfyui_targets(num_double: int, num_single: int, hidden: int) -> dict[str, tuple]:
    """ComfyUI's LoRA key map for a FLUX model, written out from its rules (comfy/lora.py, comfy/utils.py).

    ``lora key -> (original weight name, (dim, start, length) or None, function applied to the delta or None)``:
    ``lora_unet_`` + every original weight name with dots as underscores, and ``transformer.`` + every diffusers
    FLUX Linear, whose q/k/v/mlp parts address a slice of the fused original weight and whose ``norm_out.linear``
    has its [scale; shift] halves swapped into BFL's [shift; scale].
    """
    names = bfl_weight_names(num_double, num_single)
    out: dict[str, tuple] = {"lora_unet_" + n.replace(".", "_"): (n, None, None) for n in names}
    d = hidden

    def slices(src_parts, dst, widths):
        start = 0
        for src, w in zip(src_parts, widths):
            out[f"transformer.{src}"] = (dst, (0, start, w), None)
            start += w

    for i in range(num_double):
        p, q = f"transformer_blocks.{i}", f"double_blocks.{i}"
        slices([f"{p}.attn.to_{x}" for x in "qkv"], f"{q}.img_attn.qkv", [d] * 3)
        slices([f"{p}.attn.add_{x}_proj" for x in "qkv"], f"{q}.txt_attn.qkv", [d] * 3)
        for src, dst in {
            "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
            "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        }.items():  # fmt: skip
            out[f"transformer.{p}.{src}"] = (f"{q}.{dst}", None, None)
    for i in range(num_single):
        p, q = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        slices([f"{p}.attn.to_{x}" for x in "qkv"] + [f"{p}.proj_mlp"], f"{q}.linear1", [d, d, d, 4 * d])
        out[f"transformer.{p}.proj_out"] = (f"{q}.linear2", None, None)
        out[f"transformer.{p}.norm.linear"] = (f"{q}.modulation.lin", None, None)
    for src, dst in TOP_LEVEL_NAMES.items():
        out[f"transformer.{src}"] = (dst, None, None)
    out["transformer.norm_out.linear"] = ("final_layer.adaLN_modulation.1", None, _swap_halves)
    return out


def comfyui_apply(
    lora: dict[str, torch.Tensor], weights: dict[str, torch.Tensor], targets: dict[str, tuple], strength: float = 1.0
) -> set[str]:
    """Merge ``lora`` into ``weights`` (in place) as ComfyUI does; returns the file keys it consumed.

    Per mapped key: ``up``/``down`` from ``.lora_up``/``.lora_down`` or ``.lora_B``/``.lora_A``, the factor
    ``alpha / rank(down)`` (1 without ``.alpha``), ``up @ down`` in float32, the function (if any) on the scaled
    delta, added in the weight's dtype to the whole weight or to ``weight.narrow(dim, start, length)``. Only
    targets present in ``weights`` are applied (ComfyUI skips keys its model lacks).
    """
    used: set[str] = set()
    for x, (name, offset, fn) in targets.items():
        for up_s, down_s in (("lora_up.weight", "lora_down.weight"), ("lora_B.weight", "lora_A.weight")):
            if f"{x}.{up_s}" in lora:
                break
        else:
            continue
        up, down = lora[f"{x}.{up_s}"], lora[f"{x}.{down_s}"]
        used |= {f"{x}.{up_s}", f"{x}.{down_s}"}
        alpha = 1.0
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item() / down.shape[0]
            used.add(f"{x}.alpha")
        if name not in weights:
            continue
        w = weights[name] if offset is None else weights[name].narrow(*offset)
        delta = ((strength * alpha) * torch.mm(up.float(), down.float())).reshape(w.shape)
        w += (fn(delta) if fn is not None else delta).to(w.dtype)
    return used


def comfyui_deltas(lora: dict[str, torch.Tensor], shapes: dict[str, torch.Size], hidden: int = INNER):
    """Every original layer's delta under ComfyUI's rules (zero base weights); asserts every key was read."""
    weights = {n: torch.zeros(s) for n, s in shapes.items()}
    used = comfyui_apply(lora, weights, comfyui_targets(TINY["num_layers"], TINY["num_single_layers"], hidden))
    assert used == set(lora), f"keys ComfyUI would not load: {sorted(set(lora) - used)[:6]}"
    return {n: w for n, w in weights.items() if w.abs().sum() > 0}


def _json_safe(v):
    if isinstance(v, (set, frozenset)):
        return sorted(_json_safe(x) for x in v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def make_lora_transformer(config: LoraConfig, seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY)
    transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed + 1)
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            b = module.lora_B["default"].weight
            b.data = torch.randn(b.shape, generator=g) * 0.1
    return transformer


def save_like_trainer(transformer: FluxTransformer2DModel, folder: Path) -> Path:
    FluxKontextPipeline.save_lora_weights(
        save_directory=str(folder),
        transformer_lora_layers=get_peft_model_state_dict(transformer, adapter_name="default"),
        transformer_lora_adapter_metadata=_json_safe(transformer.peft_config["default"].to_dict()),
        weight_name=LORA_WEIGHTS_NAME,
        safe_serialization=True,
    )
    return folder / LORA_WEIGHTS_NAME


def peft_deltas(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """PEFT's own scaled delta ``[out, in]`` for every LoRA module (scaling included)."""
    return {
        name: module.get_delta_weight("default").detach().float()
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer)
    }


def expected_bfl_deltas(transformer: FluxTransformer2DModel, keep_zero: bool = False) -> dict[str, torch.Tensor]:
    """Stack the diffusers deltas into the original FLUX layers (zeros for parts without a LoRA)."""
    d = peft_deltas(transformer)
    mods = dict(transformer.named_modules())

    def part(name: str) -> torch.Tensor:
        w = mods[name].base_layer.weight if hasattr(mods[name], "base_layer") else mods[name].weight
        return d.get(name, torch.zeros(w.shape))

    out: dict[str, torch.Tensor] = {}
    for i in range(TINY["num_layers"]):
        p = f"transformer_blocks.{i}"
        out[f"double_blocks.{i}.img_attn.qkv"] = torch.cat([part(f"{p}.attn.to_{x}") for x in "qkv"])
        out[f"double_blocks.{i}.txt_attn.qkv"] = torch.cat([part(f"{p}.attn.add_{x}_proj") for x in "qkv"])
        for src, dst in {
            "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
            "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
            "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
        }.items():  # fmt: skip
            out[f"double_blocks.{i}.{dst}"] = part(f"{p}.{src}")
    for i in range(TINY["num_single_layers"]):
        p = f"single_transformer_blocks.{i}"
        out[f"single_blocks.{i}.linear1"] = torch.cat(
            [part(f"{p}.attn.to_{x}") for x in "qkv"] + [part(f"{p}.proj_mlp")]
        )
        out[f"single_blocks.{i}.linear2"] = part(f"{p}.proj_out")
        out[f"single_blocks.{i}.modulation.lin"] = part(f"{p}.norm.linear")
    for src, dst in TOP_LEVEL_NAMES.items():
        out[dst] = part(src)
    # BFL's final adaLN emits [shift; scale], diffusers' norm_out [scale; shift].
    scale, shift = part("norm_out.linear").chunk(2, dim=0)
    out["final_layer.adaLN_modulation.1"] = torch.cat([shift, scale])
    return {k: v for k, v in out.items() if keep_zero or v.abs().sum() > 0}


def bfl_shapes(transformer: FluxTransformer2DModel) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in expected_bfl_deltas(transformer, keep_zero=True).items()}


def file_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective delta per fused-layout key as a kohya loader computes it: alpha / rank(down) * up @ down."""
    out = {}
    for key in sd:
        if key.endswith(".lora_down.weight"):
            base = key[: -len(".lora_down.weight")]
            down, up = sd[key].float(), sd[f"{base}.lora_up.weight"].float()
            alpha = sd[f"{base}.alpha"].item()
            out[base] = (alpha / down.shape[0]) * up @ down
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ALL_TARGETS,
        rank_pattern={"single_transformer_blocks.0.proj_mlp": 6, "attn.to_k": 2},
        alpha_pattern={"transformer_blocks.1.attn.to_v": 3},
    )
    transformer = make_lora_transformer(config)
    folder = tmp_path_factory.mktemp("run")
    save_like_trainer(transformer, folder)
    return transformer, folder


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_original_layer_has_the_same_delta_in_comfyui(trained, layout):
    transformer, folder = trained
    out = export_comfyui(folder, folder / f"{layout}.safetensors", layout=layout)
    got = comfyui_deltas(load_file(str(out)), bfl_shapes(transformer))
    want = expected_bfl_deltas(transformer)
    assert set(got) == set(want)
    # all 18 linear kinds of the tiny model are covered, so the check spans every original layer type
    assert len(want) == len(bfl_weight_names(TINY["num_layers"], TINY["num_single_layers"]))
    for key, w in want.items():
        rel = (got[key] - w).norm() / w.norm()
        assert rel <= 1e-6, f"{key}: relative difference {rel:.2e}"
    # the scales really differ between parts, so a wrong per-part scale would have been caught
    scales = {m.scaling["default"] for m in transformer.modules() if isinstance(m, LoraLayer)}
    assert len(scales) >= 3


def test_split_is_the_default_and_holds_the_trained_factors(trained):
    transformer, folder = trained
    out = export_comfyui(folder)
    assert out == folder / COMFYUI_LORA_NAME
    sd = load_file(str(out))
    peft = get_peft_model_state_dict(transformer, adapter_name="default")
    lora_modules = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer)}
    assert {k for k in sd if not k.endswith(".alpha")} == {f"transformer.{k}" for k in peft}
    for name, module in lora_modules.items():
        key = f"transformer.{name}"
        assert torch.equal(sd[f"{key}.lora_A.weight"], peft[f"{name}.lora_A.weight"])
        assert torch.equal(sd[f"{key}.lora_B.weight"], peft[f"{name}.lora_B.weight"])
        # ComfyUI's alpha / rank(lora_A) is PEFT's scaling for the module
        assert sd[f"{key}.alpha"].item() / sd[f"{key}.lora_A.weight"].shape[0] == module.scaling["default"], name
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert "lora_adapter_metadata" not in meta and meta["layout"] == "split"
    # one LoRA per diffusers module is smaller than the fused layout's zero-padded blocks
    fused = export_comfyui(folder, folder / "fused_size.safetensors", layout="fused")
    assert out.stat().st_size < fused.stat().st_size


@pytest.mark.parametrize("layout", LAYOUTS)
def test_keys_are_ones_comfyui_maps_for_flux(trained, layout):
    _, folder = trained
    sd = load_file(str(export_comfyui(folder, folder / f"k_{layout}.safetensors", layout=layout)))
    mapped = comfyui_targets(TINY["num_layers"], TINY["num_single_layers"], INNER)
    suffixes = {
        "split": {"lora_A.weight", "lora_B.weight", "alpha"},
        "fused": {"lora_down.weight", "lora_up.weight", "alpha"},
    }
    for key, value in sd.items():
        (suffix,) = [x for x in suffixes[layout] if key.endswith("." + x)]
        base = key[: -len(suffix) - 1]
        assert base in mapped, key
        assert (base.startswith("lora_unet_") if layout == "fused" else base.startswith("transformer.")), key
        assert suffix in suffixes[layout], key
        if suffix == "alpha":
            assert value.ndim == 0 and value.dtype == torch.float32


def test_fused_layer_layout_and_shapes(trained):
    transformer, folder = trained
    sd = load_file(str(export_comfyui(folder, folder / "s.safetensors", layout="fused")))
    # single block 0: ranks q=4, k=2 (rank_pattern), v=4, mlp=6 (rank_pattern) -> fused rank 16
    down = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (16, INNER) and up.shape == (3 * INNER + 4 * INNER, 16)
    # block-diagonal: q rows only use q's rank columns
    assert torch.all(up[:INNER, 4:] == 0) and torch.all(up[3 * INNER :, :10] == 0)
    # txt qkv lacks add_v_proj: rank 4 + 4 ("attn.to_k" does not match add_k_proj), v rows zero
    up_txt = sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"]
    assert up_txt.shape == (3 * INNER, 8) and torch.all(up_txt[2 * INNER :] == 0)
    # its two parts share the scale 8 / 4, so that goes into alpha (2 * fused rank 8) and up keeps lora_B as trained
    peft = get_peft_model_state_dict(transformer, adapter_name="default")
    assert sd["lora_unet_double_blocks_0_txt_attn_qkv.alpha"].item() == 16.0
    assert torch.equal(up_txt[:INNER, :4], peft["transformer_blocks.0.attn.add_q_proj.lora_B.weight"])
    # linear1's parts have scales 2, 4, 2 and 8/6: alpha == rank, each scale in its block of up
    assert sd["lora_unet_single_blocks_0_linear1.alpha"].item() == 16.0
    b_k = peft["single_transformer_blocks.0.attn.to_k.lora_B.weight"]
    assert torch.allclose(up[INNER : 2 * INNER, 4:6], 4 * b_k, rtol=1e-6, atol=0)
    # diffusers' kohya reader ignores final_layer's alpha: there the scale stays in up
    final = "lora_unet_final_layer_linear"
    assert sd[f"{final}.alpha"].item() == sd[f"{final}.lora_down.weight"].shape[0]
    # no lora_adapter_metadata in the kohya file: diffusers would otherwise apply it to the wrong ranks
    with safe_open(str(folder / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert "lora_adapter_metadata" not in meta
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["source_file"] == LORA_WEIGHTS_NAME and meta["layout"] == "fused"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_transformer_config_checks_and_rslora(tmp_path, layout):
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["attn.to_q", "proj_mlp"])
    transformer = make_lora_transformer(config, seed=3)
    path = save_like_trainer(transformer, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()["lora_adapter_metadata"]
    out = convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=transformer.config, layout=layout)
    got = comfyui_deltas(out, bfl_shapes(transformer))
    want = expected_bfl_deltas(transformer)
    assert set(got) == set(want)
    for key, w in want.items():
        assert ((got[key] - w).norm() / w.norm()) <= 1e-6, key
    # a config of another width is refused with the module named
    wrong = dict(transformer.config, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"inner_dim=64"):
        convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=wrong, layout=layout)
    fewer = dict(transformer.config, num_layers=1)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1.*num_layers=1"):
        convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=fewer, layout=layout)
    with pytest.raises(ValueError, match="layout"):
        convert_diffusers_lora_to_comfyui(sd, meta, layout="padded")


def test_errors_name_file_and_key(tmp_path):
    bad = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, INNER),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(INNER, 2),
        "transformer.transformer_blocks.0.attn.mystery.lora_A.weight": torch.zeros(2, INNER),
    }
    path = tmp_path / "odd.safetensors"
    save_file(bad, str(path), metadata={"lora_adapter_metadata": json.dumps({"transformer.r": 2})})
    with pytest.raises(ValueError, match=r"odd\.safetensors.*attn\.mystery"):
        export_comfyui(path)
    half = {"transformer.proj_out.lora_A.weight": torch.zeros(2, INNER)}
    with pytest.raises(ValueError, match=r"proj_out has no lora_B"):
        convert_diffusers_lora_to_comfyui(half, None)
    wrong_rank = {
        "transformer.proj_out.lora_A.weight": torch.zeros(3, INNER),
        "transformer.proj_out.lora_B.weight": torch.zeros(64, 3),
    }
    with pytest.raises(ValueError, match=r"rank 3 .* says 2"):
        convert_diffusers_lora_to_comfyui(wrong_rank, {"r": 2, "lora_alpha": 2})
    with pytest.raises(ValueError, match="DoRA"):
        convert_diffusers_lora_to_comfyui(wrong_rank, {"r": 3, "use_dora": True})
    with pytest.raises(FileNotFoundError, match=LORA_WEIGHTS_NAME):
        export_comfyui(tmp_path)


def test_diffusers_kohya_reader_reads_the_file_back(tmp_path):
    """diffusers' kohya reader hard-codes FLUX.1's 3072/12288 split only for single blocks' linear1,
    so a LoRA without single-block q/k/v/mlp parts round-trips through it on the tiny model."""
    targets = [t for t in ALL_TARGETS if t not in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v"] + targets
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"attn.to_add_out": 2})
    original = make_lora_transformer(config, seed=5)
    save_like_trainer(original, tmp_path)
    out = export_comfyui(tmp_path, layout="fused")

    converted, alphas = FluxKontextPipeline.lora_state_dict(str(out), return_alphas=True)
    assert converted and not alphas  # alpha == rank was folded, nothing left for diffusers to rescale
    torch.manual_seed(0)
    fresh = FluxTransformer2DModel(**TINY)
    fresh.load_lora_adapter(converted, prefix="transformer", adapter_name="default")
    back = peft_deltas(fresh)
    want = peft_deltas(original)
    in_blocks = {n for n in want if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    # diffusers 0.42's kohya reader emits the top-level layers (x_embedder, norm_out, ...) without the
    # `transformer.` prefix, so its own loader drops them; every block layer must come back exactly.
    assert set(want) - set(back) == set(want) - in_blocks
    # to_q/to_v picked singly, 10 other kinds per double block, proj_out + norm.linear per single block
    assert len(in_blocks) == 2 + 2 * 10 + 2 * 2
    for name in in_blocks:
        rel = (back[name] - want[name]).norm() / want[name].norm()
        assert rel <= 1e-4, f"{name}: {rel:.2e}"
    # parts the reader re-creates from the zero blocks (to_k, add_v_proj, ...) carry no delta
    for name in set(back) - set(want):
        assert back[name].abs().max() == 0, name


@pytest.mark.slow
def test_module_command_writes_the_file(trained, tmp_path):
    _, folder = trained
    target = tmp_path / "cli_out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "kontext.tools.comfyui", str(folder / LORA_WEIGHTS_NAME), "--out", str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout and "split layout" in proc.stdout
    assert load_file(str(target)).keys() == load_file(str(export_comfyui(folder))).keys()


def test_cli_writes_the_file(trained, tmp_path, capsys):
    _, folder = trained
    target = tmp_path / "cli_out.safetensors"
    assert comfyui_main([str(folder / LORA_WEIGHTS_NAME), "--out", str(target)]) == 0
    out = capsys.readouterr().out
    assert str(target) in out and "split layout" in out
    assert load_file(str(target)).keys() == load_file(str(export_comfyui(folder))).keys()
    fused = tmp_path / "cli_fused.safetensors"
    assert comfyui_main([str(folder), "--out", str(fused), "--layout", "fused"]) == 0
    assert "fused layout" in capsys.readouterr().out
    assert file_deltas(load_file(str(fused))).keys() == {
        "lora_unet_" + k.replace(".", "_") for k in expected_bfl_deltas(trained[0])
    }
    # the error path in-process
    with pytest.raises(SystemExit) as exit_info:
        comfyui_main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("ranks", [(4, 4, 4, 4), (4, 2, 0, 6)])
def test_diffusers_reader_splits_real_width_linear1_back(ranks):
    """At FLUX.1's real width (3072, MLP 12288) diffusers' reader can split single blocks' linear1 again.

    Equal ranks take its block-diagonal ("sparse") path, unequal ranks (and a missing part) its dense path;
    both must return each part's own delta. Only the LoRA tensors are built, not the 12B model.
    """
    g = torch.Generator().manual_seed(7)
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    widths = [3072, 3072, 3072, 12288]
    sd, want = {}, {}
    for part, width, r in zip(parts, widths, ranks):
        if r == 0:
            continue
        name = f"single_transformer_blocks.5.{part}"
        a, b = torch.randn(r, 3072, generator=g), torch.randn(width, r, generator=g)
        sd[f"transformer.{name}.lora_A.weight"], sd[f"transformer.{name}.lora_B.weight"] = a, b
        want[name] = (12 / r) * b @ a
    rank_pattern = {p.split(".")[-1]: r for p, r in zip(parts, ranks) if r not in (0, 4)}
    out = convert_diffusers_lora_to_comfyui(
        sd, {"r": 4, "lora_alpha": 12, "rank_pattern": rank_pattern}, layout="fused"
    )
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    assert set(out) == {f"lora_unet_single_blocks_5_linear1.{s}" for s in suffixes}
    back = FluxKontextPipeline.lora_state_dict(dict(out))
    for name, w in want.items():
        a = back[f"transformer.{name}.lora_A.weight"]
        b = back[f"transformer.{name}.lora_B.weight"]
        rel = (b @ a - w).norm() / w.norm()
        assert rel <= 1e-4, f"{name}: {rel:.2e}"
    if 0 in ranks:
        missing = parts[ranks.index(0)]
        b = back[f"transformer.single_transformer_blocks.5.{missing}.lora_B.weight"]
        assert b.abs().max() == 0


def test_diffusers_reads_the_split_file_completely(trained, tmp_path):
    """diffusers reads the split file's per-module alphas as network alphas: every layer, top-level ones too."""
    original, folder = trained
    out = export_comfyui(folder, tmp_path / "split.safetensors")
    converted, alphas = FluxKontextPipeline.lora_state_dict(str(out), return_alphas=True)
    assert alphas and all(k.endswith(".alpha") for k in alphas)
    torch.manual_seed(0)
    fresh = FluxTransformer2DModel(**TINY)
    fresh.load_lora_adapter(converted, network_alphas=alphas, prefix="transformer", adapter_name="default")
    back, want = peft_deltas(fresh), peft_deltas(original)
    assert set(back) == set(want)
    assert {"proj_out", "norm_out.linear", "x_embedder"} <= set(back)
    for name in want:
        rel = (back[name] - want[name]).norm() / want[name].norm()
        assert rel <= 1e-6, f"{name}: {rel:.2e}"


FLUX_WIDTH, FLUX_MLP = 3072, 12288


def real_width_lora(rank: int = 16, seed: int = 11):
    """LoRA tensors of FLUX.1's real shapes for one double block, one single block and the final layer.

    Block 0's ``add_v_proj`` has no LoRA (its rows must stay untouched); ``proj_mlp`` has its own alpha, so the
    fused layout has to fold per-part scales into ``up`` there and can fold one shared scale into ``alpha``
    everywhere else.
    """
    g = torch.Generator().manual_seed(seed)
    d = FLUX_WIDTH
    out_rows = {
        **{f"transformer_blocks.0.attn.to_{x}": d for x in "qkv"},
        "transformer_blocks.0.attn.add_q_proj": d,
        "transformer_blocks.0.attn.add_k_proj": d,
        **{f"single_transformer_blocks.0.attn.to_{x}": d for x in "qkv"},
        "single_transformer_blocks.0.proj_mlp": FLUX_MLP,
        "norm_out.linear": 2 * d,
        "proj_out": 64,
    }
    sd = {}
    for name, rows in out_rows.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, d, generator=g) / d**0.5
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(rows, rank, generator=g)
    config = {"r": rank, "lora_alpha": 12, "alpha_pattern": {"single_transformer_blocks.0.proj_mlp": 20}}
    return sd, config


def real_width_reference(sd, config, base: dict[str, torch.Tensor], rank: int = 16) -> dict[str, torch.Tensor]:
    """Float64 merge of the diffusers LoRA into the original FLUX weights, from FLUX's own layout (not the map)."""
    d = FLUX_WIDTH
    ref = {k: v.double().clone() for k, v in base.items()}

    def add(target, rows, name, swap=False):
        if target not in ref:
            return
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        a = sd[f"transformer.{name}.lora_A.weight"].double()
        b = sd[f"transformer.{name}.lora_B.weight"].double()
        delta = (alpha / rank) * b @ a
        if swap:  # diffusers' norm_out emits [scale; shift], FLUX's final adaLN [shift; scale]
            scale, shift = delta.chunk(2)
            delta = torch.cat([shift, scale])
        ref[target][rows] += delta

    for i, x in enumerate("qkv"):
        rows = slice(i * d, (i + 1) * d)
        add("double_blocks.0.img_attn.qkv", rows, f"transformer_blocks.0.attn.to_{x}")
        add("single_blocks.0.linear1", rows, f"single_transformer_blocks.0.attn.to_{x}")
        if x != "v":
            add("double_blocks.0.txt_attn.qkv", rows, f"transformer_blocks.0.attn.add_{x}_proj")
    add("single_blocks.0.linear1", slice(3 * d, None), "single_transformer_blocks.0.proj_mlp")
    add("final_layer.adaLN_modulation.1", slice(None), "norm_out.linear", swap=True)
    add("final_layer.linear", slice(None), "proj_out")
    return ref


def test_comfyui_merges_both_layouts_identically_at_flux_width():
    """Merged into random FLUX.1-shaped weights under ComfyUI's rules, split and fused files give the float64
    result to float32 rounding, leave the rows of parts without a LoRA bit-identical, and the split file is the
    smaller one. One original layer at a time, so at most one fused weight and its copies are in memory."""
    sd, config = real_width_lora()
    split = convert_diffusers_lora_to_comfyui(sd, config, layout="split")
    fused = convert_diffusers_lora_to_comfyui(sd, config, layout="fused")
    # the fused layout folded the shared scale 12 / 16 into alpha where it could (not where proj_mlp differs)
    assert fused["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 0.75 * 48
    assert fused["lora_unet_single_blocks_0_linear1.alpha"].item() == 64
    shapes = {
        "double_blocks.0.img_attn.qkv": (3 * FLUX_WIDTH, FLUX_WIDTH),
        "double_blocks.0.txt_attn.qkv": (3 * FLUX_WIDTH, FLUX_WIDTH),
        "single_blocks.0.linear1": (3 * FLUX_WIDTH + FLUX_MLP, FLUX_WIDTH),
        "final_layer.adaLN_modulation.1": (2 * FLUX_WIDTH, FLUX_WIDTH),
        "final_layer.linear": (64, FLUX_WIDTH),
    }
    targets = comfyui_targets(19, 38, FLUX_WIDTH)
    used_split, used_fused = set(), set()
    g = torch.Generator().manual_seed(3)
    eps = torch.finfo(torch.float32).eps
    for name, shape in shapes.items():
        base = {name: torch.randn(shape, generator=g)}
        ref = real_width_reference(sd, config, base)[name].float()  # float64 result, rounded once
        tol = 8 * eps * ref.abs().max().item()
        merged = {}
        for layout, lora, used in (("split", split, used_split), ("fused", fused, used_fused)):
            weights = {name: base[name].clone()}
            used |= comfyui_apply(lora, weights, targets)
            merged[layout] = weights[name]
            err = (weights[name] - ref).abs_().max().item()
            assert err <= tol, f"{layout} {name}: max error {err:.2e}"
        if name == "double_blocks.0.txt_attn.qkv":  # add_v_proj has no LoRA: its rows are untouched, bit for bit
            for layout in LAYOUTS:
                assert torch.equal(merged[layout][2 * FLUX_WIDTH :], base[name][2 * FLUX_WIDTH :]), layout
        diff = (merged["split"] - merged["fused"]).abs_().max().item()
        assert diff <= tol, f"{name}: layouts differ by {diff:.2e}"
    assert used_split == set(split) and used_fused == set(fused)
    # size: per-module tensors versus zero-padded fused ones
    n_split = sum(t.numel() for t in split.values())
    n_fused = sum(t.numel() for t in fused.values())
    assert n_split == sum(t.numel() for t in sd.values()) + len(sd) // 2
    assert n_fused > 1.5 * n_split


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bf16_file_rounds_only_the_trained_factors(layout):
    """In bf16 the applied delta is the PEFT scale times the bf16-rounded factors' product, to float32 rounding:
    the shared scale lives in ``alpha``, not multiplied into ``lora_B`` before rounding (which would add a second
    bf16 rounding, checked below to be visible). The fused layout keeps final_layer's scale in ``up`` for
    diffusers' kohya reader, so there only the looser bound holds."""
    g = torch.Generator().manual_seed(21)
    d, r = INNER, 4
    rows = {
        **{f"transformer_blocks.0.attn.to_{x}": d for x in "qkv"},
        "transformer_blocks.0.attn.add_q_proj": d,
        **{f"single_transformer_blocks.0.attn.to_{x}": d for x in "qkv"},
        "single_transformer_blocks.0.proj_mlp": 4 * d,
        "norm_out.linear": 2 * d,
        "proj_out": 64,
    }
    sd = {}
    for name, n in rows.items():
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, d, generator=g)
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(n, r, generator=g)
    scale = 0.75  # alpha 3 / rank 4: not a power of two, so multiplying it into a bf16 factor rounds again
    out = convert_diffusers_lora_to_comfyui(sd, {"r": r, "lora_alpha": 3}, dtype=torch.bfloat16, layout=layout)
    assert all(v.dtype == torch.bfloat16 for k, v in out.items() if not k.endswith(".alpha"))

    def rounded(name, fold=False):  # the part's delta from bf16 factors, the scale applied afterwards or before
        a = sd[f"transformer.{name}.lora_A.weight"].bfloat16().float()
        b = sd[f"transformer.{name}.lora_B.weight"]
        if fold:
            return (scale * b).bfloat16().float() @ a
        return scale * (b.bfloat16().float() @ a)

    def exact(name):
        return scale * sd[f"transformer.{name}.lora_B.weight"] @ sd[f"transformer.{name}.lora_A.weight"]

    parts = {
        "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{x}" for x in "qkv"],
        "single_blocks.0.linear1": [f"single_transformer_blocks.0.attn.to_{x}" for x in "qkv"]
        + ["single_transformer_blocks.0.proj_mlp"],
        "final_layer.linear": ["proj_out"],
    }
    shapes = {"double_blocks.0.img_attn.qkv": (3 * d, d), "single_blocks.0.linear1": (7 * d, d)}
    shapes |= {"final_layer.linear": (64, d)}
    shapes |= {"double_blocks.0.txt_attn.qkv": (3 * d, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    got = comfyui_deltas(out, shapes)
    for target, names in parts.items():
        want = torch.cat([rounded(n) for n in names])
        folded = torch.cat([rounded(n, fold=True) for n in names])
        fp32 = torch.cat([exact(n) for n in names])
        rel = ((got[target] - want).norm() / want.norm()).item()
        # bf16 keeps 8 significant bits: each factor is off by at most 2^-9 relative
        assert ((got[target] - fp32).norm() / fp32.norm()).item() <= 2 * 2**-8, target
        assert ((folded - want).norm() / want.norm()).item() > 1e-4  # a second rounding would have been seen
        if layout == "fused" and target.startswith("final_layer"):
            assert torch.allclose(got[target], folded, rtol=1e-6, atol=1e-6), target
            continue
        assert rel <= 1e-6, f"{layout} {target}: {rel:.2e} from the rounded factors' delta"


def test_a_checkpoint_folder_reads_the_runs_config_one_folder_up(trained, tmp_path, caplog):
    """``python -m kontext.tools.comfyui run/checkpoint-2``: the run's config.yaml sits in ``run/``, not beside the
    checkpoint's LoRA; it still names the base model (recorded in the file) and its width (checked)."""
    import logging
    import shutil

    transformer, folder = trained
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    shutil.copy(folder / LORA_WEIGHTS_NAME, checkpoint / LORA_WEIGHTS_NAME)
    base = tmp_path / "models" / "my_base"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps(dict(transformer.config)))
    (run / "config.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {base}\n")
    with caplog.at_level(logging.WARNING, logger="kontext.export.comfyui"):
        out = export_comfyui(checkpoint)
    assert out == checkpoint / COMFYUI_LORA_NAME
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["base_model"] == "my_base"
    assert "no base model config" not in caplog.text
    # Without the run's config.yaml nothing names the base: no base_model, and the width warning says why.
    (run / "config.yaml").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kontext.export.comfyui"):
        again = export_comfyui(checkpoint, checkpoint / "again.safetensors")
    with safe_open(str(again), "pt") as f:
        assert "base_model" not in f.metadata()
    assert "no base model config beside it" in caplog.text
