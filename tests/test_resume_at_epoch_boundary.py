"""Exact resume: a run stopped at an epoch boundary and resumed equals the uninterrupted run.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import copy
import json

import pytest

import train_kontext_lora as tk
from kontext.training.checkpoint import TRAINER_STATE_NAME
from kontext.training.config import config_from_dict

from reliability_helpers import cfg_dict, lora_of, max_diff


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
