"""Atomic checkpoints: a failed or interrupted save never leaves a checkpoint that `latest` could pick.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.checkpoint import TRAINER_STATE_NAME, finalize, list_checkpoints, remove_incomplete, temp_path
from kontext.training.config import config_from_dict
from kontext.training.resume import resolve_resume

from reliability_helpers import LORA_FILE, cfg_dict, fake_state, lora_of, max_diff
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


def test_failure_inside_a_save_keeps_previous_checkpoint_usable(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, monkeypatch):
    """The save of checkpoint-4 dies half-way (disk full, LoRA file half written): one message naming the intact
    checkpoint-2, the partial checkpoint removed, and checkpoint-2 resumes exactly."""
    real_export = lora_io.save_lora

    def export_then_crash(transformer, out_dir, *args, **kwargs):
        if Path(out_dir).name == "checkpoint-4.tmp":
            Path(out_dir, LORA_FILE).write_bytes(b"half a file")  # as a full disk would leave it
            raise OSError(28, "No space left on device")
        return real_export(transformer, out_dir, *args, **kwargs)

    monkeypatch.setattr(lora_io, "save_lora", export_then_crash)
    out = tmp_path / "out"
    # total_limit 1: rotation must not delete checkpoint-2 for a checkpoint-4 that never completed.
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", checkpoint={"every_steps": 2, "total_limit": 1},
                 train={"max_steps": 6})
    with pytest.raises(tk.UserError) as info:
        tk.run_training(config_from_dict(copy.deepcopy(d)))
    assert str(info.value).startswith(f"no space left on device while writing checkpoint-4 in {out}. "), info.value
    assert f"the newest intact checkpoint is {out / 'checkpoint-2'}" in str(info.value)
    assert "checkpoint.resume_from=latest" in str(info.value) and "\n" not in str(info.value)

    assert not (out / "checkpoint-4.tmp").exists(), "the partial checkpoint must be removed"
    assert not (out / "checkpoint-4").exists()
    for p in out.glob("checkpoint-*"):
        if re.fullmatch(r"checkpoint-\d+", p.name):
            assert (p / TRAINER_STATE_NAME).is_file(), f"{p} looks like a checkpoint but is incomplete"
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert resolve_resume(out, "latest") == out / "checkpoint-2"

    # The next start continues from step 2 as if nothing had happened.
    monkeypatch.setattr(lora_io, "save_lora", real_export)
    d["train"]["max_steps"] = 4
    d["checkpoint"]["resume_from"] = "latest"
    run = tk.run_training(config_from_dict(d))
    assert not list(out.glob("*.tmp"))
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    assert [h["loss/total"] for h in run.history] == pytest.approx([h["loss/total"] for h in finished["history"]], rel=1e-6)
    assert max_diff(lora_of(run), finished["lora"]) <= 1e-6


def test_failure_writing_trainer_state_leaves_no_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    """trainer_state.json is the last file written: if that write fails, the folder never becomes a checkpoint, and the
    run stops with one message naming the error and the intact checkpoint (the partial folder removed)."""
    import kontext.training.checkpoint as ck

    real_write = Path.write_text

    def failing_write(self, *a, **k):
        if self.name == TRAINER_STATE_NAME and self.parent.name == "checkpoint-4.tmp":
            raise OSError(5, "Input/output error")
        return real_write(self, *a, **k)

    monkeypatch.setattr(ck.Path, "write_text", failing_write)
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", checkpoint={"every_steps": 2, "total_limit": 1},
                 train={"max_steps": 6})
    with pytest.raises(tk.UserError) as info:
        tk.run_training(config_from_dict(d))
    assert str(info.value).startswith(f"could not write checkpoint-4 in {out} (Input/output error)"), info.value
    assert f"the newest intact checkpoint is {out / 'checkpoint-2'}" in str(info.value)
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert not (out / "checkpoint-4").exists() and not (out / "checkpoint-4.tmp").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def _fake_checkpoint(out: Path, step: int, total_limit: int | None) -> Path:
    """A small checkpoint with every file a real one has (so it passes ``verify_checkpoint``)."""
    from checkpoint_files import write_checkpoint_files

    tmp = temp_path(out, step)
    write_checkpoint_files(tmp)
    return finalize(out, step, fake_state(step), total_limit)


def test_rotation_keeps_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "out"
    for step in (2, 4, 6):
        _fake_checkpoint(out, step, total_limit=2)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    # An incomplete folder with a higher step is neither counted, nor picked, nor a reason to delete.
    (out / "checkpoint-9").mkdir()
    (out / "checkpoint-8.tmp").mkdir()
    _fake_checkpoint(out, 7, total_limit=1)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-7"]
    assert resolve_resume(out, "latest") == out / "checkpoint-7"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(out, str(out / "checkpoint-9"))
    # Re-saving the newest step replaces it and still leaves exactly one complete checkpoint.
    _fake_checkpoint(out, 7, total_limit=1)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-7"]
    assert not list(out.glob("checkpoint-7.*"))


def test_crash_while_replacing_a_checkpoint_restores_it(tmp_path, monkeypatch):
    """Re-saving a step moves the old folder aside first; a crash before the new one is in place loses nothing."""
    import kontext.training.checkpoint as ck

    out = tmp_path / "out"
    _fake_checkpoint(out, 4, total_limit=1)
    (out / "checkpoint-4" / "marker").write_text("old")
    tmp = temp_path(out, 4)
    tmp.mkdir()
    real_rename = Path.rename

    def crash_on_promote(self, target):
        if self.name == "checkpoint-4.tmp":
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(ck.Path, "rename", crash_on_promote)
    from checkpoint_files import write_checkpoint_files

    write_checkpoint_files(tmp)
    with pytest.raises(OSError, match="Input/output"):
        finalize(out, 4, fake_state(4), 1)
    monkeypatch.setattr(ck.Path, "rename", real_rename)
    assert not (out / "checkpoint-4").exists() and (out / "checkpoint-4.old").is_dir()
    remove_incomplete(out)  # what the next start does
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "marker").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]


def test_overwrite_output_dir_removes_the_old_runs_checkpoints(tmp_path, tiny_model_dir, tiny_dataset_dir, finished):
    """With checkpoint.overwrite_output_dir the old run's checkpoint-4 can never be resumed into the new run."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 1},
                 checkpoint={"every_steps": 0, "overwrite_output_dir": True})
    run = tk.run_training(config_from_dict(d))
    assert run.stop_reason == "done"
    assert not list(out.glob("checkpoint-*"))
    assert json.loads((out / "training_history.json").read_text())[-1]["step"] == 1
