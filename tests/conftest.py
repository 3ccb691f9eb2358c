"""Shared fixtures: the tiny FLUX.1 Kontext (built once per machine, cached) and a small synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


def _torch_threads() -> int:
    """Torch threads for the tests: ``OMP_NUM_THREADS`` when set; else at most two (these machines have two
    cores), less the cores other work keeps busy (the 1-minute load average), at least one. OpenMP threads that
    wait for a core another process holds spin: on a busy 2-core machine a training test took 15 s with two
    threads and 1.8 s with one."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    cores = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    return max(1, cores - round(os.getloadavg()[0]))


torch.set_num_threads(_torch_threads())


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that changes torch's thread count (as a launcher's setting would) does not change it for the rest."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The committed tiny FLUX.1 Kontext folder (nothing is built)."""
    from kontext.tiny.model import tiny_model_path

    return tiny_model_path(progress=False)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 64 px synthetic triplets in the folder format."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "set"
    return generate_dataset(root, num_samples=8, size=(64, 64), seed=0)


def make_random_lora(model_dir: Path, out: Path, seed: int) -> Path:
    """A real PEFT LoRA on the tiny transformer with random (non-zero) matrices, saved in the diffusers format.

    Returns the written ``pytorch_lora_weights.safetensors``.
    """
    from diffusers import FluxTransformer2DModel

    from kontext.runtime.lora import attach_lora, make_lora_config
    from kontext.runtime.lora_io import save_lora

    t = FluxTransformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")
    torch.manual_seed(seed)
    params = attach_lora(t, make_lora_config(4, 8.0, 0.0, "gaussian", ["attn.to_q", "attn.to_v", "proj_mlp", "ff.net.2"]))
    for p in params:
        p.data.normal_(0.0, 0.2)
    return save_lora(t, out)


@pytest.fixture
def random_lora():
    """Factory fixture: ``random_lora(model_dir, out_dir, seed) -> LoRA file``."""
    return make_random_lora


def tiny_run_dict(out: Path, model_dir: Path, data_dir: Path, cache: Path, **sections) -> dict:
    """A tiny, fast run description (64 px, rank 4, 4 steps, checkpoint every 2) with per-section overrides."""
    base = {
        "output_dir": str(out),
        "model": {"pretrained_model_name_or_path": str(model_dir), "dtype": "float32", "max_sequence_length": 16},
        "data": {"root": str(data_dir), "resolution": 64, "default_prompt": "insert the can", "cache_dir": str(cache)},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"max_steps": 4, "batch_size": 2, "learning_rate": 1e-3, "lr_warmup_steps": 0},
        "checkpoint": {"every_steps": 2, "total_limit": 2},
        "validation": {"every_steps": -1},
        "logging": {"report_to": "none"},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(section, {}).update(values)
        else:
            base[section] = values
    return base


@pytest.fixture()
def no_model_load(monkeypatch):
    """Loading the base model fails the test: bad input (a config, a checkpoint, an output folder) must be refused
    before any model loads."""
    from diffusers import FluxKontextPipeline

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded although the input should have been refused before that")

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", refuse)


@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory, tiny_model_dir, tiny_dataset_dir) -> dict:
    """A finished 2-step tiny run with checkpoint-2: ``{"dict": its run description, "out": its output folder}``.
    Tests copy the folder before they change anything in it."""
    import copy

    import train_kontext_lora as tk
    from kontext.training.config import config_from_dict

    root = tmp_path_factory.mktemp("two_step")
    d = tiny_run_dict(root / "out", tiny_model_dir, tiny_dataset_dir, root / "cache", train={"max_steps": 2},
                      checkpoint={"every_steps": 2})
    tk.run_training(config_from_dict(copy.deepcopy(d)))
    return {"dict": d, "out": root / "out"}
