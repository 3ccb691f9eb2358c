"""Pre-emption: a real trainer process receiving real signals saves a checkpoint and says how to resume.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import train_kontext_lora as tk
from kontext.training.checkpoint import TRAINER_STATE_NAME, list_checkpoints
from kontext.training.config import config_from_dict

from reliability_helpers import LORA_FILE, REPO, cfg_dict, lora_of, max_diff, saved_lora, write_yaml


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
    the same stop passed on, not a second one: the trainer saves its checkpoint instead of exiting at once (143)."""
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
