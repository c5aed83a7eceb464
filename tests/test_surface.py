"""The package root is the public surface: ``__all__`` is exactly the documented list.

The list lives in ``swarm_notebook``'s docstring (between ``.. public-names`` and
``.. end-public-names``); adding or dropping a name in one place without the other fails
here, as does a name that does not resolve.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import swarm_notebook
from swarm_notebook import errors

ERRORS_LINE = "every error class of ``swarm_notebook.errors`` (its ``__all__``)"


def documented_names() -> list[str]:
    doc = swarm_notebook.__doc__ or ""
    block = doc.split(".. public-names", 1)[1].split(".. end-public-names", 1)[0]
    names: list[str] = []
    for line in block.splitlines():
        line = line.strip()
        if line == ERRORS_LINE:
            names.extend(errors.__all__)
        elif line:
            names.extend(line.split())
    return names


def test_all_is_exactly_the_documented_surface() -> None:
    documented = documented_names()
    assert len(documented) == len(set(documented)), "a name is listed twice"
    assert sorted(swarm_notebook.__all__) == sorted(documented)


def test_every_public_name_resolves_and_is_what_it_says() -> None:
    for name in swarm_notebook.__all__:
        assert getattr(swarm_notebook, name) is not None, name
    assert swarm_notebook.Coordinator.__module__ == "swarm_notebook.client"
    assert swarm_notebook.NoCapablePeerError is errors.NoCapablePeerError
    assert issubclass(swarm_notebook.TaskRefused, swarm_notebook.DelegationError)
    assert set(swarm_notebook.__all__) <= set(dir(swarm_notebook))


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from swarm_notebook import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(swarm_notebook.__all__)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        swarm_notebook.no_such_name  # type: ignore[attr-defined]  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("swarm_notebook.no_such_name resolved")


def test_import_stays_light() -> None:
    # aiortc and ipywidgets are loaded on first use, not by ``import swarm_notebook``.
    code = (
        "import sys, swarm_notebook\n"
        "heavy = [m for m in ('aiortc', 'ipywidgets', 'pandas', 'IPython') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""


# -- no reach-through, no cycles ---------------------------------------------------------

PACKAGE_DIR = Path(swarm_notebook.__file__).parent
# What the notebook layer must not touch: the coordinator's insides.
PRIVATE_COORDINATOR_PARTS = {"_core", "_runner", "_events", "core"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE_DIR.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def module_level_imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Modules imported when ``name`` is imported: top level, not under TYPE_CHECKING."""
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If):
                test = ast.unparse(node.test)
                if "TYPE_CHECKING" not in test:
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name if is_package else name.rsplit(".", 1)[0]
                    for _ in range(node.level - 1):
                        package = package.rsplit(".", 1)[0]
                    base = f"{package}.{base}" if base else package
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE_DIR.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        targets = module_level_imports(tree, name, path.name == "__init__.py")
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_no_import_cycles_between_modules() -> None:
    graph = import_graph()
    # Importing a package's submodule imports the package first: that edge is no cycle.
    for name, targets in graph.items():
        targets -= {t for t in targets if name.startswith(t + ".")}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_client_imports_the_notebook_only_lazily_and_magics_never_the_extension() -> None:
    graph = import_graph()
    assert not {t for t in graph["swarm_notebook.client"] if ".notebook" in t}
    for name in ("magics", "session", "handle", "progress", "source"):
        imported = graph[f"swarm_notebook.notebook.{name}"]
        assert "swarm_notebook.notebook.extension" not in imported, name
    magics = ast.parse((PACKAGE_DIR / "notebook" / "magics.py").read_text())
    every_import = {node.module for node in ast.walk(magics) if isinstance(node, ast.ImportFrom)}
    assert "swarm_notebook.notebook.extension" not in every_import  # not even for typing


def test_the_notebook_layer_uses_only_public_coordinator_methods() -> None:
    reaching = []
    for path in sorted((PACKAGE_DIR / "notebook").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in PRIVATE_COORDINATOR_PARTS:
                reaching.append(f"{path.name}:{node.lineno} .{node.attr}")
    assert reaching == [], f"the notebook layer reaches into the coordinator: {reaching}"
