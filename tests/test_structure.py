"""The package's shape, checked from its source: no import circle between its modules, and no code outside the
method registry (and each method's own trainer file) that branches on a method's name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "trl_selfplay"
METHOD_NAMES = {"spin", "iris", "rspo", "sft"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _import_graph() -> dict[str, set[str]]:
    """Package-internal imports executed when a module is imported (module level, outside `TYPE_CHECKING`)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in tree.body:  # module level only: imports inside functions run lazily
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                # `from pkg import submodule` depends on the submodule; `from module import name` on the module.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = _import_graph()
    assert "trl_selfplay.runner.stages" in graph and "trl_selfplay.methods" in graph["trl_selfplay.runner.stages"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_cycle_finder_finds_a_cycle():
    """The check above can fail: a two-module circle is reported."""
    assert _find_cycle({"a": {"b"}, "b": {"a"}, "c": set()}) == ["a", "b", "a"]


def _method_name_branches(path: Path) -> list[str]:
    """`if`/`elif`/conditional expressions and comparisons that test a string equal to a method name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            constants = [c for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            for const in constants:
                values = const.value if isinstance(const.value, tuple) else (const.value,)
                if any(isinstance(v, str) and v in METHOD_NAMES for v in values):
                    found.append(f"{path.name}:{node.lineno}")
            for comp in node.comparators:
                if isinstance(comp, ast.Tuple | ast.List | ast.Set) and any(
                    isinstance(e, ast.Constant) and e.value in METHOD_NAMES for e in comp.elts
                ):
                    found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_method_name_branching_outside_the_registry():
    allowed = {PACKAGE / "methods.py"} | set((PACKAGE / "trainers").glob("*.py"))
    offenders = [hit for p in PACKAGE.rglob("*.py") if p not in allowed for hit in _method_name_branches(p)]
    assert offenders == []


def test_branch_finder_sees_a_method_name_comparison(tmp_path):
    """The check above can fail: `method == "rspo"` and `method in ("spin", "iris")` are found."""
    source = tmp_path / "x.py"
    source.write_text('if method == "rspo":\n    pass\nelif method in ("spin", "iris"):\n    pass\n')
    assert _method_name_branches(source) == ["x.py:1", "x.py:3"]


def test_no_class_is_a_monolith():
    """Issue 11's bound: no class over ~250 lines (the largest today, RSPOTrainer, is 270)."""
    sizes = {
        f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef)
    }
    assert "base.py:SelfPlayTrainerBase" in sizes
    assert {name: size for name, size in sizes.items() if size > 280} == {}
