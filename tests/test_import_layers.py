"""The floors of the package (docs/DESIGN.md §1): every import of `revdeq_cli`, read from the source with
`ast` (module level, inside functions, under TYPE_CHECKING, and `import_module("revdeq_cli...")` calls),
goes down a floor or stays inside its own package, and no set of modules imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import revdeq_cli

PACKAGE_DIR = Path(revdeq_cli.__file__).parent
# Bottom to top. A module may import its own unit and the units of lower floors, never a unit of its own
# floor or above. The root `revdeq_cli` is the facade over everything (it loads deq and model on demand).
FLOORS: list[set[str]] = [
    {"errors", "formatting", "version", "sampling", "solver_facts", "recipes"},  # leaf helpers and tables
    {"deq"},
    {"model"},
    {"data", "settings"},
    {"checkpoints"},
    {"training", "interop"},
    {"cli"},
    {"", "__main__"},  # revdeq_cli/__init__.py, `python -m revdeq_cli`
]


def module_files() -> dict[str, Path]:
    """Dotted module name -> its file, for every module of the package."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = ["revdeq_cli", *path.relative_to(PACKAGE_DIR).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The `revdeq_cli` modules that `name` imports anywhere in its file (a `from X import y` counts as
    X.y when that is a module, else X)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def unit(module: str) -> str:
    """`revdeq_cli.training.loop` -> "training"; the root package -> ""."""
    return module.split(".")[1] if "." in module else ""


def floor(module: str) -> int:
    return next(i for i, units in enumerate(FLOORS) if unit(module) in units)


def test_every_unit_has_a_floor():
    assert {unit(m) for m in import_graph()} <= set().union(*FLOORS)


def test_no_import_climbs_or_crosses_a_floor():
    wrong = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                   if unit(a) != unit(b) and floor(b) >= floor(a))
    assert not wrong, "imports that climb a floor or cross to a unit of the same floor:\n" + "\n".join(wrong)


def test_no_import_cycle():
    graph = import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
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
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_graph_sees_lazy_imports():
    """The reader finds imports inside functions (the check is only as good as that)."""
    graph = import_graph()
    assert "revdeq_cli.model.step_rule" in graph["revdeq_cli.settings.schema"]  # imported inside a method
    assert "revdeq_cli.model" in graph["revdeq_cli"]  # import_module("revdeq_cli.model")
