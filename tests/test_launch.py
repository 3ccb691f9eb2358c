"""The trainer as users start it: ``accelerate launch train_kontext_lora.py`` and plain ``python``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(model_dir: Path, data_dir: Path, tmp_path: Path, **extra: object) -> list[str]:
    """``section.key=value`` overrides that point ``configs/example_tiny.yaml`` at the test fixtures."""
    values: dict[str, object] = {
        "output_dir": tmp_path / "out",
        "model.pretrained_model_name_or_path": model_dir,
        "model.max_sequence_length": 16,
        "data.root": data_dir,
        "data.synthetic.enabled": "false",
        "data.resolution": 64,
        "data.cache_dir": tmp_path / "cache",
        "lora.rank": 4,
        "lora.alpha": 4,
        "train.max_steps": 3,
        "train.batch_size": 2,
        "train.lr_warmup_steps": 0,
        "checkpoint.every_steps": 2,
        "validation.every_steps": -1,
        "export.comfyui": "false",
        "logging.report_to": "none",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def subprocess_env() -> dict[str, str]:
    """The current environment with two torch threads per process (the machines here have two cores)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def accelerate_cmd() -> list[str]:
    """``accelerate`` from this interpreter's environment."""
    exe = Path(sys.executable).parent / "accelerate"
    return [str(exe)] if exe.exists() else [shutil.which("accelerate") or "accelerate"]


def _check_finished(out: Path) -> None:
    lora = out / "pytorch_lora_weights.safetensors"
    assert lora.is_file(), f"no LoRA in {sorted(p.name for p in out.iterdir())}"
    with safe_open(str(lora), framework="pt") as f:
        keys = list(f.keys())
        assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
        assert all(k.startswith("transformer.") for k in keys)
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.slow
def test_accelerate_launch_single_process(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cmd = accelerate_cmd() + [
        "launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        "2",
        "train_kontext_lora.py",
        "--config",
        "configs/example_tiny.yaml",
        *tiny_overrides(tiny_model_dir, tiny_dataset_dir, tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_finished(tmp_path / "out")
    # The step computes with the threads the launcher was asked for, and nothing else competes for them.
    assert "with 2 intra-op threads per process; the next batch is prepared between steps" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_plain_python_run(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cmd = [sys.executable, "train_kontext_lora.py", "--config", "configs/example_tiny.yaml"]
    cmd += tiny_overrides(tiny_model_dir, tiny_dataset_dir, tmp_path)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_finished(tmp_path / "out")
