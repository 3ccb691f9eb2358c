"""Shared helpers of the reliability tests (tests/test_<guarantee>.py; docs/reliability.md lists which test
proves which guarantee): config dicts, folder digests, LoRA copies and the finished run they compare with."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.config import config_from_dict

REPO = Path(__file__).resolve().parents[1]
LORA_FILE = "pytorch_lora_weights.safetensors"


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
    return {k: v.clone() for k, v in lora_io.full_lora_state_dict(lora_io.unwrapped(run.accelerator, run.transformer)).items()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def saved_lora(folder: Path) -> dict[str, torch.Tensor]:
    """A saved LoRA file under the PEFT names ``full_lora_state_dict`` uses."""
    return {k.removeprefix("transformer."): v for k, v in load_file(str(folder / LORA_FILE)).items()}


_FINISHED: dict[str, dict] = {}


@pytest.fixture(scope="session")
def finished(tmp_path_factory, tiny_model_dir, tiny_dataset_dir):
    """A finished 4-step run (checkpoints 2 and 4, final LoRA) and the dict that described it.

    Trained once per session for every test file that imports it (pytest would build an imported fixture once
    per module); tests copy what they change.
    """
    if "run" not in _FINISHED:
        root = tmp_path_factory.mktemp("finished")
        d = cfg_dict(root / "out", tiny_model_dir, tiny_dataset_dir, root / "cache")
        run = tk.run_training(config_from_dict(copy.deepcopy(d)))
        assert run.stop_reason == "done"
        _FINISHED["run"] = {"dict": d, "out": root / "out", "history": run.history, "lora": lora_of(run), "root": root}
    return _FINISHED["run"]


def fake_state(step: int) -> dict:
    """A minimal trainer_state.json for checkpoint ``step``."""
    return {"step": step, "data": {"epoch": 0, "position": step}, "lora": {}}


def run_main_expect_user_error(args: list[str], capsys) -> str:
    """Run the trainer's main; it must exit 2 with one user error and no traceback. Returns that message."""
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


def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    """tree_digest plus every entry's mtime: "untouched" means not even rewritten with the same bytes."""
    digest = tree_digest(folder)
    return {rel: (h, (folder / rel).stat().st_mtime_ns) for rel, h in digest.items()}
