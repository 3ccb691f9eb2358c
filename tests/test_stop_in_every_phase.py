"""Every stop, in every phase: one signal scope (SIGTERM, SIGINT, SIGHUP, SIGQUIT) from setup to the export,
and a signal during validation says what it waits for.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import copy
import signal
from pathlib import Path

import pytest

import train_kontext_lora as tk
from kontext.training.checkpoint import list_checkpoints
from kontext.training.config import config_from_dict

from reliability_helpers import LORA_FILE, cfg_dict, max_diff, saved_lora, write_yaml
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


# ---------------------------------------------------------------------------------------------
# 3b. A signal during validation says what it waits for
# ---------------------------------------------------------------------------------------------


def test_signal_message_names_what_it_waits_for(capfd):
    from kontext.training.signals import StopRequest, busy

    with StopRequest() as stop:
        with busy("the validation at step 40 (2 x 28 denoising steps)"):
            signal.raise_signal(signal.SIGTERM)  # the handler has run when it returns
        assert stop.requested == "SIGTERM"
    err = capfd.readouterr().err
    assert "SIGTERM received: waiting for the validation at step 40 (2 x 28 denoising steps) to finish, then saving" in err
    with StopRequest():
        signal.raise_signal(signal.SIGINT)
    assert "SIGINT received: finishing the current step, then saving" in capfd.readouterr().err


def test_sigterm_during_validation_says_it_waits_for_the_validation(tmp_path, tiny_model_dir, tiny_dataset_dir,
                                                                     monkeypatch, capfd):
    """SIGTERM during a long validation says it waits for the validation, not "finishing the current step"."""
    import kontext.evaluation.score as ks  # where validation generates its images

    real_generate = ks.generate

    def generate_after_sigterm(*a, **k):
        signal.raise_signal(signal.SIGTERM)  # the scheduler's notice arrives while validation generates
        return real_generate(*a, **k)

    monkeypatch.setattr(ks, "generate", generate_after_sigterm)
    d = cfg_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", train={"max_steps": 4},
                 checkpoint={"every_steps": 0}, validation={"every_steps": 1, "num_samples": 1, "num_inference_steps": 2})
    run = tk.setup(config_from_dict(d))
    capfd.readouterr()
    assert tk.train(run) == "signal"
    err = capfd.readouterr().err
    assert "SIGTERM received: waiting for the validation at step 1 (1 x 2 denoising steps) to finish, then saving" in err
    assert "finishing the current step" not in err
    assert list_checkpoints(tmp_path / "out") == [tmp_path / "out" / "checkpoint-2"]
    tk.finish(run, "signal")
    out = capfd.readouterr().out
    assert "Stopped by signal at step 2; checkpoint saved. Resume with:" in out
    assert f"--config {tmp_path / 'out' / 'config.yaml'} checkpoint.resume_from=latest" in out
    assert not (tmp_path / "out" / LORA_FILE).exists(), "a pre-empted run must not look finished"


# ---------------------------------------------------------------------------------------------
# 3c. One signal scope over every phase: SIGTERM, SIGINT, SIGHUP and SIGQUIT, from setup to the export
# ---------------------------------------------------------------------------------------------


def test_one_stop_scope_covers_four_signals_and_nests(capfd):
    from kontext.training.signals import StopRequest, Stopped, uninterrupted

    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGQUIT)}
    with StopRequest() as outer:
        with StopRequest() as inner:  # a scope entered inside another joins it
            assert inner is outer
            signal.raise_signal(signal.SIGQUIT)  # SIGQUIT's default would dump core
        assert outer.requested == "SIGQUIT"
    assert {s: signal.getsignal(s) for s in before} == before
    assert "SIGQUIT received: finishing the current step, then saving a checkpoint" in capfd.readouterr().err

    # Interrupting: the first signal raises at once; an uninterrupted block inside takes it at its end.
    done = []
    with StopRequest() as stop, pytest.raises(Stopped) as info:
        with stop.interrupting():
            with uninterrupted():
                signal.raise_signal(signal.SIGHUP)
                done.append("the rest of the block")
    assert done == ["the rest of the block"] and info.value.signum == signal.SIGHUP
    assert capfd.readouterr().err == ""  # silent: whoever catches Stopped gives the one message


def _signal_run_config(tmp_path: Path, finished: dict, **sections) -> tuple[Path, Path]:
    """The ``finished`` run's description (same training) in a new folder, with section overrides."""
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(tmp_path / "out")
    d["data"]["cache_dir"] = str(tmp_path / "cache")
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return write_yaml(tmp_path / "config.yaml", d), tmp_path / "out"


def _resume(out: Path, capfd) -> str:
    """Run the printed resume command in-process; its stdout."""
    assert tk.main(["--config", str(out / "config.yaml"), "checkpoint.resume_from=latest"]) == 0
    return capfd.readouterr().out


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGINT, "the data check"), (signal.SIGTERM, "the cache build")])
def test_a_stop_before_the_first_update_exits_with_one_message(sig, where, tmp_path, finished, monkeypatch, capfd):
    """Ctrl-C during the data check, SIGTERM while a latent cache entry is being written: one message, no traceback,
    128 + the signal's number, nothing half-written; the printed command then trains the run."""
    import data.cache
    from kontext.training import inputs

    config, out = _signal_run_config(tmp_path, finished, train={"max_steps": 1})
    if where == "the data check":
        real_open = inputs.open_sources

        def open_then_signal(*a, **k):
            signal.raise_signal(sig)
            return real_open(*a, **k)

        monkeypatch.setattr(inputs, "open_sources", open_then_signal)
    else:
        real_save, saves = data.cache.save_file, []

        def save_after_signal(tensors, tmp, **k):  # the third entry's temporary file exists when the signal comes
            saves.append(tmp)
            if len(saves) == 3:
                assert Path(tmp).is_file()
                signal.raise_signal(sig)
            return real_save(tensors, tmp, **k)

        monkeypatch.setattr(data.cache, "save_file", save_after_signal)
    assert tk.main(["--config", str(config)]) == 128 + sig
    err = capfd.readouterr().err
    assert f"Stopped by {sig.name} before the first training update; nothing was trained or left half-written." in err
    assert f"Start again with:\n  accelerate launch train_kontext_lora.py --config {config}\n" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert not out.exists() or {p.name for p in out.iterdir()} <= {"config.yaml"}, list(out.iterdir())
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp") or p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert tk.main(["--config", str(config)]) == 0
    assert (out / LORA_FILE).is_file()


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGQUIT])
def test_sighup_and_sigquit_during_training_save_a_checkpoint_that_resumes_exactly(sig, tmp_path, finished,
                                                                                   monkeypatch, capfd):
    """Closing the terminal (SIGHUP) or SIGQUIT during training saves a checkpoint, says so, and resumes exactly."""
    config, out = _signal_run_config(tmp_path, finished, checkpoint={"every_steps": 0})
    real_loss, calls = tk.compute_loss, []

    def loss_with_signal_in_update_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(sig)
        return real_loss(*a, **k)

    monkeypatch.setattr(tk, "compute_loss", loss_with_signal_in_update_2)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert f"{sig.name} received: finishing the current step, then saving a checkpoint and stopping" in std.err
    assert ("Stopped by signal at step 2; checkpoint saved. Resume with:\n  accelerate launch train_kontext_lora.py "
            f"--config {out / 'config.yaml'} checkpoint.resume_from=latest") in std.out
    assert list_checkpoints(out) == [out / "checkpoint-2"] and not (out / LORA_FILE).exists()
    monkeypatch.undo()
    assert "Resumed from" in _resume(out, capfd)
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6  # the same run as the uninterrupted one


@pytest.mark.parametrize(("sig", "where"), [(signal.SIGTERM, "generation"), (signal.SIGINT, "grid write")])
def test_a_stop_during_the_final_validation_saves_the_trained_lora(sig, where, tmp_path, finished, monkeypatch, capfd):
    """With checkpoint.every_steps=0 ("only at pre-emption"), SIGTERM or Ctrl-C during the final validation ends
    the validation early (a grid being written is completed first), without a traceback; checkpoint-4 holds the
    trained LoRA, and the printed resume command validates and exports it."""
    from PIL import Image as PILImage

    import kontext.evaluation.score as ks  # where validation generates its images
    import kontext.training.validation as kv

    config, out = _signal_run_config(tmp_path, finished, checkpoint={"every_steps": 0},
                                     validation={"every_steps": 0, "num_samples": 1, "num_inference_steps": 2})
    real_generate, real_grid, calls = ks.generate, kv.make_grid, []

    def generate_after_signal(*a, **k):
        calls.append(1)
        if where == "generation":
            signal.raise_signal(sig)  # the handler raises: the generation ends here
        return real_generate(*a, **k)

    def grid_whose_save_is_signalled(*a, **k):
        grid = real_grid(*a, **k)

        def save(path, *sa, **sk):
            signal.raise_signal(sig)
            PILImage.Image.save(grid, path, *sa, **sk)

        grid.save = save
        return grid

    monkeypatch.setattr(ks, "generate", generate_after_signal)
    monkeypatch.setattr(kv, "make_grid", grid_whose_save_is_signalled)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert len(calls) == 1
    assert f"{sig.name} received: ending the final validation early, then saving a checkpoint and stopping" in std.err
    assert ("Stopped by signal at step 4 before the final export; checkpoint saved. Resume with:\n  accelerate launch "
            f"train_kontext_lora.py --config {out / 'config.yaml'} checkpoint.resume_from=latest") in std.out
    assert "Traceback" not in std.err + std.out
    assert list_checkpoints(out) == [out / "checkpoint-4"] and not (out / LORA_FILE).exists()
    assert max_diff(saved_lora(out / "checkpoint-4"), finished["lora"]) <= 1e-6
    grid = out / "validation" / "step-4.png"
    if where == "grid write":
        PILImage.open(grid).load()  # complete
    else:
        assert not grid.exists()
    monkeypatch.undo()
    assert f"Done: {out / LORA_FILE}" in _resume(out, capfd)
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
    assert (out / "validation" / "step-4.png").is_file()


def test_a_stop_during_the_comfyui_write_completes_the_export(tmp_path, finished, monkeypatch, capfd):
    """A SIGTERM while the ComfyUI file is written waits for the export to complete: a finished run with every
    file, never a finished-looking folder without its ComfyUI file."""
    from safetensors import safe_open

    config, out = _signal_run_config(tmp_path, finished, export={"comfyui": True})
    real_export = tk.export_comfyui

    def export_after_signal(*a, **k):
        signal.raise_signal(signal.SIGTERM)
        return real_export(*a, **k)

    monkeypatch.setattr(tk, "export_comfyui", export_after_signal)
    assert tk.main(["--config", str(config)]) == 0
    std = capfd.readouterr()
    assert ("SIGTERM received: waiting for the export of the final LoRA to finish, then stopping with the run "
            "finished") in std.err
    assert f"Done: {out / LORA_FILE}" in std.out and "Stopped by signal" not in std.out
    for name in (LORA_FILE, "lora_comfyui.safetensors", "training_history.json", "README.md", "checkpoint-4"):
        assert (out / name).exists(), name
    with safe_open(str(out / "lora_comfyui.safetensors"), "pt") as f:
        assert len(list(f.keys())) > 0
    assert max_diff(saved_lora(out), finished["lora"]) <= 1e-6
