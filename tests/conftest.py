"""Shared fixtures: the tiny FLUX.1 Kontext (built once per machine, cached) and a small synthetic dataset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Two cores here: keep torch from oversubscribing them, and keep results repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
