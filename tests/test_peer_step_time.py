"""benchmarks/peer_step_time.py's runner: the clock on a script's progress bar, in-process (the benchmark
itself launches both trainers and is not run in tests)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import tqdm.auto

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import peer_step_time as peer  # noqa: E402

SCRIPT = textwrap.dedent(
    """
    import sys, time
    from tqdm.auto import tqdm

    for _ in tqdm(range(2), desc="Caching"):  # another bar: not clocked
        pass
    bar = tqdm(range(4), desc="Steps")
    for _ in range(4):
        time.sleep(0.01)
        bar.update(1)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.fixture
def isolated(monkeypatch):
    """run_side replaces tqdm.auto.tqdm, sys.path[0] and sys.argv: put them back after the test."""
    monkeypatch.setattr(tqdm.auto, "tqdm", tqdm.auto.tqdm)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))


@pytest.mark.parametrize("code", [0, 3])
def test_runner_clocks_the_named_bar_and_keeps_the_exit_status(tmp_path, isolated, code):
    script, timing = tmp_path / "script.py", tmp_path / "timing.json"
    script.write_text(SCRIPT, encoding="utf-8")
    argv = ["--side", "example", "--script", str(script), "--desc", "Steps", "--timing", str(timing), "--", str(code)]
    assert peer.run_side(argv) == code
    rec = json.loads(timing.read_text(encoding="utf-8"))
    assert rec["exit"] == code and len(rec["ticks"]) == 4 and len(rec["usage"]) == 5
    assert rec["threads"] >= 1 and rec["rss_at_exit_mib"] >= rec["rss_mib"][-1] > 0
    s = peer.summarise(rec, warmup=1)
    assert len(s["steps"]) == 4 and len(s["steady"]) == 3
    assert all(x >= 0.009 for x in s["steps"])  # each update came after a 10 ms sleep
    assert s["loop_s"] == pytest.approx(sum(s["steps"]))


def test_runner_profiles_the_chosen_updates(tmp_path, isolated):
    script, timing = tmp_path / "script.py", tmp_path / "timing.json"
    script.write_text(SCRIPT.replace("time.sleep(0.01)", "time.sleep(0.01); __import__('torch').ones(8).sum()"),
                      encoding="utf-8")
    argv = ["--side", "project", "--script", str(script), "--desc", "Steps", "--timing", str(timing),
            "--profile", "1", "2", "--", "0"]
    assert peer.run_side(argv) == 0
    rows = json.loads(timing.read_text(encoding="utf-8"))["profile"]
    ones = next(r for r in rows if r["name"] == "aten::ones")
    assert ones["calls"] == 1  # two profiled updates, one call each, counted per update


def test_a_run_that_fails_after_its_loop_keeps_its_timing_and_says_why(tmp_path):
    """Under regional compilation the example finishes its loop and then fails to reload its LoRA: its steps count,
    its failure is reported. A run that fails before its loop ends is still an error."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT.replace("sys.exit(int(sys.argv[1]))",
                                     "raise ValueError('cannot reload the saved LoRA')"), encoding="utf-8")
    args = (sys.executable, 1, "example", script, "Steps")
    rec = peer.launch(*args, tmp_path / "t4.json", [], tmp_path / "t4.log", 120, updates=4)
    assert len(rec["ticks"]) == 4
    assert rec["failed_after_loop"] == "exit 1: ValueError: cannot reload the saved LoRA"
    with pytest.raises(RuntimeError, match=r"example run failed \(exit 1\)"):
        peer.launch(*args, tmp_path / "t5.json", [], tmp_path / "t5.log", 120, updates=5)
