"""The package's layering: its imports form no cycle, and each room imports only the rooms
below it (ops know nothing above them; Triton files hold kernels only)."""

from __future__ import annotations

import ast
from pathlib import Path

import stable_dfl

PACKAGE = Path(stable_dfl.__file__).resolve().parent
#: Modules that setup.py builds or writes into the package (absent in a bare checkout).
BUILT_MODULES = ("_C", "_build_info")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every import between the package's modules, function-level ones included: a lazy
    import hides a cycle from the interpreter, not from the design."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules.pop("stable_dfl._build_info", None)
    submodules = set(modules) | {f"stable_dfl.{name}" for name in BUILT_MODULES}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: climb level - 1 packages from this one
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    candidate = f"{module}.{alias.name}"
                    targets.add(candidate if candidate in submodules else module)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        if node in visiting:
            return [*visiting[visiting.index(node) :], node]
        if node in done:
            return None
        visiting.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        visiting.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_the_package_imports_form_no_cycle():
    graph = _import_graph()
    assert "stable_dfl.ops.triton_dfl" in graph["stable_dfl.ops.dfl"]  # the walk sees lazy imports
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))


def test_ops_know_nothing_above_them_and_triton_files_hold_kernels_only():
    graph = _import_graph()
    for name, targets in graph.items():
        if name.startswith("stable_dfl.ops"):
            outside = {t for t in targets if not t.startswith("stable_dfl.ops")}
            assert not outside, f"{name} imports {outside}"
        if name.startswith("stable_dfl.ops.triton_"):
            assert targets <= {"stable_dfl.ops.backends", "stable_dfl.ops.reference"}, targets
    importers = {n for n, targets in graph.items() if "stable_dfl.ops._library" in targets}
    assert importers == {"stable_dfl.ops.backends"}
