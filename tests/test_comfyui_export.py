"""The ComfyUI / original-FLUX export keeps every layer's effective LoRA delta exactly.

A tiny real FluxTransformer2DModel gets a real PEFT LoRA (rank != alpha, a rank_pattern and an alpha_pattern
entry, one q/k/v part left out), is saved with FluxKontextPipeline.save_lora_weights exactly as the trainer does,
converted, and compared layer by layer with PEFT's own per-module deltas.
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

from kontext.comfyui import (
    COMFYUI_LORA_NAME,
    DIFFUSERS_LORA_NAME,
    convert_diffusers_lora_to_comfyui,
    export_comfyui,
)
from kontext.comfyui import main as comfyui_main

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
        weight_name=DIFFUSERS_LORA_NAME,
        safe_serialization=True,
    )
    return folder / DIFFUSERS_LORA_NAME


def peft_deltas(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
    """PEFT's own scaled delta ``[out, in]`` for every LoRA module (scaling included)."""
    return {
        name: module.get_delta_weight("default").detach().float()
        for name, module in transformer.named_modules()
        if isinstance(module, LoraLayer)
    }


def expected_bfl_deltas(transformer: FluxTransformer2DModel) -> dict[str, torch.Tensor]:
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
    te = "time_text_embed"
    for src, dst in {
        "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        f"{te}.timestep_embedder.linear_1": "time_in.in_layer", f"{te}.timestep_embedder.linear_2": "time_in.out_layer",
        f"{te}.text_embedder.linear_1": "vector_in.in_layer", f"{te}.text_embedder.linear_2": "vector_in.out_layer",
        f"{te}.guidance_embedder.linear_1": "guidance_in.in_layer",
        f"{te}.guidance_embedder.linear_2": "guidance_in.out_layer",
    }.items():  # fmt: skip
        out[dst] = part(src)
    # BFL's final adaLN emits [shift; scale], diffusers' norm_out [scale; shift].
    scale, shift = part("norm_out.linear").chunk(2, dim=0)
    out["final_layer.adaLN_modulation.1"] = torch.cat([shift, scale])
    return {k: v for k, v in out.items() if v.abs().sum() > 0}


def file_deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Effective delta of a kohya file as ComfyUI computes it: alpha / rank(down) * up @ down."""
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


def test_every_original_layer_has_the_same_delta(trained):
    transformer, folder = trained
    out = export_comfyui(folder)
    assert out == folder / COMFYUI_LORA_NAME
    sd = load_file(str(out))
    got = file_deltas(sd)
    want = {"lora_unet_" + k.replace(".", "_"): v for k, v in expected_bfl_deltas(transformer).items()}
    assert set(got) == set(want)
    # all 18 linear kinds of the tiny model are covered, so the check spans every original layer type
    assert len(want) == len(bfl_weight_names(TINY["num_layers"], TINY["num_single_layers"]))
    for key, w in want.items():
        rel = (got[key] - w).norm() / w.norm()
        assert rel <= 1e-4, f"{key}: relative difference {rel:.2e}"
    # the scales really differ between parts, so a wrong per-part scale would have been caught
    scales = {m.scaling["default"] for m in transformer.modules() if isinstance(m, LoraLayer)}
    assert len(scales) >= 3


def test_keys_are_ones_comfyui_maps_for_flux(trained):
    _, folder = trained
    sd = load_file(str(export_comfyui(folder, folder / "k.safetensors")))
    mapped = comfyui_key_map(TINY["num_layers"], TINY["num_single_layers"])
    for key, value in sd.items():
        base, _, suffix = key.partition(".")
        assert base in mapped, key
        assert suffix in {"lora_down.weight", "lora_up.weight", "alpha"}, key
        if suffix == "alpha":
            assert value.ndim == 0 and value.item() == sd[f"{base}.lora_down.weight"].shape[0]


def test_fused_layer_layout_and_shapes(trained):
    transformer, folder = trained
    sd = load_file(str(export_comfyui(folder, folder / "s.safetensors")))
    # single block 0: ranks q=4, k=2 (rank_pattern), v=4, mlp=6 (rank_pattern) -> fused rank 16
    down = sd["lora_unet_single_blocks_0_linear1.lora_down.weight"]
    up = sd["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert down.shape == (16, INNER) and up.shape == (3 * INNER + 4 * INNER, 16)
    # block-diagonal: q rows only use q's rank columns
    assert torch.all(up[:INNER, 4:] == 0) and torch.all(up[3 * INNER :, :10] == 0)
    # txt qkv lacks add_v_proj: rank 4 + 4 ("attn.to_k" does not match add_k_proj), v rows zero
    up_txt = sd["lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight"]
    assert up_txt.shape == (3 * INNER, 8) and torch.all(up_txt[2 * INNER :] == 0)
    # no lora_adapter_metadata in the kohya file: diffusers would otherwise apply it to the wrong ranks
    with safe_open(str(folder / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert "lora_adapter_metadata" not in meta
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
    assert meta["source_file"] == DIFFUSERS_LORA_NAME


def test_transformer_config_checks_and_rslora(tmp_path):
    config = LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["attn.to_q", "proj_mlp"])
    transformer = make_lora_transformer(config, seed=3)
    path = save_like_trainer(transformer, tmp_path)
    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()["lora_adapter_metadata"]
    out = convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=transformer.config)
    got = file_deltas(out)
    want = {"lora_unet_" + k.replace(".", "_"): v for k, v in expected_bfl_deltas(transformer).items()}
    assert set(got) == set(want)
    for key, w in want.items():
        assert ((got[key] - w).norm() / w.norm()) <= 1e-4, key
    # a config of another width is refused with the module named
    wrong = dict(transformer.config, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"inner_dim=64"):
        convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=wrong)
    fewer = dict(transformer.config, num_layers=1)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1.*num_layers=1"):
        convert_diffusers_lora_to_comfyui(sd, meta, transformer_config=fewer)


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
    with pytest.raises(FileNotFoundError, match=DIFFUSERS_LORA_NAME):
        export_comfyui(tmp_path)


def test_diffusers_kohya_reader_reads_the_file_back(tmp_path):
    """diffusers' kohya reader hard-codes FLUX.1's 3072/12288 split only for single blocks' linear1,
    so a LoRA without single-block q/k/v/mlp parts round-trips through it on the tiny model."""
    targets = [t for t in ALL_TARGETS if t not in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    targets = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_v"] + targets
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, alpha_pattern={"attn.to_add_out": 2})
    original = make_lora_transformer(config, seed=5)
    save_like_trainer(original, tmp_path)
    out = export_comfyui(tmp_path)

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


def test_diffusers_reader_fails_on_tiny_linear1_only_for_its_fixed_width(trained):
    """With single blocks' linear1 present, diffusers' reader trips over its hard-coded 3072/12288 split."""
    _, folder = trained
    out = export_comfyui(folder, folder / "full.safetensors")
    sd = load_file(str(out))
    with pytest.raises(AssertionError):
        FluxKontextPipeline.lora_state_dict(dict(sd))
    no_linear1 = {k: v for k, v in sd.items() if "_linear1." not in k}
    assert FluxKontextPipeline.lora_state_dict(dict(no_linear1))


def test_cli_writes_the_file(trained, tmp_path, capsys):
    _, folder = trained
    target = tmp_path / "cli_out.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "kontext.comfyui", str(folder / DIFFUSERS_LORA_NAME), "--out", str(target)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(target) in proc.stdout
    assert file_deltas(load_file(str(target))).keys() == file_deltas(load_file(str(export_comfyui(folder)))).keys()
    # the error path in-process (a second interpreter start would double the test's time)
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
    out = convert_diffusers_lora_to_comfyui(sd, {"r": 4, "lora_alpha": 12, "rank_pattern": rank_pattern})
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
