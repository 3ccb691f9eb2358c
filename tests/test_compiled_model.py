"""``accelerate launch --dynamo_backend ...`` (``torch.compile`` of the prepared transformer, whole or by region).

accelerate wraps the prepared model in ``torch.compile`` (or, regional, copies it with its repeated blocks
compiled). The checkpoint hooks compared that wrapper with the bare transformer, so no checkpoint held the LoRA:
the first save stopped the run with "pytorch_lora_weights.safetensors is missing" and the trained steps were lost.
These tests train, checkpoint, resume and export through both wrappers and compare with the uncompiled run.

The in-process tests use dynamo's ``eager`` backend (the same wrappers, no code generation, seconds); the
launched test compiles with inductor, as a user does.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors import safe_open

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.config import config_from_dict

from reliability_helpers import REPO, lora_of, max_diff, saved_lora
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)
from test_distributed import _free_port
from test_launch import accelerate_cmd, subprocess_env, tiny_overrides

MODES = {"whole": {}, "regional": {"ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "true"}}


@pytest.fixture(params=sorted(MODES))
def compiled(request, monkeypatch):
    """accelerate's dynamo settings as ``accelerate launch --dynamo_backend eager [--dynamo_use_regional_compilation]``
    passes them; accelerate keeps one process-wide state, so it is reset before and after."""
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    for k, v in MODES[request.param].items():
        monkeypatch.setenv(k, v)
    torch._dynamo.reset()
    yield request.param
    AcceleratorState._reset_state(reset_partial_state=True)
    torch._dynamo.reset()


def _is_compiled(model: torch.nn.Module, mode: str) -> bool:
    optimized = torch._dynamo.eval_frame.OptimizedModule
    if mode == "whole":
        return isinstance(model, optimized)
    return not isinstance(model, optimized) and any(isinstance(m, optimized) for m in model.modules())


def _lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as f:
        return sorted(f.keys())


def test_a_compiled_run_checkpoints_and_exports_the_lora_it_trains(compiled, finished, tmp_path, caplog):
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="kontext_lora"):
        run = tk.run_training(config_from_dict(d))
    assert run.stop_reason == "done"
    region = ", by region" if compiled == "regional" else ""
    assert f"The launcher compiles the transformer (torch.compile, backend eager{region})" in caplog.text
    out = tmp_path / "out"
    expected = _lora_keys(finished["out"] / "pytorch_lora_weights.safetensors")
    for folder in (out / "checkpoint-2", out / "checkpoint-4", out):
        assert _lora_keys(folder / "pytorch_lora_weights.safetensors") == expected, folder.name
    # The same steps as the uncompiled run (dynamo's eager backend runs the traced operations as they are).
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
    assert max_diff(saved_lora(out / "checkpoint-2"), saved_lora(finished["out"] / "checkpoint-2")) <= 1e-6
    assert (out / "lora_comfyui.safetensors").is_file() == (finished["out"] / "lora_comfyui.safetensors").is_file()


def test_a_compiled_run_trains_through_the_compiled_model_and_resumes_exactly(compiled, finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished["out"] / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(finished["out"] / "config.yaml", out / "config.yaml")
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(out)
    d["checkpoint"]["resume_from"] = "latest"
    cfg = config_from_dict(d)
    run = tk.setup(cfg)
    assert _is_compiled(run.transformer, compiled), type(run.transformer)
    base = lora_io.unwrapped(run.accelerator, run.transformer)
    assert base is run.pipe.transformer  # validation and the export see the parameters being trained
    assert max_diff(lora_of(run), saved_lora(finished["out"] / "checkpoint-2")) == 0.0  # the checkpoint was loaded
    reason = tk.train(run)
    tk.finish(run, reason)
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
    assert [h["loss/total"] for h in run.history] == pytest.approx(
        [h["loss/total"] for h in finished["history"]], rel=1e-5
    )


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler on the CPU")
def test_accelerate_launch_with_inductor_regional_compilation(tmp_path, tiny_model_dir, tiny_dataset_dir):
    cmd = accelerate_cmd() + [
        "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
        "--num_cpu_threads_per_process", "2",
        "--dynamo_backend", "inductor", "--dynamo_use_regional_compilation",
        "train_kontext_lora.py", "--config", "configs/example_tiny.yaml",
        *tiny_overrides(tiny_model_dir, tiny_dataset_dir, tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = tmp_path / "out"
    for folder in (out / "checkpoint-2", out / "checkpoint-3", out):
        keys = _lora_keys(folder / "pytorch_lora_weights.safetensors")
        assert keys and all(k.startswith("transformer.") and "_orig_mod" not in k for k in keys), folder.name
    plain = tmp_path / "plain"
    plain.mkdir()
    cmd_plain = [sys.executable, "train_kontext_lora.py", "--config", "configs/example_tiny.yaml",
                 *tiny_overrides(tiny_model_dir, tiny_dataset_dir, plain)]
    proc = subprocess.run(cmd_plain, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Inductor fuses and reorders float32 arithmetic: the same training to rounding, not bit for bit.
    assert max_diff(saved_lora(out), saved_lora(plain / "out")) <= 1e-4


@pytest.mark.slow
def test_two_processes_compiled_by_region_train_the_uncompiled_runs_lora(tmp_path, tiny_model_dir, tiny_dataset_dir):
    """DDP under accelerate's regional compilation (the DDP wrapper, then the compiled copy): both ranks end with the
    same LoRA, and it is the one the same launch trains uncompiled."""
    def launch(name: str, dynamo: list[str]) -> tuple[Path, str]:
        cmd = accelerate_cmd() + [
            "launch", "--config_file", "configs/accelerate/cpu_2proc.yaml", "--main_process_port", str(_free_port()),
            *dynamo, "train_kontext_lora.py", "--config", "configs/example_tiny.yaml",
            *tiny_overrides(tiny_model_dir, tiny_dataset_dir, tmp_path / name),
        ]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        digests = re.findall(r"LoRA digest per process: (\[.*?\])", proc.stdout + proc.stderr)
        assert len(digests) == 1 and len(set(json.loads(digests[0]))) == 1, digests
        return tmp_path / name / "out", proc.stdout + proc.stderr

    compiled, log = launch("compiled", ["--dynamo_backend", "eager", "--dynamo_use_regional_compilation"])
    assert "The launcher compiles the transformer (torch.compile, backend eager, by region)" in log
    plain, log = launch("plain", ["--dynamo_backend", "no"])
    assert "The launcher compiles" not in log
    for folder in ("checkpoint-2", "."):
        assert _lora_keys(compiled / folder / "pytorch_lora_weights.safetensors") == \
            _lora_keys(plain / folder / "pytorch_lora_weights.safetensors")
    assert max_diff(saved_lora(compiled), saved_lora(plain)) <= 1e-6
