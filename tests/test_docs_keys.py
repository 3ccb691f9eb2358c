"""Every config key that README.md and docs/*.md name exists in the schema (kontext/training/config.py).

A key is a dotted name whose first part is a top-level key of the schema (`train.max_steps`,
`data.mask_hint: fill`, `checkpoint.resume_from=latest`), written in an inline code span or a fenced
code block; a ```yaml block whose top level holds schema sections is checked key by key. Dotted
names that are Python objects (`data.apply_mask_hint`, the `data.hint` module) or file names
(`validation.py`) are not config keys.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml

from kontext.training.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def schema_keys(cls: type = Config, prefix: str = "") -> set[str]:
    """Every key of the schema, sections included (`loss`, `loss.geometry`, `loss.geometry.dice`)."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        keys.add(prefix + f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= schema_keys(hints[f.name], f"{prefix}{f.name}.")
    return keys


KEYS = schema_keys()
TOP = sorted(k for k in KEYS if "." not in k)  # model, data, ..., output_dir
FILE_EXTENSIONS = {
    "py", "md", "yaml", "yml", "json", "jsonl", "txt", "toml", "cfg", "sh", "log", "csv", "parquet", "arrow",
    "png", "jpg", "jpeg", "webp", "bmp", "safetensors", "pt", "bin",
}
# A dotted snake_case name starting with a top-level key, not part of a longer path or dotted name
# (`kontext.training.config.load_config`, `configs/data.md`), not a call (`data.synthetic.generate_dataset(`).
CANDIDATE = re.compile(
    r"(?<![\w./-])((?:%s)(?:\.[a-z_][a-z0-9_]*)+)(?![\w(/-]|\.\w)" % "|".join(map(re.escape, TOP))
)
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
FENCE = re.compile(r"^```[ \t]*(\w*)[^\n]*\n(.*?)^```", re.M | re.S)


def _is_python_name(dotted: str) -> bool:
    """True when ``dotted`` is an importable module or an attribute of one (``data.apply_mask_hint``)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _yaml_block_keys(block: str) -> list[str]:
    """The dotted keys a ```yaml block sets, when it is a trainer config (its top level names a section)."""
    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError:
        return []
    if not isinstance(data, dict) or not any(k in TOP for k in data):
        return []  # e.g. an accelerate config
    out = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            out.append(f"{prefix}{k}")
            if isinstance(v, dict) and f"{prefix}{k}" in KEYS:
                walk(v, f"{prefix}{k}.")

    walk(data, "")
    return out


def named_keys(markdown: str) -> list[str]:
    """The config keys a Markdown text names, in order of appearance (see the module docstring)."""
    found = []
    spans = []
    for m in FENCE.finditer(markdown):
        lang, body = m.group(1).lower(), m.group(2)
        if lang in ("yaml", "yml"):
            found += _yaml_block_keys(body)
        spans.append(body)
    outside = FENCE.sub("", markdown)
    spans += INLINE_CODE.findall(outside)
    for span in spans:
        for m in CANDIDATE.finditer(span):
            if m.group(1).rsplit(".", 1)[-1] not in FILE_EXTENSIONS:
                found.append(m.group(1))
    return found


def unknown_keys(markdown: str) -> list[str]:
    """The named keys that the schema does not have (and that are no Python name either)."""
    return [k for k in dict.fromkeys(named_keys(markdown)) if k not in KEYS and not _is_python_name(k)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_key_the_docs_name_exists(doc: Path):
    bad = unknown_keys(doc.read_text(encoding="utf-8"))
    assert bad == [], f"{doc.relative_to(ROOT)} names config keys the schema does not have: {bad}"


def test_the_docs_name_many_keys():
    # The scan is not vacuous: it sees the keys the docs really name.
    named = {k for doc in DOCS for k in named_keys(doc.read_text(encoding="utf-8"))}
    assert {"train.max_steps", "data.random_flip", "data.random_crop", "data.source", "checkpoint.resume_from",
            "loss.geometry.enabled", "data.mask_hint"} <= named
    assert len(named & KEYS) >= 40  # docs/config.md alone lists every key


def test_scanner_reports_a_bogus_key_in_every_form():
    text = (
        "Set `train.max_stepz` or `train.max_stepz=100`, `data.kind: hf`, and\n"
        "```bash\naccelerate launch train_kontext_lora.py --config x.yaml lora.rnak=4 output_dir=out\n```\n"
        "```yaml\ndata:\n  flip: true\n  synthetic:\n    sise: 64\n```\n"
    )
    assert named_keys(text) == ["data", "data.flip", "data.synthetic", "data.synthetic.sise", "lora.rnak",
                                "train.max_stepz", "train.max_stepz", "data.kind"]
    assert unknown_keys(text) == ["data.flip", "data.synthetic.sise", "lora.rnak", "train.max_stepz", "data.kind"]


def test_scanner_accepts_real_keys_and_ignores_python_and_paths():
    text = (
        "`train.max_steps`, `data.mask_hint: fill`, `checkpoint.resume_from=latest`, `data.synthetic`,\n"
        "`train.batch_size x processes x train.gradient_accumulation_steps`,\n"
        "`torch.float32`, `kontext.training.config.load_config`, `data.apply_mask_hint`, `data.hint`,\n"
        "`data.synthetic.generate_dataset(root)`, `kontext/training/validation.py`, `validation.py`, `logging.getLogger`,\n"
        "prose without backticks names data.bogus_key, which is not a code span.\n"
        "```python\nfrom data.hint import apply_mask_hint_pil\nmodel.to('cuda')\n```\n"
        "```yaml\ndistributed_type: MULTI_GPU\nnum_processes: 2\n```\n"
    )
    assert unknown_keys(text) == []
    assert "data.bogus_key" not in named_keys(text)
    assert {"train.max_steps", "data.mask_hint", "checkpoint.resume_from", "data.synthetic",
            "train.gradient_accumulation_steps"} <= set(named_keys(text))
    # A dotted name under a Python package that is neither a key nor a Python object is still reported.
    assert unknown_keys("`data.apply_mask_hintt`") == ["data.apply_mask_hintt"]
