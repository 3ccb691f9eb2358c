"""Changed settings on resume: the learning rate applies (loudly), batch problems are refused early.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

import train_kontext_lora as tk
from kontext.training.config import config_from_dict

from reliability_helpers import cfg_dict, run_main_expect_user_error, tree_state, write_yaml
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


def _unfinished_copy(finished, dst: Path) -> Path:
    """An output folder stopped after checkpoint-2 (no final LoRA)."""
    shutil.copytree(finished["out"] / "checkpoint-2", dst / "checkpoint-2")
    shutil.copy(finished["out"] / "config.yaml", dst / "config.yaml")
    return dst


def test_changed_learning_rate_on_resume_applies_with_a_warning(tmp_path, tiny_model_dir, tiny_dataset_dir, finished,
                                                                caplog):
    """A changed train.learning_rate on resume is used (not the checkpoint's), with a warning that says so."""
    def resumed(name: str, **train) -> tuple:
        out = _unfinished_copy(finished, tmp_path / name)
        d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 4, **train},
                     checkpoint={"resume_from": "latest"})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            run = tk.setup(config_from_dict(d))
        return run, [r.getMessage() for r in caplog.records if "changed learning-rate" in r.getMessage()]

    run, warned = resumed("same")
    assert warned == [] and run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)

    run, warned = resumed("lr", learning_rate=5e-4)
    assert len(warned) == 1 and "train.learning_rate: 0.001 -> 0.0005" in warned[0], warned
    assert "learning rate at step 2: 0.001 -> 0.0005" in warned[0]
    tk.finish(run, tk.train(run))
    history = json.loads((tmp_path / "lr" / "training_history.json").read_text())
    # The history records the rate each step really used; config.yaml the one the resumed run uses.
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    assert yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())["train"]["learning_rate"] == pytest.approx(5e-4)

    run, warned = resumed("sched", lr_scheduler="linear")
    assert len(warned) == 1 and "train.lr_scheduler: 'constant_with_warmup' -> 'linear'" in warned[0], warned
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (4 - 2) / 4)  # linear decay at step 2 of 4


def test_batch_problems_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir, finished,
                                                           no_model_load, capsys):
    out = tmp_path / "fresh"
    config = write_yaml(tmp_path / "c.yaml", cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache"))
    err = run_main_expect_user_error(["--config", str(config), "train.batch_size=16"], capsys)
    assert "train.batch_size = 16 does not fit the dataset: no full batch per process: 8 samples" in err, err
    assert not out.exists()

    unfinished = _unfinished_copy(finished, tmp_path / "unfinished")
    before = tree_state(unfinished)
    err = run_main_expect_user_error(
        ["--config", str(config), f"output_dir={unfinished}", "checkpoint.resume_from=latest", "train.batch_size=4"], capsys
    )
    assert f"Cannot resume from {unfinished / 'checkpoint-2'}: it was trained with train.batch_size = 2, this run has 4" in err
    assert tree_state(unfinished) == before
