"""The package's import graph, read from the source (function-local imports included): no cycles."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "mixprec"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each mixprec module and the mixprec modules it imports anywhere in its text."""
    files = {_module(f): f for f in ROOT.rglob("*.py")}
    graph = {}
    for name, f in files.items():
        package = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") \
                    if node.level else node.module
                found = [base, *(f"{base}.{a.name}" for a in node.names)]
            else:
                continue
            deps |= {d for d in found if d in files and d != name}
        graph[name] = deps
    return graph


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert "mixprec.config" in graph["mixprec.steps"]  # the graph is read, not empty


def test_cli_helpers_import_nothing_from_mixprec():
    graph = import_graph()
    assert graph["mixprec.cli"] == set()
    assert "mixprec.config" not in graph["mixprec.models"]
