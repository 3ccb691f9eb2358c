"""README and CI stay in step: CI runs exactly the README's test command; links point at real files."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quick_start_has_two_commands():
    cmds = _quick_start_commands()
    assert len(cmds) == 2
    assert "accelerate launch train_kontext_lora.py --config configs/example_tiny.yaml" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert _quick_start_commands()[1] in ci
    # Then the marked tests that the default run leaves out, by the command the README gives for them; only
    # pytest's "no tests collected" (exit status 5) is let through.
    (marked,) = set(re.findall(r"`(python -m pytest -q -m \w+)`", (ROOT / "README.md").read_text()))
    assert ci.index(_quick_start_commands()[1]) < ci.index(f"{marked} || [ $? -eq 5 ]")
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert f"not {marked.split()[-1]}" in options["addopts"]


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text()
    for link in re.findall(r"\]\(((?:docs|configs)/[^)#]+)\)", text):
        assert (ROOT / link).exists(), link
