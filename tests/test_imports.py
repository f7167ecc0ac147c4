"""fdcam's import graph has no cycles, and every module imports in a fresh interpreter whatever came first.

The graph is read from the source with `ast` (package directories as pyproject.toml maps them), so
the check needs no import and names the modules of a cycle when one appears. A module name handed to
`import_module` (the backend registry's plugins, a package's lazy `__getattr__`) is an edge too.
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


IMPORT_FUNCTIONS = ("import_module", "importlib.import_module", "__import__")


def dynamic_imports(module: str, tree: ast.Module, call: ast.Call, is_package: bool) -> list[str]:
    """The module names a call of `import_module` may import: string literals in its first argument, or in the
    module-level assignment a name in it refers to (a registry's `{"onnxruntime": "fdcam.runtime"}`); a
    relative name (".pipeline") is resolved against the package given as the second argument."""
    if ast.unparse(call.func) not in IMPORT_FUNCTIONS or not call.args:
        return []
    assigned = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    strings: list[str] = []

    def collect(expression: ast.AST, seen: frozenset = frozenset()) -> None:
        for node in ast.walk(expression):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.append(node.value)
            elif isinstance(node, ast.Name) and node.id in assigned and node.id not in seen:
                collect(assigned[node.id], seen | {node.id})

    collect(call.args[0])
    package = module if is_package else module.rpartition(".")[0]
    names = []
    for name in strings:
        if name.startswith("."):
            base = package
            for _ in range(len(name) - len(name.lstrip(".")) - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{name.lstrip('.')}" if name.lstrip(".") else base
        names.append(name)
    return names


def module_level(package: str) -> str:
    """The node of what a package's __init__ runs at import: its module-level imports only."""
    return f"{package} (module level)"


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """Edges module -> fdcam modules it imports: at module level, or also inside functions (`lazy`).

    Importing a.b.c runs a/__init__ and a/b/__init__ too, except the importer's own packages (always
    imported before it). Running a package's __init__ runs its module level, not its functions (a lazy
    `__getattr__`), so those edges go to the node `module_level(a)`, which has the package's module-level
    edges only; an explicit `import a` or `from a import name` may read a lazy attribute and is an edge to
    `a` itself. `if TYPE_CHECKING:` blocks are skipped. A module name given to `import_module` is an edge.
    """
    modules = package_modules()
    graph: dict[str, set[str]] = {}
    packages = {name for name, file in modules.items() if file.name == "__init__.py"}
    for module, file in modules.items():
        is_package = file.name == "__init__.py"
        own_packages = {module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)}
        targets: set[str] = set()
        top_targets: set[str] = set()
        tree = ast.parse(file.read_text())

        def add(names: list[str], top: bool, exact: bool = False) -> None:
            for name in names:
                if exact and name not in modules:
                    continue
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                explicit = name
                while name:
                    if name == explicit and name != module:  # noqa: B023
                        edge = name
                    elif name != module and name not in own_packages:  # noqa: B023
                        edge = module_level(name)
                    else:
                        edge = None
                    if edge is not None:
                        targets.add(edge)  # noqa: B023
                        if top:
                            top_targets.add(edge)  # noqa: B023
                    name = name.rpartition(".")[0]

        def visit(node: ast.AST, top: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    if top or lazy:
                        add(_imported(module, child, is_package, modules), top)  # noqa: B023
                elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    visit(child, False)
                elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                else:
                    if isinstance(child, ast.Call) and (top or lazy):
                        add(dynamic_imports(module, tree, child, is_package), top, exact=True)  # noqa: B023
                    visit(child, top)

        visit(tree, True)
        graph[module] = targets
        if is_package:
            graph[module_level(module)] = top_targets
    for package in packages - {name for name in graph if name in packages}:
        graph[module_level(package)] = set()
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The nodes `start` imports, directly or through others."""
    seen, stack = set(), [start]
    while stack:
        for target in graph[stack.pop()]:
            if target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


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
    assert {"fdcam", "fdcam.evaluation", "fdcam.evaluation.run", "fdcam.export.model", "fdcam.runtime.cache"} <= set(
        graph
    )
    assert "fdcam.model_state" in graph["fdcam.export.model"]
    assert {module_level("fdcam.export"), "fdcam.export.graph"} <= graph["fdcam.runtime.cache"]  # __init__ runs too
    assert "fdcam.runtime" not in graph["fdcam.methods.base"]  # backends register; the core does not import them
    assert "fdcam.runtime" in graph["fdcam.backends"]  # ... by name, through import_module: still an edge
    assert {"fdcam.datasets.sources", "fdcam.datasets.pipeline"} <= graph["fdcam.datasets"]  # a lazy __getattr__


def test_the_graph_reader_counts_a_module_name_given_to_import_module():
    source = (
        "import importlib\n"
        "from importlib import import_module\n"
        "_PROVIDED_BY = {'onnxruntime': 'fdcam.runtime'}\n"
        "def load(name):\n"
        "    importlib.import_module(_PROVIDED_BY[name])\n"
        "    import_module('.graph', __name__)\n"
        "    import_module('fdcam.export.model')\n"
        "    print('fdcam.tail')\n"
    )
    tree = ast.parse(source)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)]
    found = [name for call in calls for name in dynamic_imports("fdcam.export", tree, call, is_package=True)]
    assert sorted(set(found) - {"onnxruntime"}) == ["fdcam.export.graph", "fdcam.export.model", "fdcam.runtime"]


def test_the_runtime_does_not_depend_on_the_methods():
    """The ONNX Runtime backend is a plugin of the methods (a registry), never the other way round."""
    graph = import_graph(lazy=True)
    for module in ("fdcam.runtime", "fdcam.runtime.cache", "fdcam.runtime.session", "fdcam.export.graph"):
        assert not {"fdcam.methods", "fdcam.methods.base", "fdcam.export.explainer"} & reachable(graph, module), module


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
