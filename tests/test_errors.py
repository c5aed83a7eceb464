"""Guards on the one error tree: every error class is a ``SwarmError``, reasons are ``Reason``s.

These read the package's source (``ast``) and import every module, so a new ad-hoc
exception class, a reason written as a string literal, or a builtin exception raised on a
path users call fails here with the file and line.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import swarm_notebook
from swarm_notebook import errors
from swarm_notebook.errors import SwarmError
from swarm_notebook.reasons import Reason

PACKAGE_DIR = Path(swarm_notebook.__file__).parent
# Modules a user reaches by calling the public API or the command line: a builtin
# exception raised here is an error outside the tree.
PUBLIC_PATHS = (
    "client.py",
    "__init__.py",
    "notebook/",
    "cli/",
    "coordinator/",
    "knowledge/service.py",
    "governance/service.py",
    "workload/delegator.py",
)
# Owned by another change in flight (the mesh's events protocol, the risk rules): their
# literal reasons are converted there. Remove a file from here once it is converted.
NOT_YET_CONVERTED = frozenset({"transport/mesh.py", "governance/risk.py"})
BUILTIN_EXCEPTIONS = {
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException)
}


# Modules that need an optional extra, and the library it brings (checked where installed).
OPTIONAL = {"swarm_notebook.transport.backends.native_backend": "libdatachannel"}


def all_modules() -> list[str]:
    names = [swarm_notebook.__name__]
    for info in pkgutil.walk_packages(swarm_notebook.__path__, swarm_notebook.__name__ + "."):
        if info.name in OPTIONAL and importlib.util.find_spec(OPTIONAL[info.name]) is None:
            continue
        names.append(info.name)
    return names


def source_files() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR).as_posix()
        yield rel, ast.parse(path.read_text(), filename=rel)


def swarm_error_classes() -> dict[str, type[SwarmError]]:
    return {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, SwarmError)
    }


def reason_position(cls: type[SwarmError]) -> int | None:
    """Index of the ``reason`` argument among positional arguments, or None if it has none."""
    params = list(inspect.signature(cls.__init__).parameters)[1:]  # drop self
    return params.index("reason") if "reason" in params else None


def test_every_exception_class_in_the_package_is_a_swarm_error() -> None:
    strays = []
    for module_name in all_modules():
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if not (isinstance(value, type) and issubclass(value, BaseException)):
                continue
            if value.__module__ != module_name or name.startswith("_"):
                continue  # imported from elsewhere, or private control flow
            if not issubclass(value, SwarmError):
                strays.append(f"{module_name}.{name}")
    assert strays == [], f"exception classes outside the SwarmError tree: {strays}"


def stray_classes(rel: str, tree: ast.Module) -> list[str]:
    """Public exception classes defined in ``rel`` (only errors.py may define them)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for base in node.bases:
                base_name = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if base_name in swarm_error_classes() or base_name in BUILTIN_EXCEPTIONS:
                    found.append(f"{rel}:{node.lineno} {node.name}")
    return found


def literal_reasons(rel: str, tree: ast.Module) -> list[str]:
    """Calls of a SwarmError class whose reason is a literal (or a Reason that does not exist)."""
    classes = swarm_error_classes()
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name not in classes:
            continue
        position = reason_position(classes[name])
        given = [kw.value for kw in node.keywords if kw.arg == "reason"]
        if position is not None and len(node.args) > position:
            given.append(node.args[position])
        for arg in given:
            if isinstance(arg, ast.Constant | ast.JoinedStr):
                found.append(f"{rel}:{node.lineno} {name}({ast.unparse(arg)}, ...)")
            elif (
                isinstance(arg, ast.Attribute)
                and isinstance(arg.value, ast.Name)
                and arg.value.id == "Reason"
                and arg.attr not in Reason.__members__
            ):
                found.append(f"{rel}:{node.lineno} Reason.{arg.attr} does not exist")
    return found


def builtin_raises(rel: str, tree: ast.Module) -> list[str]:
    """``raise ValueError(...)`` and friends."""
    found = []
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.update(id(n) for n in ast.walk(node))  # AttributeError is its protocol
        if not isinstance(node, ast.Raise) or node.exc is None or id(node) in skip:
            continue
        exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
        if isinstance(exc, ast.Name) and exc.id in BUILTIN_EXCEPTIONS:
            found.append(f"{rel}:{node.lineno} raise {exc.id}")
    return found


def test_error_classes_are_defined_only_in_errors_py() -> None:
    found = [
        f for rel, tree in source_files() if rel != "errors.py" for f in stray_classes(rel, tree)
    ]
    assert found == [], f"error classes defined outside errors.py: {found}"


def test_every_reason_passed_to_an_error_is_a_reason_member() -> None:
    found = [
        f
        for rel, tree in source_files()
        if rel not in NOT_YET_CONVERTED
        for f in literal_reasons(rel, tree)
    ]
    assert found == [], "reasons must be Reason members, not literals:\n" + "\n".join(found)


def test_no_builtin_exception_is_raised_on_public_paths() -> None:
    found = [
        f
        for rel, tree in source_files()
        if rel.startswith(PUBLIC_PATHS)
        for f in builtin_raises(rel, tree)
    ]
    assert found == [], f"builtin exceptions raised on public paths: {found}"


def test_the_guards_can_fail() -> None:
    # A module that breaks every rule above: each guard must report it.
    tree = ast.parse(
        "class Oops(ValueError): ...\n"
        "class Mine(SwarmError): ...\n"
        "raise NoCapablePeerError('no-capable-peer', 'x')\n"
        "raise TaskRefused(reason=f'bad-{x}', message='y')\n"
        "raise PeerUnavailable('gone', Reason.NO_SUCH_REASON)\n"
        "raise NoCapablePeerError(Reason.NO_CAPABLE_PEER, 'fine')\n"
        "raise ValueError('x')\n"
    )
    assert [f.split()[1] for f in stray_classes("m.py", tree)] == ["Oops", "Mine"]
    assert [f.split(":")[1].split()[0] for f in literal_reasons("m.py", tree)] == ["3", "4", "5"]
    assert builtin_raises("m.py", tree) == ["m.py:7 raise ValueError"]


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_is_exported_from_the_root(name: str) -> None:
    cls = getattr(swarm_notebook, name)
    assert cls is getattr(errors, name)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        assert issubclass(cls, SwarmError)
