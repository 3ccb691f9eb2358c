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
    """The cached tiny FLUX.1 Kontext folder (built on first use; later runs reuse it)."""
    from kontext.tiny import tiny_model_path

    return tiny_model_path(progress=False)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 64 px synthetic triplets in the folder format."""
    from data.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "set"
    return generate_dataset(root, num_samples=8, size=(64, 64), seed=0)
