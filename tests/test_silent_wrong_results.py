"""Inputs that would give a wrong result without a word are refused or corrected, and said (docs/reliability.md,
section 11): a resume on another base model, ``latest`` after branching, a prompt file's byte-order mark, a LoRA
converted for a model of another width, a non-finite LoRA strength, an empty mask composited.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

import train_kontext_lora as tk
from kontext.training.checkpoint import finalize, list_checkpoints, temp_path
from kontext.training.resume import resolve_resume


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(folder.rglob("*"))}


# ---------------------------------------------------------------------------------------------
# Resume: the branch being trained, the base it was trained on
# ---------------------------------------------------------------------------------------------


def test_latest_follows_the_branch_being_trained(tmp_path):
    """Checkpoints 2, 4, 6; the user resumes from checkpoint-2 and the new branch saves checkpoint-4 before it is
    stopped: ``latest`` is that checkpoint-4, not the abandoned branch's checkpoint-6, and rotation keeps it."""
    from checkpoint_files import write_checkpoint_files

    out = tmp_path / "out"

    def save(step: int, limit: int | None = None) -> Path:
        write_checkpoint_files(temp_path(out, step))
        return finalize(out, step, {"step": step, "data": {"epoch": 0, "position": step}, "lora": {}}, limit)

    for step in (2, 4, 6):
        save(step)
    assert resolve_resume(out, "latest") == out / "checkpoint-6"
    save(4)  # the branch resumed from checkpoint-2 replaces checkpoint-4
    assert resolve_resume(out, "latest") == out / "checkpoint-4"
    assert list_checkpoints(out) == [out / "checkpoint-2", out / "checkpoint-6", out / "checkpoint-4"]
    save(6, limit=2)  # the branch goes on: its checkpoint-6 replaces the abandoned one, rotation keeps the branch
    assert list_checkpoints(out) == [out / "checkpoint-4", out / "checkpoint-6"]
    assert resolve_resume(out, "latest") == out / "checkpoint-6"


def _other_base(tiny_model_dir: Path, dst: Path, perturb: bool) -> Path:
    """A copy of the tiny model; with ``perturb`` its transformer's weights differ (every shape the same)."""
    shutil.copytree(tiny_model_dir, dst)
    if perturb:
        weights = dst / "transformer" / "diffusion_pytorch_model.safetensors"
        sd = load_file(str(weights))
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in sd.items()}, str(weights))
    return dst


def test_resuming_on_another_base_with_the_same_shapes_is_refused(two_step_run, tiny_model_dir, tmp_path,
                                                                   no_model_load, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["base_model"]["name_or_path"] == str(tiny_model_dir) and state["base_model"]["fingerprint"]
    d = copy.deepcopy(two_step_run["dict"])
    d.update(output_dir=str(out))
    d["train"]["max_steps"] = 4
    d["checkpoint"]["resume_from"] = "latest"
    other = _other_base(tiny_model_dir, tmp_path / "other_base", perturb=True)
    d["model"]["pretrained_model_name_or_path"] = str(other)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    before = _tree(out)
    capsys.readouterr()
    assert tk.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"was trained on the base model '{tiny_model_dir}'" in err and str(other) in err, err
    assert "checkpoint.allow_other_base=true" in err and "Traceback" not in err, err
    assert _tree(out) == before
    # Meant: allowed explicitly, it goes on to load the model.
    with pytest.raises(AssertionError, match="base model was loaded"):
        tk.main(["--config", str(config), "checkpoint.allow_other_base=true"])
    # The same base, moved: its fingerprint is the checkpoint's, so it is accepted without the override.
    moved = _other_base(tiny_model_dir, tmp_path / "moved_base", perturb=False)
    with pytest.raises(AssertionError, match="base model was loaded"):
        tk.main(["--config", str(config), f"model.pretrained_model_name_or_path={moved}"])


# ---------------------------------------------------------------------------------------------
# Data and tools
# ---------------------------------------------------------------------------------------------


def test_a_prompt_file_with_a_byte_order_mark_trains_on_the_prompt(tiny_dataset_dir, tmp_path):
    from data import open_source

    root = tmp_path / "set"
    shutil.copytree(tiny_dataset_dir, root)
    (root / "prompts" / "00000.txt").write_text("insert the red bottle\n", encoding="utf-8-sig")
    assert (root / "prompts" / "00000.txt").read_bytes().startswith(b"\xef\xbb\xbf")
    src = open_source("folder", root)
    assert src.prompt(src.names.index("00000")) == "insert the red bottle"


def test_comfyui_refuses_a_lora_of_another_width(tiny_model_dir, random_lora, tmp_path, caplog, capsys):
    from kontext.export.comfyui import export_comfyui
    from kontext.tools.comfyui import main as comfyui_main

    run = tmp_path / "run"
    lora = random_lora(tiny_model_dir, run, seed=0)
    other = _other_base(tiny_model_dir, tmp_path / "wide_base", perturb=False)
    cfg = json.loads((other / "transformer" / "config.json").read_text())
    cfg["attention_head_dim"] *= 2
    (other / "transformer" / "config.json").write_text(json.dumps(cfg))
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": str(other)}}))
    with pytest.raises(ValueError, match="belongs to another model"):
        export_comfyui(run)
    with pytest.raises(SystemExit) as info:
        comfyui_main([str(run)])
    assert info.value.code == 2 and "belongs to another model" in capsys.readouterr().err
    assert not (run / "lora_comfyui.safetensors").exists()
    # Its own base beside it: converted. No base known: converted, and the width FLUX.1 cannot take is said.
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"pretrained_model_name_or_path": str(tiny_model_dir)}}))
    assert export_comfyui(run).is_file()
    (run / "config.yaml").unlink()
    with caplog.at_level(logging.WARNING):
        export_comfyui(lora, tmp_path / "bare.safetensors")
    assert any("ComfyUI cannot apply" in r.getMessage() for r in caplog.records), caplog.text


@pytest.mark.parametrize("strength", ["nan", "inf", "-inf"])
def test_a_non_finite_lora_strength_is_refused(strength, tiny_model_dir, random_lora, tmp_path):
    from kontext.tools.common import InferenceError, parse_lora_spec

    lora = random_lora(tiny_model_dir, tmp_path / "run", seed=0)
    with pytest.raises(InferenceError, match=f"the strength '{strength}' is not a finite number"):
        parse_lora_spec(f"{lora}:{strength}")


def test_an_empty_mask_with_composite_is_refused_before_the_model_loads(tmp_path, no_model_load, capsys):
    from kontext.tools.infer import main as infer_main

    scene, mask = tmp_path / "scene.png", tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(scene)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mask)
    args = ["--model", "tiny", "--image", str(scene), "--prompt", "p", "--mask", str(mask), "--out", str(tmp_path / "r.png")]
    capsys.readouterr()
    assert infer_main([*args, "--composite"]) == 2
    err = capsys.readouterr().err
    assert f"--mask '{mask}' is empty" in err and "drop --mask and --composite" in err, err
    assert not (tmp_path / "r.png").exists()
    # Without --composite the hint drawn from an empty mask marks nothing: refused too, before the model loads.
    assert infer_main(args) == 2
    assert "the mask hint would mark no region" in capsys.readouterr().err
    # With --mask-hint none and no --composite the mask is not used: no error, it goes on to load the model.
    with pytest.raises(AssertionError, match="base model was loaded"):
        infer_main([*args, "--mask-hint", "none"])
