"""Non-finite losses, gradients and LoRA weights: skipped, or the run stops with its last good checkpoint.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import kontext.runtime.lora_io as lora_io
import train_kontext_lora as tk
from kontext.training.checkpoint import finalize, list_checkpoints, temp_path
from kontext.training.config import config_from_dict

from reliability_helpers import LORA_FILE, cfg_dict, fake_state, lora_of, max_diff, saved_lora, write_yaml


# ---------------------------------------------------------------------------------------------
# 4. Non-finite losses and gradients
# ---------------------------------------------------------------------------------------------


def _nan_on_calls(monkeypatch, bad_calls: set[int], run_box: dict, snapshots: list):
    """Wrap compute_loss: on the listed calls (1-based) the dice term is NaN; record the LoRA at every call."""
    real = tk.compute_loss
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        snapshots.append(lora_of(run_box["run"]))
        total, logs = real(*args, **kwargs)
        if calls["n"] in bad_calls:
            nan = torch.tensor(float("nan"))
            logs = dict(logs, **{"loss/dice": nan, "loss/total": total.detach() + nan})
            total = total + nan
        return total, logs

    monkeypatch.setattr(tk, "compute_loss", wrapped)
    return calls


def test_isolated_nan_skips_update_and_run_continues(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, caplog):
    box: dict = {}
    snaps: list = []
    calls = _nan_on_calls(monkeypatch, {2, 4}, box, snaps)
    cfg = config_from_dict(cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                    train={"max_steps": 4, "max_nonfinite_steps": 2}))
    run = tk.setup(cfg)
    box["run"] = run
    with caplog.at_level(logging.WARNING, logger="kontext_lora"):
        reason = tk.train(run)
    assert reason == "done" and calls["n"] == 6  # 4 updates + 2 skipped
    # A skipped update leaves the LoRA exactly as it was; a good one changes it.
    assert max_diff(snaps[1], snaps[2]) == 0.0
    assert max_diff(snaps[3], snaps[4]) == 0.0
    assert max_diff(snaps[0], snaps[1]) > 0
    assert [h["step"] for h in run.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss/total"]) for h in run.history)
    warnings = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(warnings) == 2 and all("loss/dice" in w for w in warnings)


def test_consecutive_nans_stop_with_last_good_checkpoint(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch, capsys):
    box: dict = {}
    snaps: list = []
    _nan_on_calls(monkeypatch, set(range(3, 100)), box, snaps)
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                 train={"max_steps": 8, "max_nonfinite_steps": 3}, checkpoint={"every_steps": 2, "total_limit": 1})
    run = tk.setup(config_from_dict(d))
    box["run"] = run
    assert tk.train(run) == "nonfinite"
    assert run.start_step == 2 and len(snaps) == 5
    assert all(max_diff(snaps[2], s) == 0.0 for s in snaps[3:])
    with pytest.raises(tk.UserError, match=r"3 consecutive updates .* Last good checkpoint: .*checkpoint-2"):
        tk.finish(run, "nonfinite")
    # The checkpoint holds the weights of the last good update and nothing was exported.
    assert list_checkpoints(out) == [out / "checkpoint-2"]
    assert max_diff(saved_lora(out / "checkpoint-2"), lora_of(run)) == 0.0
    assert not (out / LORA_FILE).exists()

    # Through the command line the same stop is exit code 2 with one message and no traceback.
    snaps.clear()
    _nan_on_calls(monkeypatch, set(range(1, 100)), box, snaps)
    real_setup = tk.setup

    def setup_and_box(cfg):
        box["run"] = real_setup(cfg)
        return box["run"]

    monkeypatch.setattr(tk, "setup", setup_and_box)
    d["checkpoint"]["resume_from"] = "latest"
    capsys.readouterr()
    rc = tk.main(["--config", str(write_yaml(tmp_path / "c.yaml", d))])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.count("error:") == 1
    assert "max_nonfinite_steps" in err or "consecutive" in err
    assert list_checkpoints(out) == [out / "checkpoint-2"]


def test_nan_gradient_skips_update(tmp_path, tiny_model_dir, tiny_dataset_dir, caplog):
    cfg = config_from_dict(cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache",
                                    train={"max_steps": 3}))
    run = tk.setup(cfg)
    fired = {"n": 0}

    def poison(grad):
        fired["n"] += 1
        return torch.full_like(grad, float("inf")) if fired["n"] == 2 else grad

    run.lora_params[0].register_hook(poison)
    with caplog.at_level(logging.WARNING, logger="kontext_lora"):
        assert tk.train(run) == "done"
    assert fired["n"] == 4 and [h["step"] for h in run.history] == [1, 2, 3]
    msgs = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    poisoned = next(n for n, p in lora_io.unwrapped(run.accelerator, run.transformer).named_parameters() if p is run.lora_params[0])
    assert len(msgs) == 1 and f"non-finite gradient in {poisoned}" in msgs[0], msgs
    assert all(torch.isfinite(v).all() for v in lora_of(run).values())


# ---------------------------------------------------------------------------------------------
# 4b. An update that makes the LoRA weights non-finite
# ---------------------------------------------------------------------------------------------


def test_update_making_lora_weights_nonfinite_stops_and_never_saves_them(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                        caplog):
    out = tmp_path / "out"
    d = cfg_dict(out, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 6},
                 checkpoint={"every_steps": 2})
    run = tk.setup(config_from_dict(d))
    real_step = run.optimizer.step
    calls = {"n": 0}

    def step_then_poison(*a, **k):  # the 3rd update writes an inf into one LoRA matrix, as a blown-up step would
        out_ = real_step(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                run.lora_params[0].view(-1)[0] = float("inf")
        return out_

    run.optimizer.step = step_then_poison
    with caplog.at_level(logging.ERROR, logger="kontext_lora"):
        reason = tk.train(run)
    assert reason == "nonfinite_weights" and run.start_step == 2 and calls["n"] == 3
    assert any("step 3: the update made the LoRA weights NaN/inf" in r.getMessage() for r in caplog.records)
    with pytest.raises(tk.UserError) as info:
        tk.finish(run, reason)
    msg = str(info.value)
    assert msg.startswith("An update made the LoRA weights NaN/inf (they were not saved); stopped at step 2. "), msg
    assert f"Last good checkpoint: {out / 'checkpoint-2'}." in msg
    # Nothing after the bad update was saved or exported; the named checkpoint is finite.
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / LORA_FILE).exists()
    assert all(torch.isfinite(v).all() for v in saved_lora(out / "checkpoint-2").values())


def test_last_good_checkpoint_named_is_verified(tmp_path):
    """A newer checkpoint with non-finite weights (say, from an older version of the trainer) is never named good."""
    from safetensors.torch import save_file

    from checkpoint_files import write_checkpoint_files

    out = tmp_path / "out"
    for step in (2, 4):
        write_checkpoint_files(temp_path(out, step))
        finalize(out, step, fake_state(step), None)
    sd = load_file(str(out / "checkpoint-4" / LORA_FILE))
    sd = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(sd, str(out / "checkpoint-4" / LORA_FILE))
    run = type("R", (), {"output_dir": out})()
    assert tk._last_checkpoint_name(run) == str(out / "checkpoint-2")
