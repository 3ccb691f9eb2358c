"""The project's modules import one another down the layers only, at the top of each module, without cycles.

Layers, lowest first (a module may import its own layer and those below it)::

    kontext.errors, losses  <-  data  <-  kontext.runtime, kontext.evaluation  <-  kontext.tiny  <-  kontext.export
        <-  kontext.training  <-  train_kontext_lora  <-  kontext.tools, benchmarks

``python tests/test_import_layers.py [ROOT]`` prints the graph (module -> the project modules it imports), its cycles
and the imports that point up or sit inside a function.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("losses", "data", "kontext", "benchmarks")
LAYERS = (
    ("kontext.errors", "losses"),
    ("data",),
    ("kontext.runtime", "kontext.evaluation"),
    ("kontext.tiny",),
    ("kontext.export",),
    ("kontext.training",),
    ("train_kontext_lora",),
    ("kontext.tools", "benchmarks"),
)
# Benchmarks are scripts: some run inside another venv (a peer trainer's) and import the project only where used.
LAZY_ALLOWED = ("benchmarks",)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every project module under ``root``."""
    found = {"train_kontext_lora": root / "train_kontext_lora.py"} if (root / "train_kontext_lora.py").is_file() else {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _within(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer(name: str) -> int:
    """The layer of a module (its index in :data:`LAYERS`); the bare ``kontext`` package sits with the lowest."""
    for i, prefixes in enumerate(LAYERS):
        if _within(name, prefixes):
            return i
    if name == "kontext":
        return 0
    raise AssertionError(f"{name} belongs to no layer; add it to LAYERS")


def imports(mods: dict[str, Path]) -> dict[str, dict[str, bool]]:
    """module -> {imported project module: imported at module level}."""
    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(node) for node in tree.body}
        # `if TYPE_CHECKING:` blocks and `try: import x except ImportError` at module level count as top level.
        for node in tree.body:
            if isinstance(node, (ast.If, ast.Try)):
                top.update(id(n) for n in ast.walk(node))
        edges: dict[str, bool] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                dep = owner(target)
                if dep is not None and dep != name:
                    edges[dep] = edges.get(dep, False) or id(node) in top
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, bool]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward(graph: dict[str, dict[str, bool]]) -> list[str]:
    return [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]


def lazy(graph: dict[str, dict[str, bool]]) -> list[str]:
    return [
        f"{a} -> {b}" for a in sorted(graph) for b, at_top in sorted(graph[a].items())
        if not at_top and not _within(a, LAZY_ALLOWED)
    ]


# --------------------------------------------------------------------------------------------------- tests
def test_no_import_cycles() -> None:
    assert cycles(imports(modules())) == []


def test_every_import_points_down_the_layers() -> None:
    assert upward(imports(modules())) == []


def test_project_imports_sit_at_the_top_of_each_module() -> None:
    assert lazy(imports(modules())) == []


def test_the_checker_sees_a_cycle_an_upward_and_a_lazy_import(tmp_path: Path) -> None:
    (tmp_path / "losses").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "losses" / "__init__.py").write_text("from losses.b import x\n")
    (tmp_path / "losses" / "b.py").write_text("import losses\nx = 1\n")
    (tmp_path / "data" / "__init__.py").write_text("")
    (tmp_path / "data" / "c.py").write_text("def f():\n    from losses.b import x\n    return x\n")
    (tmp_path / "losses" / "d.py").write_text("from data.c import f\n")
    graph = imports(modules(tmp_path))
    assert cycles(graph) == [["losses", "losses.b"]]
    assert upward(graph) == ["losses.d -> data.c"]
    assert lazy(graph) == ["data.c -> losses.b"]


if __name__ == "__main__":
    g = imports(modules(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
    print(f"{len(g)} modules, {sum(map(len, g.values()))} arrows")
    for a in sorted(g, key=lambda m: (layer(m), m)):
        if g[a]:
            print(f"{a} -> {', '.join(sorted(g[a]))}")
    print("cycles:", cycles(g) or "none")
    print("upward:", upward(g) or "none")
    print("inside functions:", lazy(g) or "none")
