"""On a CPU the training step computes with the threads the launcher gave, and no other thread competes with it."""

from __future__ import annotations

import threading

import pytest
import torch

import train_kontext_lora as tk
from kontext.training import inputs
from test_train_e2e import tiny_cfg


def test_prefetch_auto_is_off_on_the_cpu_and_on_for_an_accelerator():
    assert inputs.use_prefetch("auto", torch.device("cpu")) is False
    assert inputs.use_prefetch("auto", torch.device("cuda", 0)) is True
    assert inputs.use_prefetch(True, torch.device("cpu")) is True
    assert inputs.use_prefetch(False, torch.device("cuda", 0)) is False


@pytest.mark.parametrize("prefetch", ["auto", True])
def test_the_step_computes_with_the_launchers_threads(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, prefetch):
    """The launcher asked for 2 intra-op threads: every step computes with 2, and with ``data.prefetch: auto`` the
    batches are prepared in the step's own thread (a second thread would take a core from the step's OpenMP team)."""
    torch.set_num_threads(2)
    step_threads, batch_threads = [], []
    compute_loss, make_train_batch = tk.compute_loss, inputs.make_train_batch

    def counting_loss(*args, **kwargs):
        step_threads.append((threading.current_thread(), torch.get_num_threads()))
        return compute_loss(*args, **kwargs)

    def counting_batch(*args, **kwargs):
        batch_threads.append(threading.current_thread())
        return make_train_batch(*args, **kwargs)

    monkeypatch.setattr(tk, "compute_loss", counting_loss)
    monkeypatch.setattr(inputs, "make_train_batch", counting_batch)
    cfg = tiny_cfg(tmp_path, tiny_model_dir, tiny_dataset_dir, train={"max_steps": 3}, data={"prefetch": prefetch},
                   checkpoint={"every_steps": 0})
    tk.run_training(cfg)
    main = threading.main_thread()
    assert step_threads == [(main, 2)] * 3
    assert batch_threads and all((t is main) == (prefetch == "auto") for t in batch_threads)
