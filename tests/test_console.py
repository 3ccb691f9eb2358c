"""What the trainer says on the console: INFO from its own loggers, the end-of-run summary, CPU threads,
and a user error that stays the last line even under ``accelerate launch``."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import kontext.training.launch as launch
import train_kontext_lora as tk
from kontext.training.summary import round_sig, run_summary

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_log_levels():
    names = launch.OWN_LOGGERS + ("kontext.tiny.model", "data.synthetic")
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for n, level in before.items():
        logging.getLogger(n).setLevel(level)


@pytest.mark.parametrize("main_process", [True, False])
def test_project_loggers_log_info_on_the_main_process_only(main_process, restore_log_levels, caplog):
    launch.setup_logging(SimpleNamespace(is_main_process=main_process))
    caplog.set_level(logging.NOTSET)  # let caplog see whatever the loggers themselves let through
    for name in ("kontext.tiny.model", "data.synthetic", "losses", "kontext_lora"):
        logging.getLogger(name).info("hello from %s", name)
    shown = [r.name for r in caplog.records if r.levelno == logging.INFO]
    assert shown == (["kontext.tiny.model", "data.synthetic", "losses", "kontext_lora"] if main_process else [])
    # libraries stay quiet
    assert not logging.getLogger("diffusers").isEnabledFor(logging.INFO)


def test_round_sig():
    assert round_sig(0.0075123456789) == "0.007512"
    assert round_sig(21.83721) == "21.84"
    assert round_sig(0.0) == "0"
    assert round_sig(float("nan")) == "nan"
    assert round_sig(123456.0) == "1.235e+05"


def test_summary_has_steps_time_rounded_losses_metrics_files_and_commands(tmp_path):
    history = [{"step": i, "loss/total": 0.123456789 + i, "loss/flow": 0.1, "step_time_s": 0.5} for i in range(1, 21)]
    text = run_summary(
        steps=20,
        wall_seconds=75.2,
        history=history,
        metrics={"val/iou": 0.00751234567, "val/area_ratio": 1.234567891, "val/count": 2.0},
        output_dir=tmp_path / "run",
        files=["pytorch_lora_weights.safetensors", "README.md", "checkpoint-20/ (last checkpoint)"],
        base_model="black-forest-labs/FLUX.1-Kontext-dev",
        can_resume=True,
    )
    assert "20 steps in 1 min 15 s" in text
    # mean of the last 10 steps, 4 significant digits
    assert "total 15.62" in text and "flow 0.1" in text
    assert "iou 0.007512" in text and "area_ratio 1.235" in text and "count" not in text
    assert "Validation (training samples):" in text  # the default: validated on samples it trained on
    assert "0.0075123" not in text
    assert "pytorch_lora_weights.safetensors" in text and str(tmp_path / "run") in text
    assert "  checkpoint-20/ (last checkpoint)" in text
    assert f"--config {tmp_path / 'run' / 'config.yaml'} checkpoint.resume_from=latest train.max_steps=40" in text
    assert "python -m kontext.tools.evaluate --model black-forest-labs/FLUX.1-Kontext-dev --lora" in text
    # every way on from a finished run: more steps, a new folder, or replacing it
    assert "a new output_dir=..., or checkpoint.overwrite_output_dir=true" in text

    held = run_summary(
        steps=3, wall_seconds=2, history=[], metrics={"val/iou": 0.5}, output_dir=tmp_path, files=[], base_model="m",
        can_resume=False, validated_on="held-out",
    )
    assert "Validation (held-out samples): iou 0.5" in held

    no_ckpt = run_summary(
        steps=3, wall_seconds=2, history=[], metrics={}, output_dir=tmp_path, files=[], base_model="m", can_resume=False
    )
    assert "resume_from" not in no_ckpt and "cannot be continued" in no_ckpt and "Validation" not in no_ckpt


def test_summary_says_how_to_make_the_held_out_folder_it_evaluates_on(tmp_path):
    import shlex

    from data.synthetic import main as synthetic_main
    from kontext.training.config import config_from_dict
    from kontext.training.summary import finished_run_summary

    def summary(**sections) -> list[str]:
        cfg = config_from_dict({"data": {"root": str(tmp_path / "data")}, **sections})
        return finished_run_summary(tmp_path / "run", cfg, [], 4, {}).splitlines()

    def evaluate_data(lines: list[str]) -> str:
        (cmd,) = [shlex.split(line) for line in lines if "kontext.tools.evaluate" in line]
        assert cmd[cmd.index("--out") + 1] == str(tmp_path / "run_eval"), "the report goes beside the run, not in it"
        return cmd[cmd.index("--data") + 1]

    # The synthetic default: a command that writes new scenes of the product, then the evaluation on them.
    lines = summary(data={"root": str(tmp_path / "data"), "synthetic": {"enabled": True, "size": 32, "seed": 3}})
    (make,) = [shlex.split(line) for line in lines if "data.synthetic" in line]
    assert make[:3] == ["python", "-m", "data.synthetic"] and make[make.index("--seed") + 1] == "4"
    make[make.index("--num-samples") + 1] = "2"  # fewer samples, the same command
    synthetic_main(make[3:])
    folder = Path(evaluate_data(lines))
    assert folder == tmp_path / "data_heldout" and len(list((folder / "mask").iterdir())) == 2
    # A held-out set the run validated on is the one to evaluate on.
    assert evaluate_data(summary(validation={"data_root": str(folder)})) == str(folder)
    # The user's data: which samples to put there.
    text = "\n".join(summary())
    assert "put samples the LoRA never saw into" in text and evaluate_data(text.splitlines()) == str(folder)
    # Not "it trained on every sample": a bucket smaller than the batch (or a vanished mask) leaves some untrained.
    assert f"no sample of {tmp_path / 'data'} was held out of training" in text and "every sample" not in text
    assert "copy the last 3 samples of" in "\n".join(summary(validation={"holdout": 3}))


def test_cpu_threads_for_a_plain_run(monkeypatch):
    monkeypatch.setattr(launch, "busy_cores", lambda: 0)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    assert launch.cpu_threads_for_run({}) in (1, 2, 3, 4)  # physical cores, at most the usable ones
    # a busy box: the cores other work holds are left to it
    monkeypatch.setattr(launch, "busy_cores", lambda: 3)
    assert launch.cpu_threads_for_run({}) == 1
    # the user's OMP_NUM_THREADS is never overridden
    assert launch.cpu_threads_for_run({"OMP_NUM_THREADS": "3"}) is None


def test_cpu_threads_under_a_launcher(monkeypatch):
    """A launcher's considered choice stays; its default of one thread (accelerate without --cpu on a machine without
    a GPU, torchrun) is replaced by the cores, shared by the processes of the machine."""
    monkeypatch.setattr(launch, "busy_cores", lambda: 0)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(launch.torch.accelerator, "is_available", lambda: False)
    import psutil

    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 4)
    env = {"ACCELERATE_MIXED_PRECISION": "no", "OMP_NUM_THREADS": "1"}
    default = (["python", "accelerate", "launch", "train_kontext_lora.py"], {"PATH": "/bin"})
    assert launch.cpu_threads_for_run(env, launcher=default) == 4
    assert launch.cpu_threads_for_run({**env, "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, launcher=default) == 2
    chosen = [
        (["accelerate", "launch", "--num_cpu_threads_per_process", "1", "x.py"], {}),
        (["accelerate", "launch", "--num_cpu_threads_per_process=1", "x.py"], {}),
        (["accelerate", "launch", "--cpu", "x.py"], {}),
        (["accelerate", "launch", "x.py"], {"OMP_NUM_THREADS": "1"}),  # the user's environment
        None,  # an unreadable launcher is left alone
    ]
    for launcher in chosen:
        assert launch.cpu_threads_for_run(env, launcher=launcher) is None, launcher
    # on an accelerator the launcher's setting stays whatever it is
    monkeypatch.setattr(launch.torch.accelerator, "is_available", lambda: True)
    assert launch.cpu_threads_for_run(env, launcher=default) is None


def test_busy_cores_is_the_smaller_of_the_load_average_and_the_moment(monkeypatch):
    """The load average lags a minute behind a run that just ended; the moment's sample follows a brief spike: the
    smaller of the two counts. The moment is all CPUs' busy time over the window less this process's own."""
    busy = iter([100.0, 100.75])  # /proc/stat before and after: 0.75 s busy over a 0.25 s window
    own = iter([5.0, 5.25])  # of which 0.25 s was this process
    monkeypatch.setattr(launch, "_cpu_busy_seconds", lambda: next(busy))
    monkeypatch.setattr(launch.time, "process_time", lambda: next(own))
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (3.2, 3.0, 3.0))
    assert launch.busy_cores(window=0.25) == 2  # others: (0.75 - 0.25) / 0.25
    busy, own = iter([100.0, 100.75]), iter([5.0, 5.25])
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (0.9, 0.5, 0.2))
    assert launch.busy_cores(window=0.25) == 1  # the load average is the smaller
    monkeypatch.setattr(launch, "_cpu_busy_seconds", lambda: None)  # no /proc/stat: the load average alone
    assert launch.busy_cores() == 1


def test_a_busy_process_is_seen_in_the_moments_sample(monkeypatch):
    monkeypatch.setattr(launch.os, "getloadavg", lambda: (8.0, 8.0, 8.0))  # the moment decides
    spinner = subprocess.Popen([sys.executable, "-c", "print('ready', flush=True)\nwhile True: pass"],
                               stdout=subprocess.PIPE)
    try:
        assert spinner.stdout.readline() == b"ready\n"
        assert launch.busy_cores(window=0.5) >= 1
    finally:
        spinner.kill()
        spinner.wait()


def test_the_launchers_command_line_and_environment_are_read_from_proc():
    child = subprocess.Popen(
        [sys.executable, "-c", "print('ready', flush=True); import sys; sys.stdin.read()", "launch",
         "--num_cpu_threads_per_process", "3"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={"OMP_NUM_THREADS": "5", "KONTEXT_PROBE": "x y"},
    )
    try:
        assert child.stdout.readline() == b"ready\n"  # it runs its own command line now
        argv, env = launch._launcher_process(child.pid)
    finally:
        child.communicate(b"")
    assert argv[-3:] == ["launch", "--num_cpu_threads_per_process", "3"]
    assert env["OMP_NUM_THREADS"] == "5" and env["KONTEXT_PROBE"] == "x y"
    assert launch.launcher_chose_threads((argv, env))
    assert launch._launcher_process(2**22 + 12345) is None  # no such process


def test_set_cpu_threads_applies_them(monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "cpu_threads_for_run", lambda: 1)
    monkeypatch.setattr(launch.torch, "set_num_threads", calls.append)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert launch.set_cpu_threads() == 1
    assert calls == [1] and launch.os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setattr(launch, "cpu_threads_for_run", lambda: None)
    calls.clear()
    assert launch.set_cpu_threads() is None and calls == []


def _bad_config_args(tmp_path: Path) -> list[str]:
    return ["--config", "configs/example_tiny.yaml", f"output_dir={tmp_path / 'out'}",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_stepz=3"]


def test_config_error_is_the_last_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    for k in [k for k in launch.os.environ if k.startswith("ACCELERATE_") or k == "LOCAL_RANK"]:
        monkeypatch.delenv(k)
    assert tk.main(_bad_config_args(tmp_path)) == 2
    err = capsys.readouterr().err.rstrip("\n").splitlines()
    assert err[-1].startswith("error: ") and "max_stepz" in "\n".join(err) and "CalledProcessError" not in "\n".join(err)


def test_config_error_under_accelerate_is_set_off_and_last(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    assert tk.main(_bad_config_args(tmp_path)) == 2
    err = capsys.readouterr().err.rstrip("\n")
    assert "=" * 72 in err and "CalledProcessError" in err
    tail = err[err.index("error: "):]
    assert "max_stepz" in tail and "max_steps" in tail


def test_stderr_relayed_by_accelerate_goes_to_stdout(monkeypatch):
    """accelerate's single-process launcher relays stderr through a pipe and prints all of it again after a
    failure; the script's stderr joins its stdout there, so that pipe stays empty and each line shows once."""
    import os
    import sys

    for k in [k for k in os.environ if k.startswith("ACCELERATE_") or k == "LOCAL_RANK"]:
        monkeypatch.delenv(k)
    assert not launch.stderr_to_stdout_under_accelerate()  # a plain `python` run: nothing changes
    assert not launch.stderr_is_relayed_by_accelerate({"ACCELERATE_USE_CPU": "False", "LOCAL_RANK": "0"})  # torchrun
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what the single-process launcher sets
    relay_r, relay_w = os.pipe()
    out_r, out_w = os.pipe()
    stdout = os.fdopen(out_w, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    saved = os.dup(2)
    try:
        os.dup2(relay_w, 2)
        assert launch.stderr_is_relayed_by_accelerate()
        assert launch.stderr_to_stdout_under_accelerate()
        os.write(2, b"error: once\n")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(relay_w)
        stdout.close()
    with os.fdopen(relay_r, "rb") as relay, os.fdopen(out_r, "rb") as out:
        assert relay.read() == b"" and out.read() == b"error: once\n"


def test_importing_the_pipeline_says_nothing_about_torchvision():
    """FluxKontextPipeline's import makes transformers fall back to PIL image processors for components this
    project never loads; that notice is dropped, other transformers messages are not."""
    log = logging.getLogger("transformers.utils.import_utils")

    def passes(message: str) -> bool:
        return bool(log.filter(log.makeRecord(log.name, logging.WARNING, __file__, 0, message, (), None)))

    assert not passes("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert passes("another notice")


@pytest.mark.slow
def test_accelerate_launch_config_error_is_impossible_to_miss(tmp_path):
    """The one real process for a config error (the in-process tests above check the message): the trainer
    exits with status 2 before it writes anything, and its message stays visible above accelerate's traceback."""
    from test_launch import accelerate_cmd, subprocess_env

    cmd = accelerate_cmd() + ["launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no", "train_kontext_lora.py", *_bad_config_args(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out, err = proc.stdout, proc.stderr
    assert "returned non-zero exit status 2" in err, err[-3000:]  # the trainer's own status, as accelerate reports it
    # The script's output reaches the terminal once (on stdout), not again in accelerate's RuntimeError.
    framed = out.index("=" * 72)
    assert "error: " in out[framed:] and "max_stepz" in out[framed:] and "max_steps" in out[framed:]
    assert (out + err).count("Unknown config key") == 1 and "torchvision" not in out + err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_summary_names_the_committed_tiny_model_as_tiny(tmp_path):
    from kontext.tiny.model import COMMITTED_DIR

    text = run_summary(steps=1, wall_seconds=1, history=[], metrics={}, output_dir=tmp_path, files=[],
                       base_model=str(COMMITTED_DIR), can_resume=False)
    assert "python -m kontext.tools.evaluate --model tiny --lora" in text and str(COMMITTED_DIR) not in text
