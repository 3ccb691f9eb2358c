"""A checkpoint is verified before a run resumes from it, and after it is written (docs/reliability.md, section 2).

The damaged files are made from a real trained run's checkpoints (what accelerate's ``save_state`` and the
trainer's save hook write: ``pytorch_lora_weights.safetensors``, ``optimizer.bin``, ``scheduler.bin``,
``random_states_0.pkl``, ``trainer_state.json``).
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    finalize,
    is_disk_full,
    list_checkpoints,
    temp_path,
    verify_checkpoint,
)
from kontext.training.config import config_from_dict
from kontext.training.resume import check_data_position, resolve_resume

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """A finished 4-step run with checkpoint-2 and checkpoint-4, and the dict that described it."""
    from conftest import tiny_run_dict

    root = tmp_path_factory.mktemp("trained")
    d = tiny_run_dict(root / "out", tiny_model_dir, tiny_dataset_dir, root / "cache", checkpoint={"every_steps": 2, "total_limit": 3})
    tk.run_training(config_from_dict(copy.deepcopy(d)))
    return {"out": root / "out", "dict": d}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _inf_lora(path: Path) -> None:
    sd = load_file(str(path))
    k = next(iter(sd))
    sd[k] = sd[k].clone()
    sd[k].view(-1)[0] = float("inf")
    save_file(sd, str(path))


def _drop_data_position(path: Path) -> None:
    state = json.loads(path.read_text())
    del state["data"]
    path.write_text(json.dumps(state))


def _edit_state(ckpt: Path, **fields) -> None:
    path = ckpt / "trainer_state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


# damage -> (what to do to checkpoint-4, the words the report must contain)
DAMAGES = {
    "truncated LoRA": (lambda c: _truncate(c / LORA), f"{LORA} is truncated or not a safetensors file"),
    "empty LoRA": (lambda c: (c / LORA).write_bytes(b""), f"{LORA} is empty (0 bytes)"),
    "LoRA with inf": (lambda c: _inf_lora(c / LORA), f"{LORA} holds NaN/inf weights"),
    "missing LoRA": (lambda c: (c / LORA).unlink(), f"{LORA} is missing"),
    "missing optimizer": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "empty optimizer": (lambda c: (c / "optimizer.bin").write_bytes(b""), "optimizer.bin is empty (0 bytes)"),
    "truncated optimizer": (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin is truncated or unreadable"),
    "missing scheduler": (lambda c: (c / "scheduler.bin").unlink(), "scheduler.bin is missing"),
    "empty scheduler": (lambda c: (c / "scheduler.bin").write_bytes(b""), "scheduler.bin is empty (0 bytes)"),
    "truncated RNG state": (lambda c: _truncate(c / "random_states_0.pkl"), "random_states_0.pkl is truncated or unreadable"),
    "missing RNG state": (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "truncated trainer_state": (lambda c: _truncate(c / "trainer_state.json"), "trainer_state.json is not valid JSON"),
    "trainer_state without data": (
        lambda c: _drop_data_position(c / "trainer_state.json"),
        "trainer_state.json lacks the step or the data position",
    ),
    # Wrong types: each was accepted, then failed half-way through a resume with a traceback.
    "step as text": (lambda c: _edit_state(c, step="4"), "trainer_state.json has step '4'; a step is an integer >= 0"),
    "step true": (lambda c: _edit_state(c, step=True), "trainer_state.json has step True"),
    "negative step": (lambda c: _edit_state(c, step=-4), "trainer_state.json has step -4"),
    "step of another folder": (lambda c: _edit_state(c, step=6), "trainer_state.json says step 6 but the folder is checkpoint-4"),
    "position as text": (lambda c: _edit_state(c, data={"epoch": 0, "position": "2"}), "trainer_state.json has data.position = '2'"),
    "history not a list": (lambda c: _edit_state(c, history=5), "trainer_state.json has history = '5'; it must be a list of mappings"),
    "lora not a mapping": (lambda c: _edit_state(c, lora="r4"), "trainer_state.json has lora = 'r4'; it must be a mapping"),
    "num_processes as text": (lambda c: _edit_state(c, num_processes="1"), "trainer_state.json has num_processes = '1'"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_damaged_checkpoint_is_named_and_latest_falls_back(case, trained, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    damage, needle = DAMAGES[case]
    assert verify_checkpoint(out / "checkpoint-4") is None  # the real checkpoint is intact
    damage(out / "checkpoint-4")

    problem = verify_checkpoint(out / "checkpoint-4")
    assert problem is not None and needle in problem, problem
    assert verify_checkpoint(out / "checkpoint-2") is None
    # latest: the newest intact one, said in one warning naming the damaged one and its file.
    warnings: list[str] = []
    assert resolve_resume(out, "latest", warn=warnings.append) == out / "checkpoint-2"
    assert len(warnings) == 1, warnings
    assert f"{out / 'checkpoint-4'} ({needle}" in warnings[0] and f"intact one, {out / 'checkpoint-2'}" in warnings[0]
    # An explicit path: refused, naming the checkpoint and the file.
    with pytest.raises(CheckpointError) as info:
        resolve_resume(out, str(out / "checkpoint-4"))
    assert f"checkpoint {out / 'checkpoint-4'} is damaged: {needle}" in str(info.value)


def _tree(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _main(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = tk.main(args)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err + cap.out
    return rc, cap.err


def test_damaged_checkpoints_are_refused_before_the_model_loads(trained, tmp_path, no_model_load, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    (out / "checkpoint-4" / "optimizer.bin").write_bytes(b"")
    d = copy.deepcopy(trained["dict"])
    d["output_dir"] = str(out)
    d["train"]["max_steps"] = 6
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    before = _tree(out)

    rc, err = _main(["--config", str(config), f"checkpoint.resume_from={out / 'checkpoint-4'}"], capsys)
    assert rc == 2 and err.count("error: ") == 1, err
    assert f"checkpoint {out / 'checkpoint-4'} is damaged: optimizer.bin is empty (0 bytes)" in err, err
    assert _tree(out) == before

    _truncate(out / "checkpoint-2" / LORA)
    before = _tree(out)
    rc, err = _main(["--config", str(config), "checkpoint.resume_from=latest"], capsys)
    assert rc == 2 and err.count("error: ") == 1, err
    assert f"no intact checkpoint in {out}" in err and "checkpoint-4 (optimizer.bin is empty" in err, err
    assert f"checkpoint-2 ({LORA} is truncated" in err, err
    assert _tree(out) == before


def test_latest_resumes_from_the_newest_intact_checkpoint(trained, tmp_path, capsys, caplog):
    """Without the check, accelerate crashed on the damaged optimizer file (and silently skips a damaged RNG file)."""
    out = tmp_path / "out"
    shutil.copytree(trained["out"], out)
    _truncate(out / "checkpoint-4" / "optimizer.bin")
    d = copy.deepcopy(trained["dict"])
    d["output_dir"] = str(out)
    d["train"]["max_steps"] = 6
    d["checkpoint"]["resume_from"] = "latest"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        assert tk.main(["--config", str(config)]) == 0
    cap = capsys.readouterr()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "Damaged" in r.getMessage()]
    assert len(warned) == 1 and f"skipped: {out / 'checkpoint-4'} (optimizer.bin is truncated" in warned[0], warned
    assert f"Resumed from {out / 'checkpoint-2'} at step 2." in cap.out
    history = json.loads((out / "training_history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # Steps 3 and 4 were trained again and re-saved: checkpoint-4 is intact now.
    assert verify_checkpoint(out / "checkpoint-4") is None


# ---------------------------------------------------------------------------------------------
# After writing: a checkpoint counts only once it reads back
# ---------------------------------------------------------------------------------------------


def test_a_checkpoint_that_does_not_read_back_is_never_promoted(tmp_path):
    from checkpoint_files import write_checkpoint_files

    out = tmp_path / "out"
    tmp = write_checkpoint_files(temp_path(out, 2))
    state = {"step": 2, "data": {"epoch": 0, "position": 2}, "lora": {}}
    assert finalize(out, 2, state, None) == out / "checkpoint-2"
    tmp = write_checkpoint_files(temp_path(out, 4))
    _truncate(tmp / LORA)  # what a writer that lost data without raising leaves
    with pytest.raises(CheckpointWriteError, match=f"checkpoint-4.tmp does not read back intact: {LORA} is truncated"):
        finalize(out, 4, dict(state, step=4), None)
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / "checkpoint-4").exists()


def _failed_run_message(out: Path, model_dir: Path, data_dir: Path, monkeypatch, save_lora) -> str:
    """The error of a 6-step run (checkpoints every 2) whose checkpoints' LoRA is written by ``save_lora``."""
    from conftest import tiny_run_dict

    monkeypatch.setattr(lora_io, "save_lora", save_lora)
    d = tiny_run_dict(out, model_dir, data_dir, out.parent / "cache", train={"max_steps": 6})
    with pytest.raises(tk.UserError) as info:
        tk.run_training(config_from_dict(d))
    return str(info.value)


def test_a_save_that_loses_data_silently_stops_with_one_message(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch):
    real_export = lora_io.save_lora

    def export_truncated(transformer, out_dir, *args, **kwargs):
        path = real_export(transformer, out_dir, *args, **kwargs)
        if Path(out_dir).name == "checkpoint-4.tmp":
            _truncate(path)  # no error raised: the data is simply not all there
        return path

    out = tmp_path / "out"
    msg = _failed_run_message(out, tiny_model_dir, tiny_dataset_dir, monkeypatch, export_truncated)
    assert msg.startswith(f"checkpoint-4 in {out} was not written intact (checkpoint-4.tmp does not read back intact: "), msg
    assert "is the disk full?" in msg and f"the newest intact checkpoint is {out / 'checkpoint-2'}" in msg, msg
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / "checkpoint-4.tmp").exists()


def test_full_disk_errors_are_recognised():
    """What Python, torch's writer and safetensors raise when the disk is full; other errors are not."""
    full = [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"),
        RuntimeError("basic_ios::clear: iostream error"),
        Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
    ]
    chained = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    chained.__context__ = OSError(errno.ENOSPC, "No space left on device")
    for e in full + [chained]:
        assert is_disk_full(e), e
    for e in (OSError(errno.EIO, "Input/output error"), RuntimeError("unexpected pos 704 vs 598"), ValueError("bad")):
        assert not is_disk_full(e), e


# ---------------------------------------------------------------------------------------------
# Batches that fit the data (before the model loads)
# ---------------------------------------------------------------------------------------------


def test_batches_are_checked_against_the_data_and_the_checkpoint(tiny_dataset_dir):
    from data import open_source

    source = open_source("folder", tiny_dataset_dir)  # 8 samples of 64 px
    cfg = config_from_dict({"data": {"resolution": 64}, "train": {"batch_size": 2}})
    check_data_position(source, cfg, 1)
    cfg.train.batch_size = 16
    with pytest.raises(CheckpointError, match=r"train.batch_size = 16 does not fit the dataset: no full batch per process"):
        check_data_position(source, cfg, 1)
    cfg.train.batch_size = 4
    with pytest.raises(CheckpointError, match=r"train.batch_size = 4 does not fit the dataset"):
        check_data_position(source, cfg, 3)  # 2 batches of 4 for 3 processes
    saved = {"data": {"epoch": 0, "position": 2, "seed": 0, "batch_size": 2, "num_replicas": 1, "num_batches": 4}}
    with pytest.raises(CheckpointError, match=r"it was trained with train.batch_size = 2, this run has 4"):
        check_data_position(source, cfg, 1, Path("ckpt"), saved)
    cfg.train.batch_size = 2
    check_data_position(source, cfg, 1, Path("ckpt"), saved)
    with pytest.raises(CheckpointError, match=r"num_batches=5 but this run has num_batches=4"):
        check_data_position(source, cfg, 1, Path("ckpt"), {"data": dict(saved["data"], num_batches=5)})


def test_a_sample_alone_in_its_aspect_bucket_is_named(tmp_path, caplog):
    """With aspect buckets and batch 2, a lone wide sample would never be drawn: the check says which."""
    import logging

    import numpy as np
    from PIL import Image

    from data import open_source

    root = tmp_path / "set"
    for name, (w, h) in {"a": (64, 64), "b": (64, 64), "c": (64, 64), "wide": (192, 48)}.items():
        img = np.full((h, w, 3), 90, np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
        for role, arr in (("context", img), ("target", img), ("mask", mask)):
            (root / role).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / role / f"{name}.png")
    source = open_source("folder", root, default_prompt="insert")
    cfg = config_from_dict({"data": {"resolution": 64, "aspect_buckets": True}, "train": {"batch_size": 2}})
    with caplog.at_level(logging.WARNING, logger="kontext.training.checkpoint"):
        check_data_position(source, cfg, 1)
    assert "1 sample(s) are never trained on" in caplog.text and "wide" in caplog.text
    caplog.clear()
    cfg.data.aspect_buckets = False
    with caplog.at_level(logging.WARNING, logger="kontext.training.checkpoint"):
        check_data_position(source, cfg, 1)
    assert "never trained on" not in caplog.text


def test_a_save_that_leaves_the_lora_out_is_not_blamed_on_the_disk(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                   monkeypatch):
    """A launch setting whose model the checkpoint hooks did not recognise (accelerate's torch.compile did) wrote no
    LoRA into the checkpoint; the message asked whether the disk was full and said to free some space."""
    real_export = lora_io.save_lora

    def export_nothing(transformer, out_dir, *args, **kwargs):
        if Path(out_dir).name == "checkpoint-4.tmp":
            return Path(out_dir) / LORA  # no error, no file
        return real_export(transformer, out_dir, *args, **kwargs)

    out = tmp_path / "out"
    msg = _failed_run_message(out, tiny_model_dir, tiny_dataset_dir, monkeypatch, export_nothing)
    assert f"(checkpoint-4.tmp does not read back intact: {LORA} is missing); no write failed" in msg, msg
    assert "disk full" not in msg and "Free some space" not in msg, msg
    assert "--dynamo_backend" in msg and f"the newest intact checkpoint is {out / 'checkpoint-2'}" in msg, msg
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / "checkpoint-4.tmp").exists()
