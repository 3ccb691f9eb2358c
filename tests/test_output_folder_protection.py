"""The output folder: a finished run is never touched by a resume; a live run holds a lock on it.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import train_kontext_lora as tk
from kontext.training.config import config_from_dict

from reliability_helpers import REPO, cfg_dict, run_main_expect_user_error, tree_state, write_yaml
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


def test_resuming_a_finished_run_never_touches_it(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, no_model_load, capsys):
    """Resuming a finished run is refused with the ways on, and never trains from scratch over it (also when it kept
    no checkpoint); the folder is left exactly as it was."""
    fin = tmp_path / "fin"
    shutil.copytree(finished["out"], fin)
    config = write_yaml(tmp_path / "c.yaml", cfg_dict(fin, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache"))
    before = tree_state(fin)
    cases = [
        # (overrides, words of the message)
        (["checkpoint.resume_from=latest"], f"output_dir {fin} holds a run that finished at step 4; resuming it with "
                                            "train.max_steps=4 would train nothing"),
        (["checkpoint.resume_from=latest", "train.max_steps=3"], "finished at step 4"),
        ([f"checkpoint.resume_from={fin / 'checkpoint-2'}"], "finished at step 4"),
    ]
    for overrides, needle in cases:
        err = run_main_expect_user_error(["--config", str(config), *overrides], capsys)
        assert needle in err and "train.max_steps above 4" in err, err
        # all three ways on, whatever resume_from says: more steps, a new folder, or overwrite
        assert "choose a new output_dir" in err and "checkpoint.overwrite_output_dir=true" in err, err
        assert tree_state(fin) == before, overrides

    # The same run with no checkpoint to continue from (checkpoint.every_steps: 0): never a fresh start over it.
    for ckpt in fin.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    before = tree_state(fin)
    for overrides in (["checkpoint.resume_from=latest"], ["checkpoint.resume_from=latest", "train.max_steps=8"]):
        err = run_main_expect_user_error(["--config", str(config), *overrides], capsys)
        assert f"output_dir {fin} holds a finished run (pytorch_lora_weights.safetensors) and no checkpoint" in err, err
        assert "train again from scratch" in err and "overwrite_output_dir=true" in err
        assert tree_state(fin) == before, overrides


def _probe_lock(out: Path) -> subprocess.CompletedProcess:
    """Another process trying to take the output folder's lock."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; "
        f"from kontext.training.output_dir import lock_output_dir; lock_output_dir(Path({str(out)!r}), main=True, create=False)"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_a_running_trainer_holds_its_output_folder(tmp_path, tiny_model_dir, tiny_dataset_dir):
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 2})
    run = tk.setup(config_from_dict(d))
    probe = _probe_lock(out)
    assert probe.returncode != 0
    assert f"output_dir {out} is in use by another training run (pid {os.getpid()} on " in probe.stderr, probe.stderr
    tk.finish(run, tk.train(run))
    assert not (out / ".kontext-lora.lock").exists()
    assert _probe_lock(out).returncode == 0  # released when the run ends
