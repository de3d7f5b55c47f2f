"""The import graph points one way: no circles between modules or between subpackages, nothing inside the
package imports the public facade ``fastflow/__init__``, and the cache knows neither the sampler nor the models.
Imports are read from the source with ``ast``, function-level (lazy) ones included."""

import ast
from pathlib import Path

import pytest

import fastflow

PACKAGE = Path(fastflow.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The fastflow modules that module ``name`` imports: ``from a.b import c`` names a.b.c where that is a
    module, else a.b."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            }
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: imports(name) for name in MODULES}


def _subpackage(name: str) -> str:
    """fastflow.cache.hook → fastflow.cache; top-level modules (fastflow.patch) are their own node."""
    return ".".join(name.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, …, a], or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_imports():
    assert "fastflow.cache.forecasters" in GRAPH["fastflow.cache.config"]
    assert "fastflow.step_record" in GRAPH["fastflow.sampling.step"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_cycles():
    assert find_cycle(GRAPH) is None


def test_no_subpackage_cycles():
    graph: dict[str, set[str]] = {}
    for name, targets in GRAPH.items():
        graph.setdefault(_subpackage(name), set()).update(
            _subpackage(t) for t in targets if _subpackage(t) != _subpackage(name)
        )
    assert find_cycle(graph) is None


def test_nothing_inside_imports_the_public_facade():
    assert [name for name, targets in GRAPH.items() if "fastflow" in targets] == []


@pytest.mark.parametrize("forbidden", ["fastflow.sampling", "fastflow.models"])
def test_cache_knows_neither_sampler_nor_models(forbidden):
    arrows = [
        (name, target)
        for name, targets in GRAPH.items()
        if name.startswith("fastflow.cache")
        for target in targets
        if target == forbidden or target.startswith(forbidden + ".")
    ]
    assert arrows == []
