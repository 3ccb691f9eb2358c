"""A stopped or failed run can always be resumed: the trainer recognises what it writes (or tells the user to write)
in its output folder, refuses up front a layout that mixes the run with its data, and rewrites config.yaml only
once a resume has succeeded (docs/reliability.md, section 8).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import yaml

import train_kontext_lora as tk
from kontext.runtime.pipeline import PipelineLoadError
from kontext.training.checkpoint import remove_incomplete
from kontext.training.config import config_from_dict
from kontext.training.output_dir import OutputDirError, check_layout, configured_entries, foreign_entries


def _config(tmp_path: Path, d: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_a_killed_writes_temporary_file_is_the_trainers_and_is_removed(two_step_run, tmp_path, capsys):
    """safetensors writes `.tmpXXXXXX` and renames it: a kill during the final export left one, and every later
    resume was refused as holding a file the trainer did not write."""
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    (out / ".tmpAbC123").write_bytes(b"half of a LoRA")
    (out / ".tmp-4242-config.yaml").write_text("output_dir: half")
    assert foreign_entries(out) == []
    d = copy.deepcopy(two_step_run["dict"])
    d["output_dir"] = str(out)
    d["train"]["max_steps"] = 3
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 0, capsys.readouterr().err
    assert not list(out.glob(".tmp*")), "leftovers are removed when the run starts"
    assert (out / "checkpoint-3").is_dir(), "the resumed run trained on to step 3"
    # A folder that merely starts with .tmp is not a write's leftover: still foreign, never deleted.
    (out / ".tmpdir").mkdir()
    assert foreign_entries(out) == [".tmpdir/"] and remove_incomplete(out) == [] and (out / ".tmpdir").is_dir()


def test_a_resume_that_fails_leaves_config_yaml_as_it_was(two_step_run, tmp_path, monkeypatch, capsys):
    """The model failed to load after setup had rewritten config.yaml with the failing settings, so the printed resume
    command (which names config.yaml) failed afterwards too."""
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    before = (out / "config.yaml").read_bytes()

    def fail(*a, **k):
        raise PipelineLoadError("model.pretrained_model_name_or_path: cannot load it")

    monkeypatch.setattr(tk, "load_pipeline", fail)
    d = copy.deepcopy(two_step_run["dict"])
    d["output_dir"] = str(out)
    d["train"]["max_steps"] = 4
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 2
    assert "cannot load it" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == before


def test_the_cache_and_the_synthetic_set_the_config_puts_in_output_dir_are_the_runs(tmp_path, tiny_model_dir, capsys):
    """data.cache_dir and a synthetic data.root inside output_dir (and the held-out folder the summary tells the user
    to make beside it) are written by the trainer, not someone else's files."""
    from conftest import tiny_run_dict

    out = tmp_path / "out"
    d = tiny_run_dict(out, tiny_model_dir, out / "synthetic", out / "latent_cache", train={"max_steps": 1},
                      checkpoint={"every_steps": 1})
    d["data"]["synthetic"] = {"enabled": True, "num_samples": 4, "size": 64}
    d["validation"] = {"every_steps": -1}
    capsys.readouterr()
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 0, capsys.readouterr().err
    (out / "synthetic_heldout").mkdir()
    cfg = config_from_dict(copy.deepcopy(d))
    assert configured_entries(cfg, out) == {"synthetic", "synthetic_heldout", "latent_cache"}
    assert foreign_entries(out, configured_entries(cfg, out)) == []
    d["train"]["max_steps"] = 2
    d["checkpoint"]["resume_from"] = "latest"
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 0, capsys.readouterr().err
    assert (out / "checkpoint-2").is_dir()


def test_a_layout_that_mixes_the_run_with_its_data_is_refused(tmp_path, tiny_model_dir, tiny_dataset_dir, capsys):
    from conftest import tiny_run_dict

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset_dir, data)
    cases = {
        "output_dir inside data.root": (data / "runs" / "a", data, tmp_path / "cache", "is inside the dataset folder"),
        "data.root inside output_dir": (tmp_path / "run", tmp_path / "run" / "data", tmp_path / "cache",
                                        "is inside output_dir"),
        "cache_dir is output_dir": (tmp_path / "run2", data, tmp_path / "run2", "data.cache_dir is output_dir"),
    }
    for case, (out, root, cache, needle) in cases.items():
        if case == "data.root inside output_dir":
            shutil.copytree(tiny_dataset_dir, root)
        cfg = config_from_dict(tiny_run_dict(out, tiny_model_dir, root, cache))
        with pytest.raises(OutputDirError, match=needle):
            check_layout(cfg, Path(cfg.output_dir))
        capsys.readouterr()
        assert tk.main(["--config", str(_config(tmp_path, tiny_run_dict(out, tiny_model_dir, root, cache)))]) == 2, case
        assert needle in capsys.readouterr().err, case
    assert not (data / "runs").exists() and not (tmp_path / "run2").exists()


def test_overwriting_removes_the_old_run_once_the_new_one_has_set_up(two_step_run, tmp_path, monkeypatch):
    """With overwrite_output_dir a new run stopped early sat beside the old run's finished LoRA, model card and
    history (the folder looked finished); a new run whose setup fails must leave the old run whole."""
    from kontext.training.output_dir import unlock_all

    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    d = copy.deepcopy(two_step_run["dict"])
    d["output_dir"] = str(out)
    d["checkpoint"]["overwrite_output_dir"] = True
    d["train"]["learning_rate"] = 5e-4

    def fail(*a, **k):
        raise PipelineLoadError("cannot load it")

    with monkeypatch.context() as m:
        m.setattr(tk, "load_pipeline", fail)
        with pytest.raises(tk.UserError, match="cannot load it"):
            tk.setup(config_from_dict(copy.deepcopy(d)))
        unlock_all()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "a failed overwrite changed nothing"
    try:
        tk.setup(config_from_dict(copy.deepcopy(d)))  # set up, then stopped before a step
    finally:
        unlock_all()
    left = sorted(p.name for p in out.iterdir())
    assert left == ["config.yaml"], left
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["learning_rate"] == pytest.approx(5e-4)


def test_a_run_stopped_while_writing_its_comfyui_file_says_how_to_write_it(two_step_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    d = copy.deepcopy(two_step_run["dict"])
    d["output_dir"] = str(out)
    d["export"] = {"comfyui": True}
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 2
    err = capsys.readouterr().err
    assert "finished at step 2" in err and f"python -m kontext.tools.comfyui {out / 'pytorch_lora_weights.safetensors'}" in err


def test_a_resume_with_another_optimizer_is_refused_before_the_model_loads(two_step_run, tmp_path, monkeypatch, capsys):
    """An AdamW checkpoint resumed with prodigy failed at the first step with a KeyError traceback."""
    from diffusers import FluxKontextPipeline

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", refuse)
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    d = copy.deepcopy(two_step_run["dict"])
    d["output_dir"] = str(out)
    d["train"].update(max_steps=4, optimizer="prodigy")
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    assert tk.main(["--config", str(_config(tmp_path, d))]) == 2
    err = capsys.readouterr().err
    assert "train.optimizer = 'adamw', this run has 'prodigy'" in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_evaluation_report_in_output_dir_is_the_projects(two_step_run, tmp_path):
    """The run's summary once told users to evaluate into OUTPUT_DIR/eval; such a report must not stop a resume."""
    out = tmp_path / "out"
    shutil.copytree(two_step_run["out"], out)
    (out / "eval").mkdir()
    (out / "eval" / "report.md").write_text("# Evaluation report\n\n- data: `x`\n")
    (out / "eval" / "metrics.json").write_text("{}")
    (out / "notes").mkdir()
    (out / "notes" / "report.md").write_text("# My notes\n")
    assert foreign_entries(out) == ["notes/"]
