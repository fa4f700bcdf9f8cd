"""The packages' layering: no import cycle between their files (imports under TYPE_CHECKING count:
a reader still has to hold them in mind), and no private name (`_name`) used across files. Read
from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("attention_simulator", "flash_sigmoid", "optorch")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def absolute(node: ast.ImportFrom, path: Path) -> str:
    """The module an ImportFrom names, relative imports resolved against the file's package."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


def imported(path: Path, modules: dict[str, Path]):
    """(module imported, the names taken from it, line) for each of the file's project imports; a
    name that is itself a module (`from . import ring`) counts as importing that module."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, path)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    yield f"{base}.{alias.name}", [], node.lineno
                elif base in modules:
                    yield base, [alias.name], node.lineno


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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


def packages_above(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle():
    """Importing a.b.c first runs a/b/__init__.py: that counts as an import of a.b too (unless
    the importer is inside a.b, whose __init__ has already started)."""
    modules = project_modules()
    graph = {name: {t for target, _, _ in imported(path, modules)
                    for t in {target} | packages_above(target) - packages_above(name) if t != name}
             for name, path in modules.items()}  # fmt: skip
    found = cycles(graph)
    edges = [f"{a} -> {b}" for cycle in found for a in cycle for b in sorted(graph[a]) if b in cycle]
    assert not found, "import cycles:\n  " + "\n  ".join(edges)


def test_no_private_name_across_files():
    """`from x import _name` and `module._name` with x, module one of the project's modules."""
    modules = project_modules()
    files = [*modules.values(), *(ROOT / "scripts").glob("*.py")]
    found = []
    for path in files:
        bound = {}  # local name -> project module, for attribute access
        for target, names, line in imported(path, modules):
            found += [f"{path.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names if is_private(n)]
            if not names:
                bound[target.rpartition(".")[2]] = target
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for alias in node.names:
                    if alias.asname and alias.name.rpartition(".")[2] in bound:
                        bound[alias.asname] = bound[alias.name.rpartition(".")[2]]
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and is_private(node.attr) and modules.get(bound[node.value.id]) != path):  # fmt: skip
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    assert not found, "private names used across files:\n  " + "\n  ".join(sorted(set(found)))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_the_cycle_finder_finds_cycles():
    """A cycle of two modules is found; an acyclic chain is not."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_models_know_nothing_of_parallelism():
    """Context parallelism is applied from outside (parallel.py): neither the models nor the
    attention module import the ring, and the models nothing of parallel.py or distributed.py."""
    modules = project_modules()
    outside = ("attention_simulator.attention.ring", "attention_simulator.parallel", "attention_simulator.distributed")
    for name, path in modules.items():
        if name.startswith("attention_simulator.models") or name == "attention_simulator.attention.attention":
            imports = {target for target, _, _ in imported(path, modules)}
            assert not imports & set(outside), f"{name} imports {sorted(imports & set(outside))}"
