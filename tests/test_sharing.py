"""Exports a user can share: the umask's file mode, and no local paths in what the files record."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from safetensors import safe_open

from kontext.runtime.sharing import current_umask, respect_umask, shareable_model_name


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_shareable_model_name(tmp_path):
    assert shareable_model_name("black-forest-labs/FLUX.1-Kontext-dev") == "black-forest-labs/FLUX.1-Kontext-dev"
    snap = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-Kontext-dev" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    assert shareable_model_name(str(snap)) == "black-forest-labs/FLUX.1-Kontext-dev"
    local = tmp_path / "home" / "me" / "my_kontext"
    local.mkdir(parents=True)
    assert shareable_model_name(str(local)) == "my_kontext"
    assert shareable_model_name(str(local) + "/") == "my_kontext"


def test_respect_umask(tmp_path, umask_022):
    assert current_umask() == 0o022
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"")
    os.chmod(f, 0o600)
    respect_umask(f)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644


def test_both_exports_are_readable_by_others_and_record_no_local_path(tmp_path, tiny_model_dir, random_lora, umask_022):
    from kontext.export.comfyui import export_comfyui

    out = tmp_path / "run"
    base = str(Path(tiny_model_dir).resolve())
    (out).mkdir()
    (out / "config.yaml").write_text(f"model:\n  pretrained_model_name_or_path: {base}\n")
    from diffusers import FluxTransformer2DModel

    from kontext.runtime.lora import attach_lora, make_lora_config
    from kontext.runtime.lora_io import save_lora

    t = FluxTransformer2DModel.from_pretrained(str(tiny_model_dir), subfolder="transformer")
    attach_lora(t, make_lora_config(4, 8.0, 0.0, "gaussian", ["attn.to_q", "proj_mlp"]))
    lora = save_lora(t, out, base_model=base)
    comfy = export_comfyui(out)
    for f in (lora, comfy):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        with safe_open(str(f), "pt") as h:
            header = json.dumps(h.metadata())
        assert base not in header and str(Path.home()) + "/" not in header
    with safe_open(str(lora), "pt") as h:
        meta = json.loads(h.metadata()["lora_adapter_metadata"])
    assert meta["transformer.base_model_name_or_path"] == Path(base).name
    with safe_open(str(comfy), "pt") as h:
        assert h.metadata()["base_model"] == Path(base).name


def test_model_card_dtype_base_model_and_comfyui_advice(tmp_path):
    from kontext.export.model_card import write_model_card
    from kontext.training.config import config_from_dict

    local = tmp_path / "models" / "my_kontext"
    local.mkdir(parents=True)
    cfg = config_from_dict(
        {"output_dir": str(tmp_path / "out"), "model": {"pretrained_model_name_or_path": str(local), "dtype": "float32"},
         "data": {"root": str(tmp_path / "data" / "bottle")}, "lora": {"rank": 8, "alpha": 16}}
    )
    card = write_model_card(tmp_path, cfg, {}, []).read_text()
    assert str(tmp_path) not in card
    assert "base_model: my_kontext" in card and "dtype=torch.float32" in card and "bfloat16" not in card
    assert "lora_comfyui.safetensors" in card and "alpha 16.0 != rank 8" in card and "0.5 x" in card
    # A local base: the snippet names the folder and says to give its path.
    assert "from_pretrained('my_kontext', dtype=torch.float32)  # the local base folder" in card


def _card_snippet(card: str) -> str:
    return card[card.index("```python\n") + len("```python\n"):].split("```", 1)[0]


def test_model_card_shows_the_trained_prompts_and_its_snippet_runs(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import make_random_lora

    from kontext.export.model_card import write_model_card
    from kontext.training.config import config_from_dict

    out = tmp_path / "out"
    cfg = config_from_dict(
        {"output_dir": str(out), "model": {"pretrained_model_name_or_path": str(tiny_model_dir), "dtype": "float32",
                                           "max_sequence_length": 32},
         "data": {"root": str(tmp_path / "data"), "default_prompt": "the config's default"}}
    )
    per_sample = ["insert the red can"] * 3 + ["insert the blue can", "insert the jar", "insert the bag", "insert the box"]
    make_random_lora(tiny_model_dir, out, 0)
    card = write_model_card(out, cfg, {}, [], per_sample).read_text()
    assert "the config's default" not in card, "per-sample prompts: the default was not trained"
    assert "5 different per-sample prompts over 7 samples" in card
    assert "`insert the red can` (3 samples)" in card and card.count("(1 sample)") == 2  # the most frequent three
    # The diffusers snippet runs as written in the run's folder (and loads the LoRA it names).
    monkeypatch.chdir(out)
    scope: dict = {}
    exec(_card_snippet(card), scope)
    assert scope["pipe"].transformer.peft_config
    one = write_model_card(out, cfg, {}, [], ["insert the red can"] * 4).read_text()
    assert "- Prompt (every sample): `insert the red can`" in one and "the config's default" not in one
