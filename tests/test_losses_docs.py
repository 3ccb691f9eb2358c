"""The usage example in docs/losses.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "losses.md"


def test_docs_usage_example_runs():
    text = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, f"{DOC} has no python code block"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(DOC), "exec"), namespace)
    assert namespace["L"].requires_grad
    assert namespace["z_pred"].grad is not None
    assert set(namespace["parts"]) == {"mse", "bg", "dice", "area", "boundary"}
