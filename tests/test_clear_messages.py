"""Messages that blamed the wrong thing or left out the cause name it (docs/reliability.md, section 12)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import train_kontext_lora as tk
from data import DatasetError, open_source, validate_source
from data.errors import first_names
from kontext.training.config import ConfigError, load_config


def _main_error(args: list[str], capsys) -> str:
    capsys.readouterr()
    assert tk.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err


def _problems(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        validate_source(open_source("folder", root, default_prompt="insert it"), progress=False)
    return str(info.value)


def test_an_override_with_an_empty_key_part_blames_the_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"train": {"max_steps": 3}}))
    for override in (".x=1", "train..max_steps=2", "train.=2"):
        with pytest.raises(ConfigError) as info:
            load_config(config, [override])
        msg = str(info.value)
        assert f"Override {override!r} (on the command line)" in msg and "empty part" in msg, msg
        assert str(config) not in msg, msg


def test_config_that_is_a_folder_says_so(tmp_path, capsys):
    err = _main_error(["--config", str(tmp_path)], capsys)
    assert f"Config file {tmp_path} is a folder" in err and "does not exist" not in err, err


def test_a_tracker_that_is_not_installed_stops_before_training(tmp_path, tiny_model_dir, tiny_dataset_dir, monkeypatch,
                                                               capsys):
    import accelerate.utils
    from diffusers import FluxKontextPipeline

    from conftest import tiny_run_dict

    def refuse(*a, **k):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    d = tiny_run_dict(tmp_path / "out", tiny_model_dir, tiny_dataset_dir, tmp_path / "cache", logging={"report_to": "wandb"})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(d))
    err = _main_error(["--config", str(config)], capsys)
    assert "logging.report_to: wandb" in err and "pip install -e '.[wandb]'" in err and "report_to=none" in err, err
    assert not (tmp_path / "out").exists()


def _sample(root: Path, name: str, size: tuple[int, int], context_exif: int | None = None) -> None:
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4 : h // 2, w // 4 : w // 2] = 255
    for role, arr in (("context", np.full((h, w, 3), 90, np.uint8)), ("target", np.full((h, w, 3), 90, np.uint8)),
                      ("mask", mask)):
        (root / role).mkdir(parents=True, exist_ok=True)
        img = Image.fromarray(arr)
        if role == "context" and context_exif is not None:
            exif = Image.Exif()
            exif[0x0112] = context_exif
            img.save(root / role / f"{name}.png", exif=exif)
        else:
            img.save(root / role / f"{name}.png")


def test_a_size_mismatch_from_an_exif_rotation_names_the_tag(tmp_path):
    _sample(tmp_path / "set", "a", (64, 48), context_exif=6)  # stored 64x48, displayed 48x64
    msg = _problems(tmp_path / "set")
    assert "context/a.png is 48x64" in msg and "EXIF orientation" in msg and "context/a.png is stored 64x48" in msg, msg
    _sample(tmp_path / "plain", "a", (64, 48))
    (tmp_path / "plain" / "mask" / "a.png").unlink()
    Image.fromarray(np.zeros((40, 64), np.uint8)).save(tmp_path / "plain" / "mask" / "a.png")
    assert "EXIF" not in _problems(tmp_path / "plain")


def test_a_folder_of_hidden_files_says_they_are_ignored(tmp_path, tiny_dataset_dir):
    root = tmp_path / "set"
    shutil.copytree(tiny_dataset_dir, root)
    for role in ("context", "target", "mask"):
        for p in (root / role).iterdir():
            p.rename(p.with_name("." + p.name))
    (root / "context" / ".DS_Store").write_bytes(b"")
    msg = _problems(root)
    assert "context/ holds only hidden files (context/.00000.png" in msg and "leading dot" in msg, msg
    assert ".DS_Store" not in msg and "hold no images" not in msg, msg


def test_a_16_bit_mask_holding_8_bit_values_is_described_as_it_is(tmp_path, tiny_dataset_dir):
    root = tmp_path / "set"
    shutil.copytree(tiny_dataset_dir, root)
    mask = np.asarray(Image.open(root / "mask" / "00000.png").convert("L")).astype(np.uint16)  # 0 and 255
    Image.fromarray(mask).save(root / "mask" / "00000.png")
    assert Image.open(root / "mask" / "00000.png").mode.startswith("I"), "Pillow should open it as 16-bit greyscale"
    msg = _problems(root)
    assert "mask/00000.png" in msg and "16-bit greyscale image whose values stop at 255" in msg, msg
    assert "only 0 and 1" not in msg, msg


def test_a_long_list_of_names_shows_the_first_and_counts_the_rest():
    assert first_names(["a", "b", "c", "d"], 2) == "a, b and 2 more"
    assert first_names(["a", "b"], 2) == "a, b"
    assert first_names([], 3) == ""
