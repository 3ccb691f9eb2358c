"""Reliability guarantees of the trainer, each proven by injecting the failure it guards against.

See docs/reliability.md for the list of guarantees and which test proves which.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.checkpoint import (
    TRAINER_STATE_NAME,
    finalize,
    list_checkpoints,
    remove_incomplete,
    resolve_resume,
    temp_path,
)
from kontext.training.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
LORA_FILE = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def cfg_dict(out: Path, model_dir: Path, data_dir: Path, cache: Path, **sections) -> dict:
    """conftest.tiny_run_dict, keeping up to 3 checkpoints, with section overrides."""
    from conftest import tiny_run_dict

    checkpoint = {"total_limit": 3, **sections.pop("checkpoint", {})}
    return tiny_run_dict(out, model_dir, data_dir, cache, checkpoint=checkpoint, **sections)


def write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (folders listed too, so removals show)."""
    out: dict[str, str] = {}
    if not folder.exists():
        return out
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def lora_of(run) -> dict[str, torch.Tensor]:
    """A copy of the run's LoRA (on CPU float32 ``full_lora_state_dict`` shares the live storage)."""
    return {k: v.clone() for k, v in lora_io.full_lora_state_dict(run.accelerator.unwrap_model(run.transformer)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def saved_lora(folder: Path) -> dict[str, torch.Tensor]:
    """A saved LoRA file under the PEFT names ``full_lora_state_dict`` uses."""
    return {k.removeprefix("transformer."): v for k, v in load_file(str(folder / LORA_FILE)).items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """A finished 4-step run (checkpoints 2 and 4, final LoRA) and the dict that described it."""
    root = tmp_path_factory.mktemp("finished")
    d = cfg_dict(root / "out", tiny_model_dir, tiny_dataset_dir, root / "cache")
    run = tk.run_training(config_from_dict(copy.deepcopy(d)))
    assert run.stop_reason == "done"
    return {"dict": d, "out": root / "out", "history": run.history, "lora": lora_of(run), "root": root}


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading the base model fails the test: bad input must be refused before any model is loaded."""
    from diffusers import FluxKontextPipeline

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded although the input was bad")

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", refuse)


# ---------------------------------------------------------------------------------------------
# 1. Exact resume at an epoch boundary (mid-epoch resume: tests/test_train_e2e.py)
# ---------------------------------------------------------------------------------------------


def test_resume_at_epoch_boundary_equals_uninterrupted_run(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """8 samples / batch 2 = 4 updates per epoch: pause exactly at the end of epoch 0, resume into epoch 1."""
    common = dict(
        train={"max_steps": 6, "lr_scheduler": "cosine", "lr_warmup_steps": 1},
        lora={"rank": 4, "alpha": 8, "dropout": 0.1},
        data={"random_flip": True},
        checkpoint={"every_steps": 0, "total_limit": 3},
    )
    a = tk.run_training(config_from_dict(cfg_dict(tmp_path / "a", tiny_model_dir, tiny_dataset_dir, tmp_path / "c", **common)))

    d = cfg_dict(tmp_path / "b", tiny_model_dir, tiny_dataset_dir, tmp_path / "c", **common)
    b1 = tk.setup(config_from_dict(copy.deepcopy(d)))
    assert tk.train(b1, pause_at=4) == "paused"
    tk.finish(b1, "paused")
    state = json.loads((tmp_path / "b" / "checkpoint-4" / TRAINER_STATE_NAME).read_text())
    # The saved position is the start of epoch 1 (or the end of epoch 0): either way nothing is repeated.
    assert (state["data"]["epoch"], state["data"]["position"]) in ((1, 0), (0, 4))
    d["checkpoint"]["resume_from"] = "latest"
    b2 = tk.run_training(config_from_dict(d))

    assert [h["step"] for h in b2.history] == [1, 2, 3, 4, 5, 6]
    assert [h["loss/total"] for h in a.history] == pytest.approx([h["loss/total"] for h in b2.history], rel=1e-6, abs=1e-7)
    assert max_diff(lora_of(a), lora_of(b2)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# 2. Atomic checkpoints
# ---------------------------------------------------------------------------------------------


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
    return finalize(out, step, _fake_state(step), total_limit)


def _fake_state(step: int) -> dict:
    return {"step": step, "data": {"epoch": 0, "position": step}, "lora": {}}


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
        finalize(out, 4, _fake_state(4), 1)
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


# ---------------------------------------------------------------------------------------------
# 3. Pre-emption (a real process receiving real signals)
# ---------------------------------------------------------------------------------------------


class Proc:
    """The trainer (or ``script``, a wrapper around it) as a subprocess, its merged stdout/stderr collected by a
    thread."""

    def __init__(self, config: Path, cwd: Path, script: Path = REPO / "train_kontext_lora.py",
                 launcher: list[str] | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TQDM_MININTERVAL="0")
        # With a launcher (``accelerate launch ...``) the processes get a session of their own, so that a signal to
        # its process group (a terminal's Ctrl-C) reaches the launcher and the trainer, and never pytest.
        self.p = subprocess.Popen(
            [*(launcher or [sys.executable]), str(script), "--config", str(config)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=launcher is not None,
        )
        self.chunks: list[bytes] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self) -> None:
        assert self.p.stdout is not None
        while chunk := self.p.stdout.read1(4096):
            self.chunks.append(chunk)

    @property
    def text(self) -> str:
        return b"".join(self.chunks).decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 300.0) -> re.Match:  # a hang guard
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text)
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.005)
        self.p.kill()
        raise AssertionError(f"never saw {pattern!r}; output:\n{self.text[-3000:]}")

    def finish(self, timeout: float) -> tuple[int, float]:
        t0 = time.monotonic()
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError(f"did not exit within {timeout}s; output:\n{self.text[-3000:]}") from None
        self.t.join(5)
        return rc, time.monotonic() - t0


def _long_run_config(tmp_path: Path, model_dir: Path, data_dir: Path) -> tuple[Path, dict]:
    d = cfg_dict(tmp_path / "out", model_dir, data_dir, tmp_path / "cache", train={"max_steps": 100_000},
                 checkpoint={"every_steps": 0, "total_limit": 2})
    return write_yaml(tmp_path / "config.yaml", d), d


def _steps_done(text: str) -> int:
    found = re.findall(r"train:[^\r\n]*?\b(\d+)/100000", text)
    return int(found[-1]) if found else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT])
def test_signal_checkpoints_and_exits_with_resume_hint(sig, tmp_path, tiny_model_dir, tiny_dataset_dir):
    config, d = _long_run_config(tmp_path, tiny_model_dir, tiny_dataset_dir)
    proc = Proc(config, tmp_path)
    # Training has started once the progress bar shows a finished update.
    proc.wait_for(r"train:[^\r\n]*?\b[1-9]\d*/100000")
    proc.p.send_signal(sig)
    rc, _ = proc.finish(timeout=300)  # a hang guard, not a speed requirement
    text = proc.text
    assert rc == 0, text[-3000:]
    assert f"{sig.name} received" in text
    assert "checkpoint.resume_from=latest" in text
    assert "Traceback" not in text

    out = tmp_path / "out"
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and not list(out.glob("*.tmp"))
    step = json.loads((ckpts[0] / TRAINER_STATE_NAME).read_text())["step"]
    assert ckpts[0].name == f"checkpoint-{step}" and step >= 1
    m = re.search(r"Stopped by signal at step (\d+)", text)
    assert m and int(m.group(1)) == step
    assert not (out / LORA_FILE).exists(), "a pre-empted run must not look finished"

    # Resuming continues from that step with the saved LoRA.
    d["train"]["max_steps"] = step + 1
    d["checkpoint"]["resume_from"] = "latest"
    cfg = config_from_dict(d)
    run = tk.setup(cfg)
    assert run.start_step == step
    assert max_diff(lora_of(run), saved_lora(ckpts[0])) == 0.0
    assert tk.train(run) == "done"
    assert [h["step"] for h in run.history][-2:] == [step, step + 1]


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_saves_a_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """Ctrl-C reaches the launcher and the trainer; the launcher then sends the trainer SIGTERM. That SIGTERM is
    the same stop passed on, not a second one: the trainer saves its checkpoint (it used to exit at once, 143)."""
    from test_launch import accelerate_cmd

    config, _ = _long_run_config(tmp_path, tiny_model_dir, tiny_dataset_dir)
    launcher = accelerate_cmd() + ["launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                                   "--dynamo_backend", "no"]
    proc = Proc(config, tmp_path, launcher=launcher)
    proc.wait_for(r"train:[^\r\n]*?\b[1-9]\d*/100000")
    os.killpg(proc.p.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
    proc.finish(timeout=300)  # a hang guard; the launcher's own status is its business (130)
    text = proc.text
    assert "SIGINT received: finishing the current step" in text, text[-3000:]
    assert "SIGTERM received as well: the stop asked for by SIGINT goes on" in text, text[-3000:]
    assert "received again" not in text
    m = re.search(r"Stopped by signal at step (\d+); checkpoint saved", text)
    out = tmp_path / "out"
    assert m and list_checkpoints(out) == [out / f"checkpoint-{m.group(1)}"], text[-3000:]


# The trainer with the rename of its checkpoint held until the process ends: the test sends the second signal
# once the trainer says it is inside that save, so the signal lands mid-save however slow the machine is.
HELD_SAVE = """
import sys, time
sys.path.insert(0, {repo!r})
import train_kontext_lora as tk

def held_finalize(*args, **kwargs):
    print("test: holding the checkpoint rename", flush=True)
    while True:  # short sleeps: the signal handler runs between them, whichever thread the signal reached
        time.sleep(0.05)

tk.finalize = held_finalize
sys.exit(tk.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_second_signal_exits_at_once(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """A real process: the first SIGTERM after an update, the second while the checkpoint it asked for is written."""
    config, _ = _long_run_config(tmp_path, tiny_model_dir, tiny_dataset_dir)
    script = tmp_path / "held_save.py"
    script.write_text(HELD_SAVE.format(repo=str(REPO)))
    proc = Proc(config, tmp_path, script)
    proc.wait_for(r"train:[^\r\n]*?\b[1-9]\d*/100000")
    proc.p.send_signal(signal.SIGTERM)
    proc.wait_for("test: holding the checkpoint rename")
    assert "SIGTERM received: finishing the current step" in proc.text
    proc.p.send_signal(signal.SIGTERM)
    rc, _ = proc.finish(timeout=300)  # a hang guard
    assert rc == 128 + signal.SIGTERM, proc.text[-3000:]
    assert "SIGTERM received again: exiting now without a checkpoint" in proc.text
    assert "Stopped by signal" not in proc.text
    # The interrupted save stays a .tmp folder, never a checkpoint.
    out = tmp_path / "out"
    assert list_checkpoints(out) == [] and len(list(out.glob("checkpoint-*.tmp"))) == 1


def test_second_signal_during_the_save_exits_without_a_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                 monkeypatch, capfd):
    """In-process: the first SIGTERM arrives during the first update, the second while its checkpoint is written
    (``signal.raise_signal`` runs the handler before it returns; the exit is caught instead of taken)."""
    import types

    import kontext.training.signals as signals

    class Exited(BaseException):
        pass

    def exit_now(code: int):
        raise Exited(code)

    monkeypatch.setattr(signals, "os", types.SimpleNamespace(_exit=exit_now))
    real_loss, real_finalize = tk.compute_loss, tk.finalize
    calls: list[int] = []

    def loss_then_signal(*a, **k):
        if not calls:
            signal.raise_signal(signal.SIGTERM)
        calls.append(1)
        return real_loss(*a, **k)

    def finalize_after_signal(*a, **k):
        signal.raise_signal(signal.SIGTERM)
        return real_finalize(*a, **k)

    monkeypatch.setattr(tk, "compute_loss", loss_then_signal)
    monkeypatch.setattr(tk, "finalize", finalize_after_signal)
    out = tmp_path / "out"
    run = tk.setup(config_from_dict(cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                             checkpoint={"every_steps": 0})))
    capfd.readouterr()
    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(Exited) as info:
            tk.train(run)
    finally:
        tk.unlock_all()
    assert info.value.args == (128 + signal.SIGTERM,)
    assert signal.getsignal(signal.SIGTERM) is before
    assert len(calls) == 1 and [h["step"] for h in run.history] == [1]  # the update in flight finished, no other
    err = capfd.readouterr().err
    assert "SIGTERM received: finishing the current step" in err
    assert "SIGTERM received again: exiting now without a checkpoint" in err
    assert list_checkpoints(out) == [] and (out / "checkpoint-1.tmp").is_dir()


def test_another_kind_of_signal_is_the_same_stop_and_a_repeat_exits(monkeypatch, capfd):
    """SIGINT then SIGTERM (a launcher passing the terminal's Ctrl-C on) is one stop; SIGINT again exits at once."""
    import types

    import kontext.training.signals as signals
    from kontext.training.signals import StopRequest

    class Exited(BaseException):
        pass

    def exit_now(code: int):
        raise Exited(code)

    monkeypatch.setattr(signals, "os", types.SimpleNamespace(_exit=exit_now))
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
        assert stop.requested == "SIGINT"
        with pytest.raises(Exited) as info:
            signal.raise_signal(signal.SIGINT)
    assert info.value.args == (128 + signal.SIGINT,)
    err = capfd.readouterr().err
    assert "SIGTERM received as well: the stop asked for by SIGINT goes on (send SIGINT again to exit at once)" in err
    assert "SIGINT received again: exiting now without a checkpoint" in err

    # Under torchrun the agent passes a signal on as the same signal: the first repeat is that echo.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGTERM)  # the scheduler's, to every process
        signal.raise_signal(signal.SIGTERM)  # the agent's
        with pytest.raises(Exited) as info:
            signal.raise_signal(signal.SIGTERM)
    assert info.value.args == (128 + signal.SIGTERM,)
    assert "SIGTERM received as well: the stop asked for by SIGTERM goes on" in capfd.readouterr().err


def test_a_hung_up_terminal_never_breaks_the_stop(monkeypatch):
    """SIGHUP after the terminal closed: writing the message fails (EIO). The stop is still recorded, and the output
    goes to /dev/null instead, so that the save's own messages cannot fail either."""
    import errno
    import types

    import kontext.training.signals as signals
    from kontext.training.signals import StopRequest

    class HungUp:
        def write(self, text):
            raise OSError(errno.EIO, "Input/output error")

        def flush(self):
            raise OSError(errno.EIO, "Input/output error")

    redirected: list[tuple[int, int]] = []
    fake_os = types.SimpleNamespace(devnull=os.devnull, O_WRONLY=os.O_WRONLY, open=lambda path, flags: 99,
                                    dup2=lambda fd, to: redirected.append((fd, to)), close=lambda fd: None,
                                    _exit=os._exit)
    monkeypatch.setattr(signals, "os", fake_os)
    monkeypatch.setattr(sys, "stderr", HungUp())
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGHUP)
        assert stop.requested == "SIGHUP"
    assert redirected == [(99, 1), (99, 2)]


def test_stop_request_restores_previous_handlers():
    from kontext.training.signals import StopRequest

    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert stop.requested is None
        signal.raise_signal(signal.SIGTERM)  # to this thread; the handler has run when it returns
        assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# 4. Non-finite losses and gradients
# ---------------------------------------------------------------------------------------------


def _nan_on_calls(monkeypatch, bad_calls: set[int], run_box: dict, snapshots: list):
    """Wrap compute_loss: on the listed calls (1-based) the dice term is NaN; record the LoRA at every call."""
    real = tk.compute_loss
    calls = {"n": 0}

    def wrapped(transformer, batch, cfg, generator, sched):
        calls["n"] += 1
        snapshots.append(lora_of(run_box["run"]))
        total, logs = real(transformer, batch, cfg, generator, sched)
        if calls["n"] in bad_calls:
            nan = torch.tensor(float("nan"))
            logs = dict(logs, **{"loss/dice": nan, "loss/total": total.detach() + nan})
            total = total + nan
        return total, logs

    monkeypatch.setattr(tk, "compute_loss", wrapped)
    return calls


def test_isolated_nan_skips_update_and_run_continues(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, caplog):
    box: dict = {}
    snaps: list = []
    calls = _nan_on_calls(monkeypatch, {2, 4}, box, snaps)
    cfg = config_from_dict(cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                    train={"max_steps": 4, "max_nonfinite_steps": 2}))
    run = tk.setup(cfg)
    box["run"] = run
    with caplog.at_level(logging.WARNING, logger="kontext_lora"):
        reason = tk.train(run)
    assert reason == "done" and calls["n"] == 6  # 4 updates + 2 skipped
    # A skipped update leaves the LoRA exactly as it was; a good one changes it.
    assert max_diff(snaps[1], snaps[2]) == 0.0
    assert max_diff(snaps[3], snaps[4]) == 0.0
    assert max_diff(snaps[0], snaps[1]) > 0
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss/total"]) for h in run.history)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2 and all("loss/dice" in w for w in warnings)


def test_consecutive_nans_stop_with_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, capsys):
    box: dict = {}
    snaps: list = []
    _nan_on_calls(monkeypatch, set(range(3, 100)), box, snaps)
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                 train={"max_steps": 8, "max_nonfinite_steps": 3}, checkpoint={"every_steps": 2, "total_limit": 1})
    run = tk.setup(config_from_dict(d))
    box["run"] = run
    assert tk.train(run) == "nonfinite"
    assert run.start_step == 2 and len(snaps) == 5
    assert all(max_diff(snaps[2], s) == 0.0 for s in snaps[3:])
    with pytest.raises(tk.UserError, match=r"3 consecutive updates .* Last good checkpoint: .*checkpoint-2"):
        tk.finish(run, "nonfinite")
    # The checkpoint holds the weights of the last good update and nothing was exported.
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert max_diff(saved_lora(out / "checkpoint-2"), lora_of(run)) == 0.0
    assert not (out / LORA_FILE).exists()

    # Through the command line the same stop is exit code 2 with one message and no traceback.
    snaps.clear()
    _nan_on_calls(monkeypatch, set(range(1, 100)), box, snaps)
    real_setup = tk.setup

    def setup_and_box(cfg):
        box["run"] = real_setup(cfg)
        return box["run"]

    monkeypatch.setattr(tk, "setup", setup_and_box)
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    rc = tk.main(["--config", str(write_yaml(tmp_path / "c.yaml", d))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("error:") == 1
    assert "max_nonfinite_steps" in err or "consecutive" in err
    assert list_checkpoints(out) == [out / "checkpoint-2"]


def test_nan_gradient_skips_update(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    cfg = config_from_dict(cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                    train={"max_steps": 3}))
    run = tk.setup(cfg)
    fired = {"n": 0}

    def poison(grad):
        fired["n"] += 1
        return torch.full_like(grad, float("inf")) if fired["n"] == 2 else grad

    run.lora_params[0].register_hook(poison)
    with caplog.at_level(logging.WARNING, logger="kontext_lora"):
        assert tk.train(run) == "done"
    assert fired["n"] == 4 and [h["step"] for h in run.history] == [1, 2, 3]
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    poisoned = next(n for n, p in run.accelerator.unwrap_model(run.transformer).named_parameters() if p is run.lora_params[0])
    assert len(msgs) == 1 and f"non-finite gradient in {poisoned}" in msgs[0], msgs
    assert all(torch.isfinite(v).all() for v in lora_of(run).values())


# ---------------------------------------------------------------------------------------------
# 5. Bad input: one clear message, exit code 2, before any model, earlier outputs untouched
# ---------------------------------------------------------------------------------------------


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def _bad_datasets(root: Path, good: Path) -> dict[str, tuple[Path, dict, list[str]]]:
    """case -> (dataset folder, extra data.* settings, strings the message must contain)."""
    cases: dict[str, tuple[Path, dict, list[str]]] = {}

    def copy_of(name: str) -> Path:
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    cases["missing_folder"] = (root / "nope", {}, ["nope"])
    empty = root / "empty"
    for role in ("context", "target", "mask"):
        (empty / role).mkdir(parents=True)
    cases["empty"] = (empty, {}, ["is empty", "add samples"])
    d = copy_of("no_mask")
    (d / "mask" / "00001.png").unlink()
    cases["missing_mask"] = (d, {}, ["00001", "mask"])
    d = copy_of("no_target")
    (d / "target" / "00002.png").unlink()
    cases["missing_target"] = (d, {}, ["00002", "target"])
    d = copy_of("corrupt")
    (d / "context" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    cases["corrupt_image"] = (d, {}, ["context/00003.png"])
    d = copy_of("non_image")
    (d / "target" / "notes.txt").write_text("not a picture")
    cases["non_image"] = (d, {}, ["target/notes.txt", "not an image"])
    d = copy_of("mask_size")
    _png(d / "mask" / "00004.png", np.full((32, 32), 255, np.uint8) * (np.arange(32)[None, :] < 16))
    cases["mask_size"] = (d, {}, ["00004", "sizes differ"])
    d = copy_of("empty_mask")
    _png(d / "mask" / "00005.png", np.zeros((64, 64), np.uint8))
    cases["empty_mask"] = (d, {}, ["mask/00005.png", "empty"])
    d = copy_of("full_mask")
    _png(d / "mask" / "00006.png", np.full((64, 64), 255, np.uint8))
    cases["full_mask"] = (d, {}, ["mask/00006.png", "full"])
    d = copy_of("bomb")
    # 16 megapixels of zeros compress to a few kB: the header, not the file size, must trip the limit.
    Image.new("L", (4000, 4000)).save(d / "target" / "00007.png")
    cases["pixel_limit"] = (d, {"max_pixels": 10_000_000}, ["target/00007.png", "over the limit of 10,000,000", "data.max_pixels"])
    return cases


def _run_main_expect_user_error(args: list[str], capsys) -> str:
    capsys.readouterr()
    rc = tk.main(args)
    captured = capsys.readouterr()
    err = captured.err
    assert rc == 2, err
    assert "Traceback" not in err + captured.out
    # Progress bars (dataset validation) may come first; the message itself is the last thing written.
    assert err.count("error: ") == 1, err
    message = err[err.index("error: "):]
    assert "\r" not in message and message.endswith("\n"), err
    return message


@pytest.fixture()
def earlier_outputs(tmp_path, finished):
    """An output folder holding an earlier, unfinished run (a checkpoint, its config, a leftover .tmp)."""
    out = tmp_path / "earlier"
    out.mkdir()
    shutil.copytree(finished["out"] / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(finished["out"] / "config.yaml", out / "config.yaml")
    (out / "checkpoint-4.tmp").mkdir()
    (out / "checkpoint-4.tmp" / "random_states_0.pkl").write_bytes(b"partial")
    return out


def test_bad_datasets_are_refused_early(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, earlier_outputs, no_model_load, capsys):
    before = tree_digest(earlier_outputs)
    for case, (root, extra, needles) in _bad_datasets(tmp_path / "sets", tiny_dataset_dir).items():
        d = cfg_dict(earlier_outputs, tiny_model_dir, root, tmp_path / "cache", data=extra,
                     checkpoint={"every_steps": 2, "total_limit": 3, "resume_from": "latest"})
        err = _run_main_expect_user_error(["--config", str(write_yaml(tmp_path / f"{case}.yaml", d))], capsys)
        for needle in needles:
            assert needle in err, f"{case}: {needle!r} not in message:\n{err}"
        assert tree_digest(earlier_outputs) == before, f"{case}: earlier outputs were touched"


def test_several_dataset_problems_are_listed_at_once(tmp_path, tiny_model_dir, tiny_dataset_dir, no_model_load, capsys):
    d = tmp_path / "many"
    shutil.copytree(tiny_dataset_dir, d)
    (d / "mask" / "00001.png").unlink()
    (d / "context" / "00003.png").write_bytes(b"not a png")
    (d / "target" / "notes.txt").write_text("x")
    _png(d / "mask" / "00005.png", np.zeros((64, 64), np.uint8))
    _png(d / "mask" / "00006.png", np.full((64, 64), 255, np.uint8))
    cfg = cfg_dict(tmp_path / "out", tiny_model_dir, d, tmp_path / "cache")
    err = _run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))], capsys)
    for needle in ("00001", "context/00003.png", "target/notes.txt", "mask/00005.png", "mask/00006.png"):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    assert re.search(r"has [5-9] problems", err), err
    assert not (tmp_path / "out").exists()


def test_bad_config_and_resume_inputs_are_refused_early(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, no_model_load, capsys):
    fin = tmp_path / "finished_copy"
    shutil.copytree(finished["out"], fin)
    fin_before = tree_digest(fin)
    earlier = tmp_path / "unfinished"
    shutil.copytree(finished["out"] / "checkpoint-2", earlier / "checkpoint-2")
    earlier_before = tree_digest(earlier)
    other = tmp_path / "other_out"
    base = cfg_dict(other, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache")
    config = write_yaml(tmp_path / "base.yaml", base)

    override_cases = {
        "misspelled key": (["train.max_step=5"], ["train.max_step", "max_steps"]),
        "wrong type": (["train.max_steps=many"], ["train.max_steps"]),
        "negative loss weight": (["loss.geometry.dice=-1"], ["loss.geometry.dice"]),
        "resume from nothing": (["checkpoint.resume_from=/no/such/checkpoint"], ["checkpoint.resume_from", "latest"]),
        "resume from incomplete": ([f"checkpoint.resume_from={fin}"], ["checkpoint.resume_from", "not a complete"]),
        "finished output_dir": ([f"output_dir={fin}"], [str(fin), "overwrite_output_dir", "resume_from=latest"]),
        "unfinished output_dir": ([f"output_dir={earlier}"], [str(earlier), "checkpoint-2", "resume_from=latest"]),
        "other rank": ([f"output_dir={fin}", "checkpoint.resume_from=latest", "lora.rank=8", "train.max_steps=8"],
                       ["lora.rank", "checkpoint-4"]),
    }
    for case, (overrides, needles) in override_cases.items():
        err = _run_main_expect_user_error(["--config", str(config), *overrides], capsys)
        for needle in needles:
            assert needle in err, f"{case}: {needle!r} not in message:\n{err}"
        assert tree_digest(fin) == fin_before, f"{case}: the finished run was touched"
        assert tree_digest(earlier) == earlier_before, f"{case}: the unfinished run was touched"
        assert not other.exists(), f"{case}: an output folder was created"

    # A misspelled key inside the YAML file, and another LoRA target set, written in files.
    bad = copy.deepcopy(base)
    bad["train"]["learning_rat"] = 1e-4
    err = _run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "typo.yaml", bad))], capsys)
    assert "learning_rat" in err and "learning_rate" in err
    targets = copy.deepcopy(base)
    targets["output_dir"] = str(fin)
    targets["lora"]["target_modules"] = ["attn.to_q", "attn.to_v"]
    targets["checkpoint"]["resume_from"] = "latest"
    targets["train"]["max_steps"] = 8
    err = _run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "targets.yaml", targets))], capsys)
    assert "lora.target_modules" in err and "checkpoint-4" in err
    assert tree_digest(fin) == fin_before


# ---------------------------------------------------------------------------------------------
# 6. Safe loading
# ---------------------------------------------------------------------------------------------


def _project_sources() -> list[Path]:
    skip = {".venv", ".git", "outputs", "build", "node_modules"}
    return [p for p in REPO.rglob("*.py") if not (set(p.relative_to(REPO).parts) & skip)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_project_code_loads_nothing_unsafely():
    """Over every .py file the project ships (trainer, kontext/, data/, losses/, benchmarks/):
    no pickle-based load, unsafe YAML, remote code or eval. Tests are left out: they round-trip
    their own objects through pickle (DataLoader workers) and run documentation snippets."""
    problems: list[str] = []
    files = [p for p in _project_sources() if "tests" not in p.relative_to(REPO).parts]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle"):
                problems.append(f"{path}:{node.lineno}: imports from {node.module}")
            if isinstance(node, ast.Import) and any(a.name in ("pickle", "dill", "cloudpickle", "marshal") for a in node.names):
                problems.append(f"{path}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                problems.append(f"{where}: {name} (use yaml.safe_load)")
            if name in ("pickle.load", "pickle.loads", "marshal.loads"):
                problems.append(f"{where}: {name}")
            if name in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{where}: {name}(allow_pickle=True)")
            tr = kw.get("trust_remote_code")
            if tr is not None and not (isinstance(tr, ast.Constant) and tr.value is False):
                problems.append(f"{where}: trust_remote_code is not False")
            if name in ("eval", "exec", "__import__"):
                problems.append(f"{where}: {name}()")
    assert not problems, "\n".join(problems)


def test_safety_scan_catches_unsafe_calls(tmp_path, monkeypatch):
    """The scan above is not vacuous: it flags each unsafe pattern in a sample file."""
    bad = tmp_path / "bad_module.py"
    bad.write_text(
        "import torch, yaml, pickle\n"
        "a = torch.load('x')\n"
        "b = torch.load('x', weights_only=False)\n"
        "c = yaml.load('x')\n"
        "d = pickle.loads(b'')\n"
        "e = f(trust_remote_code=True)\n"
        "ok = torch.load('x', weights_only=True)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "_project_sources", lambda: [bad] * 21)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_project_code_loads_nothing_unsafely()
    msg = str(info.value)
    for line in (":2: torch.load", ":3: torch.load", ":4: yaml.load", ":5: pickle.loads", ":6: trust_remote_code", "imports a pickle"):
        assert line in msg, (line, msg)
    assert ":7:" not in msg


def test_resume_loads_checkpoints_with_weights_only(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, monkeypatch):
    """Every torch.load accelerate does while resuming is weights_only=True; all weights are safetensors."""
    fin = tmp_path / "fin"
    shutil.copytree(finished["out"], fin)
    calls: list[tuple[str, object]] = []
    real_load = torch.load

    def recording_load(f, *a, **k):
        calls.append((str(f), k.get("weights_only", "<default>")))
        return real_load(f, *a, **k)

    monkeypatch.setattr(torch, "load", recording_load)
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(fin)
    d["checkpoint"]["resume_from"] = "latest"
    d["train"]["max_steps"] = 5
    run = tk.setup(config_from_dict(d))
    assert run.start_step == 4
    assert calls, "accelerate loaded nothing: the test would prove nothing"
    assert {Path(f).name for f, _ in calls} >= {"optimizer.bin", "scheduler.bin"}
    assert all(wo is True for _, wo in calls), calls
    # The LoRA itself came from safetensors and equals what the run ended with.
    assert max_diff(lora_of(run), finished["lora"]) == 0.0

    # Only safetensors (or accelerate's weights_only-loaded state files) hold tensors on disk.
    allowed = {".safetensors", ".json", ".yaml", ".md", ".bin", ".pkl", ".png", ".txt", ".lock"}  # .lock: a pid
    for p in list(fin.rglob("*")) + list((finished["root"] / "cache").rglob("*")):
        if p.is_file():
            assert p.suffix in allowed, p
            if p.suffix in (".bin", ".pkl"):
                assert p.parent.name.startswith("checkpoint-"), p
    assert list((finished["root"] / "cache").rglob("*.safetensors")), "the latent cache must be safetensors"


# ---------------------------------------------------------------------------------------------
# 8. The output folder: a finished run is never touched by a resume; a live run is locked
# ---------------------------------------------------------------------------------------------


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """tree_digest plus every entry's mtime: "untouched" means not even rewritten with the same bytes."""
    digest = tree_digest(folder)
    return {rel: (h, (folder / rel).stat().st_mtime_ns) for rel, h in digest.items()}


def test_resuming_a_finished_run_never_touches_it(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, no_model_load, capsys):
    """The reported case: resume_from=latest on a run that kept no checkpoint trained again from scratch over it."""
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
        err = _run_main_expect_user_error(["--config", str(config), *overrides], capsys)
        assert needle in err and "train.max_steps above 4" in err, err
        # all three ways on, whatever resume_from says: more steps, a new folder, or overwrite
        assert "choose a new output_dir" in err and "checkpoint.overwrite_output_dir=true" in err, err
        assert tree_state(fin) == before, overrides

    # The same run with no checkpoint to continue from (checkpoint.every_steps: 0): never a fresh start over it.
    for ckpt in fin.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    before = tree_state(fin)
    for overrides in (["checkpoint.resume_from=latest"], ["checkpoint.resume_from=latest", "train.max_steps=8"]):
        err = _run_main_expect_user_error(["--config", str(config), *overrides], capsys)
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


# ---------------------------------------------------------------------------------------------
# 4b. An update that makes the LoRA weights non-finite
# ---------------------------------------------------------------------------------------------


def test_update_making_lora_weights_nonfinite_stops_and_never_saves_them(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                        caplog):
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 6},
                 checkpoint={"every_steps": 2})
    run = tk.setup(config_from_dict(d))
    real_step = run.optimizer.step
    calls = {"n": 0}

    def step_then_poison(*a, **k):  # the 3rd update writes an inf into one LoRA matrix, as a blown-up step would
        out_ = real_step(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                run.lora_params[0].view(-1)[0] = float("inf")
        return out_

    run.optimizer.step = step_then_poison
    with caplog.at_level(logging.ERROR, logger="kontext_lora"):
        reason = tk.train(run)
    assert reason == "nonfinite_weights" and run.start_step == 2 and calls["n"] == 3
    assert any("step 3: the update made the LoRA weights NaN/inf" in r.getMessage() for r in caplog.records)
    with pytest.raises(tk.UserError) as info:
        tk.finish(run, reason)
    msg = str(info.value)
    assert msg.startswith("An update made the LoRA weights NaN/inf (they were not saved); stopped at step 2. "), msg
    assert f"Last good checkpoint: {out / 'checkpoint-2'}." in msg
    # Nothing after the bad update was saved or exported; the named checkpoint is finite.
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / LORA_FILE).exists()
    assert all(torch.isfinite(v).all() for v in saved_lora(out / "checkpoint-2").values())


def test_last_good_checkpoint_named_is_verified(tmp_path):
    """A newer checkpoint with non-finite weights (say, from an older version of the trainer) is never named good."""
    from safetensors.torch import save_file

    from checkpoint_files import write_checkpoint_files

    out = tmp_path / "out"
    for step in (2, 4):
        write_checkpoint_files(temp_path(out, step))
        finalize(out, step, _fake_state(step), None)
    sd = load_file(str(out / "checkpoint-4" / LORA_FILE))
    sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(sd, str(out / "checkpoint-4" / LORA_FILE))
    run = type("R", (), {"output_dir": out})()
    assert tk._last_checkpoint_name(run) == str(out / "checkpoint-2")


# ---------------------------------------------------------------------------------------------
# 9. Changed settings on resume: the learning rate applies (loudly), the batch size is refused early
# ---------------------------------------------------------------------------------------------


def _unfinished_copy(finished, dst: Path) -> Path:
    """An output folder stopped after checkpoint-2 (no final LoRA)."""
    shutil.copytree(finished["out"] / "checkpoint-2", dst / "checkpoint-2")
    shutil.copy(finished["out"] / "config.yaml", dst / "config.yaml")
    return dst


def test_changed_learning_rate_on_resume_applies_with_a_warning(tmp_path, tiny_model_dir, tiny_dataset_dir, finished,
                                                                caplog):
    """The reported case: a changed train.learning_rate was silently replaced by the checkpoint's."""
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
    # The history records the rate each step really used; config.yaml the one the run uses from now on.
    assert [h["lr"] for h in history] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])
    assert yaml.safe_load((tmp_path / "lr" / "config.yaml").read_text())["train"]["learning_rate"] == pytest.approx(5e-4)

    run, warned = resumed("sched", lr_scheduler="linear")
    assert len(warned) == 1 and "train.lr_scheduler: 'constant_with_warmup' -> 'linear'" in warned[0], warned
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * (4 - 2) / 4)  # linear decay at step 2 of 4


def test_batch_problems_are_refused_before_the_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir, finished,
                                                           no_model_load, capsys):
    out = tmp_path / "fresh"
    config = write_yaml(tmp_path / "c.yaml", cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache"))
    err = _run_main_expect_user_error(["--config", str(config), "train.batch_size=16"], capsys)
    assert "train.batch_size = 16 does not fit the dataset: no full batch per process: 8 samples" in err, err
    assert not out.exists()

    unfinished = _unfinished_copy(finished, tmp_path / "unfinished")
    before = tree_state(unfinished)
    err = _run_main_expect_user_error(
        ["--config", str(config), f"output_dir={unfinished}", "checkpoint.resume_from=latest", "train.batch_size=4"], capsys
    )
    assert f"Cannot resume from {unfinished / 'checkpoint-2'}: it was trained with train.batch_size = 2, this run has 4" in err
    assert tree_state(unfinished) == before


# ---------------------------------------------------------------------------------------------
# 3b. A signal during validation says what it waits for
# ---------------------------------------------------------------------------------------------


def test_signal_message_names_what_it_waits_for(capfd):
    from kontext.training.signals import StopRequest, busy

    with StopRequest() as stop:
        with busy("the validation at step 40 (2 x 28 denoising steps)"):
            signal.raise_signal(signal.SIGTERM)  # the handler has run when it returns
        assert stop.requested == "SIGTERM"
    err = capfd.readouterr().err
    assert "SIGTERM received: waiting for the validation at step 40 (2 x 28 denoising steps) to finish, then saving" in err
    with StopRequest():
        signal.raise_signal(signal.SIGINT)
    assert "SIGINT received: finishing the current step, then saving" in capfd.readouterr().err


def test_sigterm_during_validation_says_it_waits_for_the_validation(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                     monkeypatch, capfd):
    """The reported case: SIGTERM during a 199 s validation said "finishing the current step"."""
    import kontext.training.validation as kv

    real_generate = kv.generate

    def generate_after_sigterm(*a, **k):
        signal.raise_signal(signal.SIGTERM)  # the scheduler's notice arrives while validation generates
        return real_generate(*a, **k)

    monkeypatch.setattr(kv, "generate", generate_after_sigterm)
    d = cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 4},
                 checkpoint={"every_steps": 0}, validation={"every_steps": 1, "num_samples": 1, "num_inference_steps": 2})
    run = tk.setup(config_from_dict(d))
    capfd.readouterr()
    assert tk.train(run) == "signal"
    err = capfd.readouterr().err
    assert "SIGTERM received: waiting for the validation at step 1 (1 x 2 denoising steps) to finish, then saving" in err
    assert "finishing the current step" not in err
    assert list_checkpoints(tmp_path / "out") == [tmp_path / "out" / "checkpoint-2"]
    tk.finish(run, "signal")
    out = capfd.readouterr().out
    assert "Stopped by signal at step 2; checkpoint saved. Resume with:" in out
    assert f"--config {tmp_path / 'out' / 'config.yaml'} checkpoint.resume_from=latest" in out
    assert not (tmp_path / "out" / LORA_FILE).exists(), "a pre-empted run must not look finished"


# ---------------------------------------------------------------------------------------------
# 3c. One signal scope over every phase: SIGTERM, SIGINT, SIGHUP and SIGQUIT, from setup to the export
# ---------------------------------------------------------------------------------------------


def test_one_stop_scope_covers_four_signals_and_nests(capfd):
    from kontext.training.signals import StopRequest, Stopped, uninterrupted

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGQUIT)}
    with StopRequest() as outer:
        with StopRequest() as inner:  # a scope entered inside another joins it
            assert inner is outer
            signal.raise_signal(signal.SIGQUIT)  # SIGQUIT's default would dump core
        assert outer.requested == "SIGQUIT"
    assert {s: signal.getsignal(s) for s in before} == before
    assert "SIGQUIT received: finishing the current step, then saving a checkpoint" in capfd.readouterr().err

    # Interrupting: the first signal raises at once; an uninterrupted block inside takes it at its end.
    done = []
    with StopRequest() as stop, pytest.raises(Stopped) as info:
        with stop.interrupting():
            with uninterrupted():
                signal.raise_signal(signal.SIGHUP)
                done.append("the rest of the block")
    assert done == ["the rest of the block"] and info.value.signum == signal.SIGHUP
    assert capfd.readouterr().err == ""  # silent: whoever catches Stopped gives the one message


def _signal_run_config(tmp_path: Path, finished: dict, **sections) -> tuple[Path, Path]:
    """The ``finished`` run's description (same training) in a new folder, with section overrides."""
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(tmp_path / "out")
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return write_yaml(tmp_path / "config.yaml", d), tmp_path / "out"


def _resume(out: Path, capfd) -> str:
    """Run the printed resume command in-process; its stdout."""
    assert tk.main(["--config", str(out / "config.yaml"), "checkpoint.resume_from=latest"]) == 0
    return capfd.readouterr().out


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGINT, "the data check"), (signal.SIGTERM, "the cache build")])
def test_a_stop_before_the_first_update_exits_with_one_message(sig, where, tmp_path, finished, monkeypatch, capfd):
    """Ctrl-C during the data check, SIGTERM while a latent cache entry is being written: one message, no traceback,
    128 + the signal's number, nothing half-written; the printed command then trains the run."""
    import data.cache
    from kontext.training import inputs

    config, out = _signal_run_config(tmp_path, finished, train={"max_steps": 1})
    if where == "the data check":
        real_open = inputs.open_sources

        def open_then_signal(*a, **k):
            signal.raise_signal(sig)
            return real_open(*a, **k)

        monkeypatch.setattr(inputs, "open_sources", open_then_signal)
    else:
        real_save, saves = data.cache.save_file, []

        def save_after_signal(tensors, tmp, **k):  # the third entry's temporary file exists when the signal comes
            saves.append(tmp)
            if len(saves) == 3:
                assert Path(tmp).is_file()
                signal.raise_signal(sig)
            return real_save(tensors, tmp, **k)

        monkeypatch.setattr(data.cache, "save_file", save_after_signal)
    assert tk.main(["--config", str(config)]) == 128 + sig
    err = capfd.readouterr().err
    assert f"Stopped by {sig.name} before the first training update; nothing was trained or left half-written." in err
    assert f"Start again with:\n  accelerate launch train_kontext_lora.py --config {config}\n" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"config.yaml"}, list(out.iterdir())
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert tk.main(["--config", str(config)]) == 0
    assert (out / LORA_FILE).is_file()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_sighup_and_sigquit_during_training_save_a_checkpoint_that_resumes_exactly(sig, tmp_path, finished,
                                                                                   monkeypatch, capfd):
    """The reported case: closing the terminal (SIGHUP) or SIGQUIT killed the run with no checkpoint and no word."""
    config, out = _signal_run_config(tmp_path, finished, checkpoint={"every_steps": 0})
    real_loss, calls = tk.compute_loss, []

    def loss_with_signal_in_update_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)
        return real_loss(*a, **k)

    monkeypatch.setattr(tk, "compute_loss", loss_with_signal_in_update_2)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert f"{sig.name} received: finishing the current step, then saving a checkpoint and stopping" in std.err
    assert ("Stopped by signal at step 2; checkpoint saved. Resume with:\n  accelerate launch train_kontext_lora.py "
            f"--config {out / 'config.yaml'} checkpoint.resume_from=latest") in std.out
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / LORA_FILE).exists()
    monkeypatch.undo()
    assert "Resumed from" in _resume(out, capfd)
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6  # the same run as the uninterrupted one


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGTERM, "generation"), (signal.SIGINT, "grid write")])
def test_a_stop_during_the_final_validation_saves_the_trained_lora(sig, where, tmp_path, finished, monkeypatch, capfd):
    """The reported case: with checkpoint.every_steps=0 ("only at pre-emption") SIGTERM during the final validation
    exited 143 at once with nothing saved, and Ctrl-C gave a traceback. Now the validation ends early (a grid being
    written is completed first), checkpoint-4 holds the trained LoRA, and the printed resume command validates and
    exports it."""
    from PIL import Image as PILImage

    import kontext.training.validation as kv

    config, out = _signal_run_config(tmp_path, finished, checkpoint={"every_steps": 0},
                                     validation={"every_steps": 0, "num_samples": 1, "num_inference_steps": 2})
    real_generate, real_grid, calls = kv.generate, kv.make_grid, []

    def generate_after_signal(*a, **k):
        calls.append(1)
        if where == "generation":
            signal.raise_signal(sig)  # the handler raises: the generation ends here
        return real_generate(*a, **k)

    def grid_whose_save_is_signalled(*a, **k):
        grid = real_grid(*a, **k)

        def save(path, *sa, **sk):
            signal.raise_signal(sig)
            PILImage.Image.save(grid, path, *sa, **sk)

        grid.save = save
        return grid

    monkeypatch.setattr(kv, "generate", generate_after_signal)
    monkeypatch.setattr(kv, "make_grid", grid_whose_save_is_signalled)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert len(calls) == 1
    assert f"{sig.name} received: ending the final validation early, then saving a checkpoint and stopping" in std.err
    assert ("Stopped by signal at step 4 before the final export; checkpoint saved. Resume with:\n  accelerate launch "
            f"train_kontext_lora.py --config {out / 'config.yaml'} checkpoint.resume_from=latest") in std.out
    assert "Traceback" not in std.err + std.out
    assert list_checkpoints(out) == [out / "checkpoint-4"] and not (out / LORA_FILE).exists()
    assert max_diff(saved_lora(out / "checkpoint-4"), finished["lora"]) <= 1e-6
    grid = out / "validation" / "step-4.png"
    if where == "grid write":
        PILImage.open(grid).load()  # complete
    else:
        assert not grid.exists()
    monkeypatch.undo()
    assert f"Done: {out / LORA_FILE}" in _resume(out, capfd)
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
    assert (out / "validation" / "step-4.png").is_file()


def test_a_stop_during_the_comfyui_write_completes_the_export(tmp_path, finished, monkeypatch, capfd):
    """A SIGTERM while the ComfyUI file is written waits for the export to complete: a finished run with every
    file, never a finished-looking folder without its ComfyUI file."""
    from safetensors import safe_open

    config, out = _signal_run_config(tmp_path, finished, export={"comfyui": True})
    real_export = tk.export_comfyui

    def export_after_signal(*a, **k):
        signal.raise_signal(signal.SIGTERM)
        return real_export(*a, **k)

    monkeypatch.setattr(tk, "export_comfyui", export_after_signal)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert ("SIGTERM received: waiting for the export of the final LoRA to finish, then stopping with the run "
            "finished") in std.err
    assert f"Done: {out / LORA_FILE}" in std.out and "Stopped by signal" not in std.out
    for name in (LORA_FILE, "lora_comfyui.safetensors", "training_history.json", "README.md", "checkpoint-4"):
        assert (out / name).exists(), name
    with safe_open(str(out / "lora_comfyui.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
