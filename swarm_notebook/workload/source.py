"""Ship a Python function to a peer as source code, never as pickle.

A peer runs what it can read: the function's own source, plus one import line for every
module-level import the function uses (``np`` becomes ``import numpy as np``). Anything
else the function would need from the sender's memory cannot travel as source, so it is
refused before anything is sent, naming the variable:

* a closure over a local variable of an enclosing function;
* a notebook global that is a value or a function defined in the notebook (pass it as an
  argument instead);
* a lambda (it has no name to call; use ``def``) and a decorated function (the decorator
  would run on the peer, out of sight).

>>> import math
>>> def hyp(a, b):
...     return math.sqrt(a * a + b * b)
>>> shipped = ship_function(hyp)            # doctest: +SKIP
>>> print(shipped.imports)                  # doctest: +SKIP
('import math',)
"""

from __future__ import annotations

import ast
import builtins
import inspect
import symtable
import sys
import textwrap
import threading
import types
import weakref
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from swarm_notebook.errors import UsageError
from swarm_notebook.reasons import Reason

ARGS_NAME = "__swarm_args__"
KWARGS_NAME = "__swarm_kwargs__"
MAP_ITEM = "__item"


@dataclass(frozen=True)
class ShippedFunction:
    """A function as a peer will see it: its name, its source and the imports it needs."""

    name: str
    source: str
    imports: tuple[str, ...]

    def cell(self) -> str:
        """The ``python-computation`` code that defines the function and calls it.

        The arguments arrive as the inputs ``__swarm_args__`` and ``__swarm_kwargs__``; the
        call is the cell's last expression, so its value is the task's value.
        """
        head = "\n".join(self.imports)
        call = f"{self.name}(*{ARGS_NAME}, **{KWARGS_NAME})"
        return "\n\n".join(part for part in (head, self.source.rstrip(), call) if part) + "\n"

    def map_cell(self) -> str:
        """The code of one ``map`` chunk: the function over the items in ``__swarm_args__``
        (a list of argument lists); its value is the list of results, in order."""
        head = "\n".join(self.imports)
        call = f"[{self.name}(*{MAP_ITEM}) for {MAP_ITEM} in {ARGS_NAME}]"
        return "\n\n".join(part for part in (head, self.source.rstrip(), call) if part) + "\n"


def is_map_cell(code: str) -> bool:
    """Whether ``code`` is exactly what :meth:`ShippedFunction.map_cell` makes: then its
    items are independent, and a backend may split them across workers and join the
    value lists in order (a Dask-backed peer does)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return False
    comp = tree.body[-1].value
    if not (isinstance(comp, ast.ListComp) and len(comp.generators) == 1):
        return False
    gen = comp.generators[0]
    call = comp.elt
    return (
        not gen.ifs
        and not gen.is_async
        and isinstance(gen.target, ast.Name)
        and gen.target.id == MAP_ITEM
        and isinstance(gen.iter, ast.Name)
        and gen.iter.id == ARGS_NAME
        and isinstance(call, ast.Call)
        and isinstance(call.func, ast.Name)
        and not call.keywords
        and len(call.args) == 1
        and isinstance(call.args[0], ast.Starred)
        and isinstance(call.args[0].value, ast.Name)
        and call.args[0].value.id == MAP_ITEM
        # Only definitions and imports before it: nothing that must run exactly once.
        and all(
            isinstance(node, ast.Import | ast.ImportFrom | ast.FunctionDef)
            for node in tree.body[:-1]
        )
    )


def ship_function(fn: Callable[..., Any], cache: SourceCache | None = None) -> ShippedFunction:
    """Turn ``fn`` into source a peer can run, or raise ``UsageError`` saying why not.

    With a ``cache``, the source of a function already shipped is not read and parsed
    again (a re-run cell defines a new function, so it is); its imports are always looked
    up afresh, since the notebook may have rebound a module name in between.
    """
    if not isinstance(fn, types.FunctionType):
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            f"only plain Python functions can be shipped, not {type(fn).__name__} "
            f"({fn!r:.60}); wrap the call in a def",
        )
    name = fn.__name__
    if name == "<lambda>":
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            "a lambda cannot be shipped (it has no name to call on the peer): use def",
        )
    if fn.__code__.co_freevars:
        names = ", ".join(fn.__code__.co_freevars)
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            f"{name}() uses {names} from an enclosing function (a closure), which cannot "
            "travel as source: pass it as an argument",
        )
    parsed = cache.parsed(fn) if cache is not None else _parse(fn)
    imports = tuple(_imports_for(fn, parsed.global_names))
    return ShippedFunction(name=name, source=parsed.source, imports=imports)


@dataclass(frozen=True)
class _ParsedSource:
    source: str
    global_names: frozenset[str]


def _parse(fn: types.FunctionType) -> _ParsedSource:
    name = fn.__name__
    source = _source_of(fn)
    node = _function_node(source, name)
    if node.decorator_list:
        decorators = ", ".join("@" + ast.unparse(d) for d in node.decorator_list)
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            f"{name}() is decorated ({decorators}); the decorator would run on the peer out "
            "of sight: submit an undecorated function",
        )
    return _ParsedSource(source, frozenset(_global_names(source, name)))


class SourceCache:
    """The parsed source of functions already shipped, per code object.

    Reading and parsing a function's source costs ~0.2 ms, a fifth of a whole round trip,
    and ``submit`` in a loop ships the same function every time. Keyed weakly on the code
    object, so an entry goes when its function does and a redefined function (a new code
    object) is parsed afresh; safe to share between threads.

    >>> cache = SourceCache()
    >>> def twice(x):
    ...     return 2 * x
    >>> ship_function(twice, cache) == ship_function(twice, cache)   # doctest: +SKIP
    True
    """

    def __init__(self) -> None:
        self._parsed: weakref.WeakKeyDictionary[types.CodeType, _ParsedSource] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def parsed(self, fn: types.FunctionType) -> _ParsedSource:
        code = fn.__code__
        with self._lock:
            hit = self._parsed.get(code)
        if hit is not None:
            return hit
        parsed = _parse(fn)  # errors are not cached: fixing the cell must work at once
        with self._lock:
            self._parsed[code] = parsed
        return parsed

    def __len__(self) -> int:
        with self._lock:
            return len(self._parsed)


def _source_of(fn: types.FunctionType) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            f"the source of {fn.__name__}() is not available ({exc}); define it in a file "
            "or a notebook cell",
        ) from None


def _function_node(source: str, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            if isinstance(node, ast.AsyncFunctionDef):
                raise UsageError(
                    Reason.BAD_ARGUMENTS, f"{name}() is async; ship a plain function"
                )
            return node
    raise UsageError(
        Reason.BAD_ARGUMENTS, f"could not find the definition of {name}() in its source"
    )


def _global_names(source: str, name: str) -> set[str]:
    """Names the function (and functions nested in it) read from module scope."""
    table = symtable.symtable(source, "<shipped>", "exec")
    found: set[str] = set()

    def walk(scope: symtable.SymbolTable) -> None:
        if isinstance(scope, symtable.Function):
            found.update(scope.get_globals())
        for child in scope.get_children():
            walk(child)

    for child in table.get_children():
        if child.get_name() == name:
            walk(child)
    return found


def _imports_for(fn: types.FunctionType, names: AbstractSet[str]) -> list[str]:
    lines: list[str] = []
    problems: list[str] = []
    module_globals = fn.__globals__
    for global_name in sorted(names):
        if global_name == fn.__name__:
            continue  # recursion: the shipped source defines it
        if global_name not in module_globals:
            continue  # a builtin, or undefined here too: the peer behaves the same
        value = module_globals[global_name]
        line = _import_line(global_name, value)
        if line is not None:
            lines.append(line)
        elif value is not getattr(builtins, global_name, object()):
            problems.append(f"{global_name} ({type(value).__name__})")
    if problems:
        raise UsageError(
            Reason.BAD_ARGUMENTS,
            f"{fn.__name__}() uses notebook globals that cannot travel as source: "
            f"{', '.join(problems)}; pass them as arguments",
        )
    return lines


def _import_line(name: str, value: Any) -> str | None:
    """``import x as name`` / ``from m import a as name`` when ``value`` is importable."""
    if isinstance(value, types.ModuleType):
        full = value.__name__
        if full == name:
            return f"import {full}"
        if full.endswith("." + name):
            return f"from {full.rsplit('.', 1)[0]} import {name}"
        return f"import {full} as {name}"
    module = getattr(value, "__module__", None)
    qualname = getattr(value, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str) or "." in qualname:
        return None
    if module in ("__main__", "builtins") or module.startswith("__"):
        return None  # defined in the notebook: its source is not shipped with this one
    owner = sys.modules.get(module)
    if owner is None or getattr(owner, qualname, None) is not value:
        return None
    return f"from {module} import {qualname}" + (f" as {name}" if qualname != name else "")
