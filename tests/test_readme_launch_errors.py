"""The README's note on config errors under `accelerate launch` matches what the trainer prints."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_says_accelerate_adds_its_traceback_after_the_error():
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    (sentence,) = re.findall(r"Under `accelerate launch`[^.]*CalledProcessError[^.]*\.[^.]*\.", text)
    assert "printed first" in sentence and "above that traceback" in sentence


def test_under_accelerate_the_error_line_is_the_last_thing_the_script_prints(monkeypatch):
    from kontext.training.config import ConfigError
    from kontext.training.launch import error_text

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("RANK", "0")
    text = error_text(ConfigError("Unknown key `train.max_step` (did you mean `train.max_steps`?)"))
    lines = text.rstrip("\n").splitlines()
    assert lines[-1] == "error: Unknown key `train.max_step` (did you mean `train.max_steps`?)"
    assert any("CalledProcessError" in line for line in lines[:-1])  # the pointer the README describes
    monkeypatch.delenv("LOCAL_RANK")
    assert error_text(ConfigError("x")) == "error: x\n"  # plain python: just the message
