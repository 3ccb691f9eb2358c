"""The output folder: refused before anything is written when it is not a run's own, and locked while a run uses it.

See docs/reliability.md, section 8. These tests load no model (the base-model loader is patched to fail the
test), so they are fast.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import train_kontext_lora as tk
from kontext.training.config import Config, dump_config
from kontext.training.output_dir import (
    LOCK_NAME,
    OutputDirError,
    OutputDirLocked,
    check_location,
    foreign_entries,
    lock_output_dir,
    unlock_output_dir,
)

REPO = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Every entry under ``folder``: its bytes (None for a folder) and its mtime in ns."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def run_main(args: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = tk.main(args)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return rc, captured.err


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def base_config(tmp_path: Path, tiny_model_dir: Path, tiny_dataset_dir: Path, out: Path | str) -> dict:
    from conftest import tiny_run_dict

    return tiny_run_dict(Path(out), tiny_model_dir, tiny_dataset_dir, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------
# Where a run may write
# ---------------------------------------------------------------------------------------------


def test_location_refuses_empty_working_home_and_their_ancestors(tmp_path, monkeypatch):
    work = tmp_path / "home" / "me" / "project"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    home = tmp_path / "home" / "me"
    for bad, needle in [
        ("", "`output_dir` is empty"),
        ("  ", "`output_dir` is empty"),
        (".", "is the working folder"),
        (str(work), "is the working folder"),
        (str(tmp_path), "a folder above the working folder"),
        ("/", "a folder above the working folder"),
        (str(home), "the home folder"),
    ]:
        with pytest.raises(OutputDirError) as info:
            check_location(bad, home=home)
        assert needle in str(info.value), (bad, str(info.value))
    # A folder of its own, below either, is fine and is returned absolute.
    assert check_location("outputs/run") == work / "outputs" / "run"
    assert check_location(str(home / "runs" / "a"), home=home) == home / "runs" / "a"


def test_location_refuses_a_path_through_a_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(OutputDirError, match=r"notes\.txt is a file, not a folder"):
        check_location(str(f))
    with pytest.raises(OutputDirError, match=r"runs through the file .*notes\.txt"):
        check_location(str(f / "out" / "run"))
    assert f.read_text() == "mine"


def _unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder this process really cannot write into (a read-only dir for a normal user, /proc/sys for root)."""
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    for candidate in (ro, Path("/proc/sys")):
        try:
            (candidate / "kontext-probe").mkdir()
        except OSError:
            return candidate
        (candidate / "kontext-probe").rmdir()
    return None


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                    no_model_load, capsys):
    folder = _unwritable_folder(tmp_path)
    if folder is None:
        pytest.skip("no folder on this machine is unwritable for this user")
    out = folder / "kontext-out" / "run"
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path, tiny_model_dir, tiny_dataset_dir, out))
    rc, err = run_main(["--config", str(config)], capsys)
    assert rc == 2 and err.count("error: ") == 1
    assert f"output_dir {out} is not writable" in err, err
    # A file in the way of the path is refused the same way.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = run_main(["--config", str(config), f"output_dir={blocker / 'run'}"], capsys)
    assert rc == 2 and "runs through the file" in err and str(blocker) in err, err
    assert blocker.read_text() == "x"
    (tmp_path / "readonly").chmod(0o755)


# ---------------------------------------------------------------------------------------------
# What may already be in it
# ---------------------------------------------------------------------------------------------


def _trainer_written_folder(out: Path) -> Path:
    """A folder holding everything the trainer writes (real config.yaml and model card)."""
    from kontext.export.model_card import write_model_card

    cfg = Config()
    cfg.output_dir = str(out)
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-4.tmp").mkdir()
    (out / "checkpoint-3.old").mkdir()
    (out / "logs").mkdir()
    (out / "validation").mkdir()
    dump_config(cfg, out / "config.yaml")
    write_model_card(out, cfg, {}, [{"step": 4, "loss/total": 1.0}])
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "training_history.json", LOCK_NAME):
        (out / name).write_bytes(b"x")
    (out / ".DS_Store").write_bytes(b"x")
    return out


def test_only_files_the_trainer_writes_are_accepted(tmp_path):
    out = _trainer_written_folder(tmp_path / "out")
    assert foreign_entries(out) == []
    (out / "notes.txt").write_text("mine")
    (out / "src").mkdir()
    (out / "checkpoint-final").mkdir()  # not a step number: not ours
    assert foreign_entries(out) == ["checkpoint-final/", "notes.txt", "src/"]

    # README.md and config.yaml are ours only when they are the model card and a config of this trainer.
    other = tmp_path / "other"
    other.mkdir()
    (other / "README.md").write_text("# My project\n\nHand-written notes.\n")
    (other / "config.yaml").write_text("model:\n  layers: 12\n")
    assert foreign_entries(other) == ["README.md", "config.yaml"]


def test_a_folder_with_foreign_files_or_the_working_folder_is_refused_untouched(
    tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, no_model_load, capsys
):
    """An empty output_dir must not write into the working folder (it would replace its README.md)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# A repository\n")
    (repo / "setup.py").write_text("print('hi')\n")
    (repo / ".git").mkdir()
    before = snapshot(repo)
    config = write_config(tmp_path / "c.yaml", base_config(tmp_path, tiny_model_dir, tiny_dataset_dir, repo))

    # The folder named directly, with or without resume_from: refused, naming what is not the trainer's.
    for extra in ([], ["checkpoint.resume_from=latest"], ["checkpoint.overwrite_output_dir=true"]):
        rc, err = run_main(["--config", str(config), *extra], capsys)
        assert rc == 2 and err.count("error: ") == 1, err
        assert f"output_dir {repo} holds files this trainer did not write: .git/, README.md, setup.py" in err, err
        assert snapshot(repo) == before

    # The working folder, however it is named: refused before anything is read or written.
    monkeypatch.chdir(repo)
    for value in (".", str(repo), ""):
        rc, err = run_main(["--config", str(config), f"output_dir={value}"], capsys)
        assert rc == 2 and ("is the working folder" in err or "must not be empty" in err or "is empty" in err), err
        assert snapshot(repo) == before


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from kontext.training.output_dir import lock_output_dir
    lock_output_dir(Path({out!r}), main=True, create=True)
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until killed or stdin closes
    """
)


class Holder:
    """Another process holding the output folder's lock."""

    def __init__(self, out: Path) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", HOLDER.format(repo=str(REPO), out=str(out))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.p.stdout.readline().strip() == "locked"

    def kill9(self) -> None:
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(60)


def test_lock_refuses_another_process_and_dies_with_it(tmp_path):
    out = tmp_path / "out"
    holder = Holder(out)
    try:
        with pytest.raises(OutputDirLocked) as info:
            lock_output_dir(out, main=True, create=False)
        msg = str(info.value)
        assert f"output_dir {out} is in use by another training run (pid {holder.p.pid} on " in msg, msg
    finally:
        holder.kill9()
    # kill -9 leaves the lock file behind but not the lock: the kernel released it with the process.
    assert (out / LOCK_NAME).is_file()
    assert lock_output_dir(out, main=True, create=False) is True
    assert f"pid {os.getpid()} " in (out / LOCK_NAME).read_text()
    unlock_output_dir(out)
    assert not (out / LOCK_NAME).exists()


def test_lock_is_reentrant_in_one_process_and_other_ranks_take_none(tmp_path, monkeypatch):
    from kontext.training.launch import is_main_launch_process

    out = tmp_path / "out"
    assert lock_output_dir(out, main=False, create=True) is False and not out.exists()  # rank > 0: nothing
    assert lock_output_dir(out, main=True, create=False) is False and not out.exists()  # no folder: nothing yet
    assert lock_output_dir(out, main=True, create=True) is True and (out / LOCK_NAME).is_file()
    assert lock_output_dir(out, main=True, create=False) is True  # a second setup in the same process
    unlock_output_dir(out)
    monkeypatch.setenv("RANK", "1")
    assert not is_main_launch_process()
    monkeypatch.setenv("RANK", "0")
    assert is_main_launch_process()


def test_second_trainer_is_refused_before_it_deletes_or_writes(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                no_model_load, capsys):
    """A second run with resume_from=latest must not delete the first one's in-progress checkpoint."""
    out = tmp_path / "out"
    d = base_config(tmp_path, tiny_model_dir, tiny_dataset_dir, out)
    out.mkdir()
    dump_config(Config(), out / "config.yaml")
    (out / "checkpoint-2.tmp").mkdir()  # the first run is saving checkpoint-2 right now
    (out / "checkpoint-2.tmp" / "optimizer.bin").write_bytes(b"being written")
    holder = Holder(out)
    try:
        before = snapshot(out)
        for extra in (["checkpoint.resume_from=latest"], ["checkpoint.overwrite_output_dir=true"], []):
            rc, err = run_main(["--config", str(write_config(tmp_path / "c.yaml", d)), *extra], capsys)
            assert rc == 2 and err.count("error: ") == 1, err
            assert f"output_dir {out} is in use by another training run (pid {holder.p.pid}" in err, err
            assert snapshot(out) == before
    finally:
        holder.kill9()
