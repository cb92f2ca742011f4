"""The import graph of lmdistill/, read from the source with `ast`: packages only point down.

Every `import` counts, at module level or inside a function (a function-level import is
still a dependency; it only hides a cycle until the function runs). A top-level module
(`pipeline.py`, `cli.py`) is a node of its own, like a package.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lmdistill"
# What `config` may import: it sits at the bottom, beside these helpers that import nothing.
BOTTOM = {"io", "registry"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The lmdistill modules `path` imports (`from a import b` counts as `a` and `a.b`)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "lmdistill" or m.startswith("lmdistill.")}


def node(module: str) -> str:
    """The package (or top-level module) a module belongs to; '' for `lmdistill` itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports(path) if m in modules and m != name}
    return graph


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, targets in module_graph().items():
        for target in targets:
            if node(target) not in ("", node(module)):
                graph[node(module)].add(node(target))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = package_graph()
    # A few edges that must exist, so that an empty graph cannot pass.
    assert "kd" in graph["pipeline"] and "config" in graph["kd"] and "models" in graph["teachers"]


def test_no_cycles_between_packages():
    assert cycles(package_graph()) == []


def test_no_cycles_between_modules():
    assert cycles(module_graph()) == []


def test_config_is_at_the_bottom():
    graph = package_graph()
    assert graph["config"] <= BOTTOM, f"config imports {sorted(graph['config'] - BOTTOM)}"
    for helper in (*BOTTOM, "metrics"):  # metrics: the result types, read by every layer
        assert not graph.get(helper), f"{helper} imports {sorted(graph[helper])}"


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_cli_starts_without_torch():
    """`lmdistill --help` and argument errors answer at once: the CLI module imports neither
    torch nor transformers (validation and the pipeline load them when a command runs)."""
    import subprocess
    import sys

    code = (
        "import sys, lmdistill.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules)\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
