"""Guard: no lower layer imports a higher one (the order is written once, in LAYERS).

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a lazy
import still ties the lower layer to the higher one. The single allowed exception is
``Coordinator.dashboard()``, which builds the notebook widget on demand.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "swarm_notebook"

# Lowest first. A module may import its own package and anything in an earlier row;
# packages in the same row are peers and must not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("reasons",),
    ("errors",),
    ("_util", "environment"),
    ("identity",),
    ("protocol",),
    ("signaling",),
    ("transport",),
    ("membership",),
    ("ledger",),
    ("workload", "knowledge", "governance"),
    ("coordinator",),
    ("views",),
    ("futures",),
    ("sessions",),
    ("client",),
    ("launcher",),
    ("notebook",),
    ("bench",),
    ("cli",),
    ("__init__",),
)
# (importing module, imported top-level part): reviewed exceptions, each with its reason.
ALLOWED_UPWARD = {
    # The one lazy import: the dashboard widget is built on demand from the facade.
    ("swarm_notebook.client", "notebook"),
}


def layer_of(part: str) -> int:
    for index, row in enumerate(LAYERS):
        if part in row:
            return index
    raise KeyError(f"swarm_notebook/{part} is in no layer: add it to LAYERS in {__file__}")


def top_part(module: str) -> str | None:
    """``swarm_notebook.workload.delegator`` -> ``workload``; the root package -> ``__init__``."""
    if module == "swarm_notebook":
        return "__init__"
    if module.startswith("swarm_notebook."):
        return module.split(".")[1]
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Upward imports in ``source`` (the text of ``module``), as readable lines."""
    own = top_part(module)
    if own is None:
        raise ValueError(f"{module} is not in swarm_notebook")
    own_layer = layer_of(own)
    problems = []
    for lineno, target in imported_modules(ast.parse(source), module, is_package):
        part = top_part(target)
        if part is None or part == own or (module, part) in ALLOWED_UPWARD:
            continue
        if layer_of(part) >= own_layer:
            problems.append(f"{module}:{lineno} imports {target} ({part} is not below {own})")
    return problems


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_package_folder_has_a_layer() -> None:
    parts = {top_part(module_name(p)) for p in package_modules()}
    for part in parts:
        assert part is not None
        layer_of(part)  # raises with a message naming the missing folder


def test_no_lower_layer_imports_a_higher_one() -> None:
    problems: list[str] = []
    for path in package_modules():
        module = module_name(path)
        problems += violations(path.read_text(), module, path.name == "__init__.py")
    assert problems == [], "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("swarm_notebook.transport.mesh", "from swarm_notebook.workload import x", True),
        ("swarm_notebook.workload.delegator", "import swarm_notebook.coordinator.config", True),
        ("swarm_notebook.knowledge.service", "from swarm_notebook.governance import y", True),
        ("swarm_notebook.protocol.values", "def f():\n    import swarm_notebook.client\n", True),
        ("swarm_notebook.coordinator.config", "from swarm_notebook import __version__", True),
        ("swarm_notebook.workload.sandbox.pool", "from .child import FRAME_HEADER", False),
        ("swarm_notebook.workload.delegator", "from ..membership import node", False),
        ("swarm_notebook.notebook.magics", "from swarm_notebook.client import Coordinator", False),
        ("swarm_notebook.client", "from swarm_notebook.notebook.widget import W", False),
    ],
)
def test_the_checker_sees_upward_imports(module: str, source: str, bad: bool) -> None:
    assert bool(violations(source, module)) is bad
