"""Bad input: one clear message, exit code 2, before any model is loaded, earlier outputs untouched.

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reliability_helpers import cfg_dict, run_main_expect_user_error, tree_digest, write_yaml
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


def _png(path: Path, arr: np.ndarray) -> None:
    Image.fromarray(arr).save(path)


def _bad_datasets(root: Path, good: Path) -> dict[str, tuple[Path, dict, list[str]]]:
    """case -> (dataset folder, extra data.* settings, strings the message must contain)."""
    cases: dict[str, tuple[Path, dict, list[str]]] = {}

    def copy_of(name: str) -> Path:
        dst = root / name
        shutil.copytree(good, dst)
        return dst

    cases["missing_folder"] = (root / "nope", {}, ["nope"])
    empty = root / "empty"
    for role in ("context", "target", "mask"):
        (empty / role).mkdir(parents=True)
    cases["empty"] = (empty, {}, ["is empty", "add samples"])
    d = copy_of("no_mask")
    (d / "mask" / "00001.png").unlink()
    cases["missing_mask"] = (d, {}, ["00001", "mask"])
    d = copy_of("no_target")
    (d / "target" / "00002.png").unlink()
    cases["missing_target"] = (d, {}, ["00002", "target"])
    d = copy_of("corrupt")
    (d / "context" / "00003.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    cases["corrupt_image"] = (d, {}, ["context/00003.png"])
    d = copy_of("non_image")
    (d / "target" / "notes.txt").write_text("not a picture")
    cases["non_image"] = (d, {}, ["target/notes.txt", "not an image"])
    d = copy_of("mask_size")
    _png(d / "mask" / "00004.png", np.full((32, 32), 255, np.uint8) * (np.arange(32)[None, :] < 16))
    cases["mask_size"] = (d, {}, ["00004", "sizes differ"])
    d = copy_of("empty_mask")
    _png(d / "mask" / "00005.png", np.zeros((64, 64), np.uint8))
    cases["empty_mask"] = (d, {}, ["mask/00005.png", "empty"])
    d = copy_of("full_mask")
    _png(d / "mask" / "00006.png", np.full((64, 64), 255, np.uint8))
    cases["full_mask"] = (d, {}, ["mask/00006.png", "full"])
    d = copy_of("bomb")
    # 16 megapixels of zeros compress to a few kB: the header, not the file size, must trip the limit.
    Image.new("L", (4000, 4000)).save(d / "target" / "00007.png")
    cases["pixel_limit"] = (d, {"max_pixels": 10_000_000}, ["target/00007.png", "over the limit of 10,000,000", "data.max_pixels"])
    return cases


@pytest.fixture()
def earlier_outputs(tmp_path, finished):
    """An output folder holding an earlier, unfinished run (a checkpoint, its config, a leftover .tmp)."""
    out = tmp_path / "earlier"
    out.mkdir()
    shutil.copytree(finished["out"] / "checkpoint-2", out / "checkpoint-2")
    shutil.copy(finished["out"] / "config.yaml", out / "config.yaml")
    (out / "checkpoint-4.tmp").mkdir()
    (out / "checkpoint-4.tmp" / "random_states_0.pkl").write_bytes(b"partial")
    return out


def test_bad_datasets_are_refused_early(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, earlier_outputs, no_model_load, capsys):
    before = tree_digest(earlier_outputs)
    for case, (root, extra, needles) in _bad_datasets(tmp_path / "sets", tiny_dataset_dir).items():
        d = cfg_dict(earlier_outputs, tiny_model_dir, root, tmp_path / "cache", data=extra,
                     checkpoint={"every_steps": 2, "total_limit": 3, "resume_from": "latest"})
        err = run_main_expect_user_error(["--config", str(write_yaml(tmp_path / f"{case}.yaml", d))], capsys)
        for needle in needles:
            assert needle in err, f"{case}: {needle!r} not in message:\n{err}"
        assert tree_digest(earlier_outputs) == before, f"{case}: earlier outputs were touched"


def test_several_dataset_problems_are_listed_at_once(tmp_path, tiny_model_dir, tiny_dataset_dir, no_model_load, capsys):
    d = tmp_path / "many"
    shutil.copytree(tiny_dataset_dir, d)
    (d / "mask" / "00001.png").unlink()
    (d / "context" / "00003.png").write_bytes(b"not a png")
    (d / "target" / "notes.txt").write_text("x")
    _png(d / "mask" / "00005.png", np.zeros((64, 64), np.uint8))
    _png(d / "mask" / "00006.png", np.full((64, 64), 255, np.uint8))
    cfg = cfg_dict(tmp_path / "out", tiny_model_dir, d, tmp_path / "cache")
    err = run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "c.yaml", cfg))], capsys)
    for needle in ("00001", "context/00003.png", "target/notes.txt", "mask/00005.png", "mask/00006.png"):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    assert re.search(r"has [5-9] problems", err), err
    assert not (tmp_path / "out").exists()


def test_bad_config_and_resume_inputs_are_refused_early(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, no_model_load, capsys):
    fin = tmp_path / "finished_copy"
    shutil.copytree(finished["out"], fin)
    fin_before = tree_digest(fin)
    earlier = tmp_path / "unfinished"
    shutil.copytree(finished["out"] / "checkpoint-2", earlier / "checkpoint-2")
    earlier_before = tree_digest(earlier)
    other = tmp_path / "other_out"
    base = cfg_dict(other, tiny_model_dir, tiny_dataset_dir, tmp_path / "cache")
    config = write_yaml(tmp_path / "base.yaml", base)

    override_cases = {
        "misspelled key": (["train.max_step=5"], ["train.max_step", "max_steps"]),
        "wrong type": (["train.max_steps=many"], ["train.max_steps"]),
        "negative loss weight": (["loss.geometry.dice=-1"], ["loss.geometry.dice"]),
        "resume from nothing": (["checkpoint.resume_from=/no/such/checkpoint"], ["checkpoint.resume_from", "latest"]),
        "resume from incomplete": ([f"checkpoint.resume_from={fin}"], ["checkpoint.resume_from", "not a complete"]),
        "finished output_dir": ([f"output_dir={fin}"], [str(fin), "overwrite_output_dir", "resume_from=latest"]),
        "unfinished output_dir": ([f"output_dir={earlier}"], [str(earlier), "checkpoint-2", "resume_from=latest"]),
        "other rank": ([f"output_dir={fin}", "checkpoint.resume_from=latest", "lora.rank=8", "train.max_steps=8"],
                       ["lora.rank", "checkpoint-4"]),
    }
    for case, (overrides, needles) in override_cases.items():
        err = run_main_expect_user_error(["--config", str(config), *overrides], capsys)
        for needle in needles:
            assert needle in err, f"{case}: {needle!r} not in message:\n{err}"
        assert tree_digest(fin) == fin_before, f"{case}: the finished run was touched"
        assert tree_digest(earlier) == earlier_before, f"{case}: the unfinished run was touched"
        assert not other.exists(), f"{case}: an output folder was created"

    # A misspelled key inside the YAML file, and another LoRA target set, written in files.
    bad = copy.deepcopy(base)
    bad["train"]["learning_rat"] = 1e-4
    err = run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "typo.yaml", bad))], capsys)
    assert "learning_rat" in err and "learning_rate" in err
    targets = copy.deepcopy(base)
    targets["output_dir"] = str(fin)
    targets["lora"]["target_modules"] = ["attn.to_q", "attn.to_v"]
    targets["checkpoint"]["resume_from"] = "latest"
    targets["train"]["max_steps"] = 8
    err = run_main_expect_user_error(["--config", str(write_yaml(tmp_path / "targets.yaml", targets))], capsys)
    assert "lora.target_modules" in err and "checkpoint-4" in err
    assert tree_digest(fin) == fin_before
