"""Safe loading: nothing the project loads can run code (weights_only, safetensors).

See docs/reliability.md for the guarantees and which test proves which.
"""

from __future__ import annotations

import ast
import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch

import train_kontext_lora as tk
from kontext.training.config import config_from_dict

from reliability_helpers import REPO, lora_of, max_diff
from reliability_helpers import finished  # noqa: F401 (pytest fixtures)


def _project_sources() -> list[Path]:
    skip = {".venv", ".git", "outputs", "build", "node_modules"}
    return [p for p in REPO.rglob("*.py") if not (set(p.relative_to(REPO).parts) & skip)]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_project_code_loads_nothing_unsafely():
    """Over every .py file the project ships (trainer, kontext/, data/, losses/, benchmarks/):
    no pickle-based load, unsafe YAML, remote code or eval. Tests are left out: they round-trip
    their own objects through pickle (DataLoader workers) and run documentation snippets."""
    problems: list[str] = []
    files = [p for p in _project_sources() if "tests" not in p.relative_to(REPO).parts]
    assert len(files) > 20
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "cloudpickle"):
                problems.append(f"{path}:{node.lineno}: imports from {node.module}")
            if isinstance(node, ast.Import) and any(a.name in ("pickle", "dill", "cloudpickle", "marshal") for a in node.names):
                problems.append(f"{path}:{node.lineno}: imports a pickle module")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords if k.arg}
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                problems.append(f"{where}: {name} (use yaml.safe_load)")
            if name in ("pickle.load", "pickle.loads", "marshal.loads"):
                problems.append(f"{where}: {name}")
            if name in ("np.load", "numpy.load"):
                ap = kw.get("allow_pickle")
                if isinstance(ap, ast.Constant) and ap.value is True:
                    problems.append(f"{where}: {name}(allow_pickle=True)")
            tr = kw.get("trust_remote_code")
            if tr is not None and not (isinstance(tr, ast.Constant) and tr.value is False):
                problems.append(f"{where}: trust_remote_code is not False")
            if name in ("eval", "exec", "__import__"):
                problems.append(f"{where}: {name}()")
    assert not problems, "\n".join(problems)


def test_safety_scan_catches_unsafe_calls(tmp_path, monkeypatch):
    """The scan above is not vacuous: it flags each unsafe pattern in a sample file."""
    bad = tmp_path / "bad_module.py"
    bad.write_text(
        "import torch, yaml, pickle\n"
        "a = torch.load('x')\n"
        "b = torch.load('x', weights_only=False)\n"
        "c = yaml.load('x')\n"
        "d = pickle.loads(b'')\n"
        "e = f(trust_remote_code=True)\n"
        "ok = torch.load('x', weights_only=True)\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "_project_sources", lambda: [bad] * 21)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    with pytest.raises(AssertionError) as info:
        test_project_code_loads_nothing_unsafely()
    msg = str(info.value)
    for line in (":2: torch.load", ":3: torch.load", ":4: yaml.load", ":5: pickle.loads", ":6: trust_remote_code", "imports a pickle"):
        assert line in msg, (line, msg)
    assert ":7:" not in msg


def test_resume_loads_checkpoints_with_weights_only(tmp_path, tiny_model_dir, tiny_dataset_dir, finished, monkeypatch):
    """Every torch.load accelerate does while resuming is weights_only=True; all weights are safetensors."""
    fin = tmp_path / "fin"
    shutil.copytree(finished["out"], fin)
    calls: list[tuple[str, object]] = []
    real_load = torch.load

    def recording_load(f, *a, **k):
        calls.append((str(f), k.get("weights_only", "<default>")))
        return real_load(f, *a, **k)

    monkeypatch.setattr(torch, "load", recording_load)
    d = copy.deepcopy(finished["dict"])
    d["output_dir"] = str(fin)
    d["checkpoint"]["resume_from"] = "latest"
    d["train"]["max_steps"] = 5
    run = tk.setup(config_from_dict(d))
    assert run.start_step == 4
    assert calls, "accelerate loaded nothing: the test would prove nothing"
    assert {Path(f).name for f, _ in calls} >= {"optimizer.bin", "scheduler.bin"}
    assert all(wo is True for _, wo in calls), calls
    # The LoRA itself came from safetensors and equals what the run ended with.
    assert max_diff(lora_of(run), finished["lora"]) == 0.0

    # Only safetensors (or accelerate's weights_only-loaded state files) hold tensors on disk.
    allowed = {".safetensors", ".json", ".yaml", ".md", ".bin", ".pkl", ".png", ".txt", ".lock"}  # .lock: a pid
    for p in list(fin.rglob("*")) + list((finished["root"] / "cache").rglob("*")):
        if p.is_file():
            assert p.suffix in allowed, p
            if p.suffix in (".bin", ".pkl"):
                assert p.parent.name.startswith("checkpoint-"), p
    assert list((finished["root"] / "cache").rglob("*.safetensors")), "the latent cache must be safetensors"
