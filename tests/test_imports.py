"""fdcam's import graph has no cycles, and every module imports in a fresh interpreter whatever came first.

The graph is read from the source with `ast` (package directories as pyproject.toml maps them), so
the check needs no import and names the modules of a cycle when one appears.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def package_modules() -> dict[str, Path]:
    """Module name -> file, for the packages of pyproject.toml (fdcam.export lives in export/, ...)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    directories = setuptools.get("package-dir", {})
    modules = {}
    for package in setuptools["packages"]:
        parent, _, last = package.rpartition(".")
        directory = ROOT / directories.get(package, Path(directories.get(parent, parent.replace(".", "/"))) / last)
        for file in directory.glob("*.py"):
            modules[package if file.stem == "__init__" else f"{package}.{file.stem}"] = file
    return modules


def _imported(module: str, node: ast.Import | ast.ImportFrom, is_package: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module
    else:
        base = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        base = f"{base}.{node.module}" if node.module else base
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """Edges module -> fdcam modules it imports: at module level, or also inside functions (`lazy`).

    Importing a.b.c runs a/__init__ and a/b/__init__ too, so those are edges as well, except the
    importer's own packages (always imported before it). `if TYPE_CHECKING:` blocks are skipped.
    """
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    for module, file in modules.items():
        is_package = file.name == "__init__.py"
        own_packages = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        targets: set[str] = set()

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if not (top or lazy):
                        continue
                    for name in _imported(module, child, is_package, modules):  # noqa: B023 (visit runs within the loop's iteration)
                        while name and name not in modules:
                            name = name.rpartition(".")[0]
                        explicit = name
                        while name:
                            if name != module and (name == explicit or name not in own_packages):  # noqa: B023 (visit runs within the loop's iteration)
                                targets.add(name)  # noqa: B023 (visit runs within the loop's iteration)
                            name = name.rpartition(".")[0]
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, False)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                else:
                    visit(child, top)

        visit(ast.parse(file.read_text()), True)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in graph:
        if node not in index:
            connect(node)
    return found


def test_the_graph_reader_finds_every_module_and_its_imports():
    graph = import_graph(lazy=True)
    assert {"fdcam", "fdcam.evaluation", "fdcam.evaluation.run", "fdcam.export.model",
            "fdcam.runtime.cache"} <= set(graph)
    assert "fdcam.model_state" in graph["fdcam.export.model"]
    assert {"fdcam.export", "fdcam.export.graph"} <= graph["fdcam.runtime.cache"]  # the package's __init__ runs too
    assert "fdcam.runtime" not in graph["fdcam.methods.base"]  # backends register; the core does not import them


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_at_module_level():
    assert cycles(import_graph(lazy=False)) == []


def test_no_import_cycle_even_through_imports_inside_functions():
    assert cycles(import_graph(lazy=True)) == []


@pytest.mark.parametrize("order", ["sorted", pytest.param("reversed", marks=pytest.mark.slow)])
def test_every_module_imports_in_a_fresh_interpreter(order):
    names = sorted(name for name in package_modules() if not name.endswith("__main__"))  # those run the CLI
    if order == "reversed":
        names.reverse()
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
