"""Risk of a proposed code modification (the blueprint's ``assessModificationRisk``).

Rules, first match wins:

* **high** — the target is a core path (``core_files``: glob patterns, see
  :func:`is_core_file`; by default a data team's dependency files, CI configuration and
  package entry points), or the path leaves the repository (absolute, ``..``), or the
  operation is ``DELETE``, or the code runs code it builds or reaches past Python's
  namespaces (see :func:`dynamic_code_findings`), or it does not parse as Python.
* **low** — nothing to change (empty code, not a delete), or only documentation or
  notebooks: ``.md``, ``.rst``, ``.txt``, ``.ipynb`` files or anything under ``docs/``.
* **medium** — every other code change.

The code check reads the syntax tree, not the text: ``(eval)(p)``, ``eval #\n(p)``,
``e = eval; e(p)`` and ``getattr(__builtins__, "ev" + "al")(p)`` are all found, because
every *reference* to a dangerous name counts, not only a call spelt a certain way.
"""

from __future__ import annotations

import ast
import hashlib
import posixpath
import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, Literal

import msgspec

from swarm_notebook.errors import ModificationRejected

Risk = Literal["high", "medium", "low"]
Operation = Literal["CREATE", "MODIFY", "DELETE"]

DEFAULT_CORE_FILES: tuple[str, ...] = (
    # dependency files: a change here runs someone's code at the next install
    "pyproject.toml",
    "requirements*.txt",
    "setup.py",
    "setup.cfg",
    "environment.yml",
    "environment.yaml",
    "Pipfile",
    "Pipfile.lock",
    "poetry.lock",
    "uv.lock",
    # CI configuration: runs with the repository's secrets
    ".github/workflows/**",
    ".gitlab-ci.yml",
    # package entry points and test set-up: run on every import / test run
    "**/__init__.py",
    "**/__main__.py",
    "conftest.py",
)
"""Glob patterns of paths whose change is high risk, unless a room sets its own
(``ConsensusConfig.core_files``)."""
DOC_SUFFIXES = (".md", ".rst", ".txt", ".ipynb")
MAX_PATH_LENGTH = 1024
MAX_CODE_BYTES = 1024 * 1024
MAX_REASON_LENGTH = 2000
MODIFICATION_DOMAIN = "swarm-notebook/modification/v1"

# Names whose mere reference lets code run text as code or reach every global.
_DANGEROUS_NAMES = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "__import__",
        "globals",
        "locals",
        "vars",
        "__builtins__",
        "breakpoint",
        "getattr",  # a bare reference (aliasing); literal-name calls are checked apart
        "setattr",
        "delattr",
    }
)
_ATTR_FUNCS = frozenset({"getattr", "setattr", "delattr", "hasattr"})
# Attributes that open a module's, frame's or class's namespace to arbitrary lookups.
_DANGEROUS_ATTRS = frozenset(
    {
        "__builtins__",
        "__dict__",
        "__globals__",
        "__code__",
        "__closure__",
        "__subclasses__",
        "__bases__",
        "__base__",
        "__mro__",
        "__getattribute__",
        "__import__",
        "__loader__",
        "__spec__",
        "__reduce__",
        "__reduce_ex__",
        "__setattr__",
        "__delattr__",
        "f_globals",
        "f_locals",
        "f_builtins",
        "gi_frame",
        "cr_frame",
        "tb_frame",
    }
)
# Modules whose import alone is high risk: they run processes, load native code, import
# by name or hand out the builtins.
_DANGEROUS_MODULES = frozenset(
    {
        "subprocess",
        "ctypes",
        "_ctypes",
        "cffi",
        "importlib",
        "builtins",
        "pty",
        "runpy",
        "code",
        "codeop",
        "marshal",
        "_posixsubprocess",
        "multiprocessing",
    }
)
_PICKLE_MODULES = frozenset({"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve"})
_PICKLE_LOADS = frozenset({"load", "loads", "Unpickler", "open"})
_OS_MODULES = frozenset({"os", "posix", "nt"})
_OS_EXACT = frozenset({"system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp"})
_OS_PREFIXES = ("exec", "spawn")


class Modification(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A proposed change: ``{file_path, code, operation, reason}``."""

    file_path: str
    code: str = ""
    operation: Operation = "MODIFY"
    reason: str = ""


def parse_modification(modification: Modification | dict[str, Any]) -> Modification:
    """Validate a modification dict (types and limits); raises ``ModificationRejected``."""
    if isinstance(modification, Modification):
        mod = modification
    else:
        try:
            mod = msgspec.convert(modification, Modification)
        except msgspec.ValidationError as exc:
            raise ModificationRejected("wrong-schema", str(exc)[:200]) from exc
    if not mod.file_path or len(mod.file_path) > MAX_PATH_LENGTH:
        raise ModificationRejected("wrong-schema", f"file_path must be 1..{MAX_PATH_LENGTH} chars")
    if len(mod.code.encode()) > MAX_CODE_BYTES:
        raise ModificationRejected("oversized", f"code is larger than {MAX_CODE_BYTES} bytes")
    if len(mod.reason) > MAX_REASON_LENGTH:
        raise ModificationRejected("oversized", f"reason is longer than {MAX_REASON_LENGTH}")
    return mod


def modification_hash(modification: Modification | dict[str, Any]) -> str:
    """Hex sha256 over the canonical msgpack of (file_path, operation, code)."""
    mod = parse_modification(modification)
    canonical = msgspec.msgpack.encode(
        [MODIFICATION_DOMAIN, mod.file_path, mod.operation, mod.code]
    )
    return hashlib.sha256(canonical).hexdigest()


def _normalise(path: str) -> str:
    return path.replace("\\", "/")


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``**`` spans folders, ``*`` and ``?`` stay inside one, ``[...]`` is a class."""
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in pattern[i + 1 :]:
            j = pattern.index("]", i + 1)
            body = pattern[i + 1 : j].replace("\\", "\\\\")
            out.append(f"[{'^' + body[1:] if body.startswith('!') else body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def leaves_repository(file_path: str) -> bool:
    """True for absolute paths and paths that climb out with ``..``."""
    path = _normalise(file_path)
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return True
    return posixpath.normpath(path).split("/", 1)[0] == ".."


def is_core_file(file_path: str, core_files: Iterable[str] = DEFAULT_CORE_FILES) -> bool:
    """Whether ``file_path`` (relative to the repository) matches a core glob pattern.

    As in ``.gitignore``: a pattern without ``/`` matches the file name in any folder
    (``conftest.py`` matches ``tests/conftest.py``); a pattern with ``/`` matches the whole
    path from the repository root (``.github/workflows/**``). A trailing ``/`` means
    everything under that folder.

    >>> is_core_file("requirements-dev.txt"), is_core_file("pkg/sub/__init__.py")
    (True, True)
    >>> is_core_file("analysis/clean.py")
    False
    """
    path = posixpath.normpath(_normalise(file_path)).lstrip("/")
    name = path.rsplit("/", 1)[-1]
    for core in core_files:
        pattern = _normalise(core).lstrip("/")
        if pattern.endswith("/"):
            pattern += "**"
        if "/" in pattern:
            if _glob_regex(pattern).fullmatch(path):
                return True
        elif _glob_regex(pattern).fullmatch(name):
            return True
    return False


class _DynamicCodeFinder(ast.NodeVisitor):
    """Collects each construct that runs built code or escapes Python's namespaces."""

    def __init__(self) -> None:
        self.findings: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("o" -> "os")
        self._attr_call_funcs: set[int] = set()

    def flag(self, node: ast.AST, what: str) -> None:
        self.findings.append(f"line {getattr(node, 'lineno', '?')}: {what}")

    def dotted(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return f"{base}.{node.attr}" if base is not None else None
        return None

    def check_dotted(self, node: ast.AST, name: str) -> None:
        parts = name.split(".")
        module, last = parts[0], parts[-1]
        if module in _DANGEROUS_MODULES:
            self.flag(node, f"uses {name}")
        elif (
            module in _OS_MODULES
            and len(parts) == 2
            and (last in _OS_EXACT or last.startswith(_OS_PREFIXES))
        ):
            self.flag(node, f"runs a process with {name}")
        elif module in _PICKLE_MODULES and len(parts) == 2 and last in _PICKLE_LOADS:
            self.flag(node, f"unpickles with {name}")
        elif name in ("sys.modules", "sys._getframe"):
            self.flag(node, f"uses {name}")
        elif len(parts) == 2 and module == "builtins":
            self.flag(node, f"uses {name}")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.aliases[(alias.asname or alias.name).split(".")[0]] = (
                alias.name if alias.asname else alias.name.split(".")[0]
            )
            self.check_dotted(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] in _DANGEROUS_MODULES:
            self.flag(node, f"imports from {module}")
        for alias in node.names:
            if alias.name == "*":
                if module.split(".")[0] in _OS_MODULES | _PICKLE_MODULES | {"sys"}:
                    self.flag(node, f"star-imports {module}")
                continue
            full = f"{module}.{alias.name}" if module else alias.name
            self.aliases[alias.asname or alias.name] = full
            self.check_dotted(node, full)
            if alias.name in _DANGEROUS_NAMES:
                self.flag(node, f"imports {alias.name}")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in _ATTR_FUNCS:
            self._attr_call_funcs.add(id(func))
            name = node.args[1] if len(node.args) >= 2 else None
            if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
                self.flag(node, f"{func.id}() with a computed attribute name")
            elif name.value in _DANGEROUS_NAMES | _DANGEROUS_ATTRS or (
                name.value in _OS_EXACT or name.value.startswith(_OS_PREFIXES)
            ):
                self.flag(node, f"{func.id}() of {name.value!r}")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in _DANGEROUS_NAMES and id(node) not in self._attr_call_funcs:
            if node.id not in _ATTR_FUNCS or not isinstance(node.ctx, ast.Store):
                self.flag(node, f"refers to {node.id}")
        origin = self.aliases.get(node.id)
        if origin is not None and origin != node.id and isinstance(node.ctx, ast.Load):
            if origin.rsplit(".", 1)[-1] in _DANGEROUS_NAMES:
                self.flag(node, f"refers to {origin} as {node.id}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr in _DANGEROUS_ATTRS:
            self.flag(node, f"accesses .{node.attr}")
        name = self.dotted(node)
        if name is not None:
            self.check_dotted(node, name)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        key = node.slice
        if isinstance(key, ast.Constant) and key.value in _DANGEROUS_NAMES | _DANGEROUS_ATTRS:
            self.flag(node, f"looks up {key.value!r}")
        self.generic_visit(node)


def _python_findings(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return [f"does not parse as Python: {type(exc).__name__}"]
    finder = _DynamicCodeFinder()
    try:
        finder.visit(tree)
    except RecursionError:
        return ["nests too deeply to check"]
    return finder.findings


def _notebook_findings(text: str) -> list[str]:
    """Code cells of an ``.ipynb``: shell escapes are high, the rest is read as Python."""
    try:
        cells = msgspec.json.decode(text).get("cells", [])
        sources = [
            "".join(c["source"]) if isinstance(c["source"], list) else str(c["source"])
            for c in cells
            if isinstance(c, dict) and c.get("cell_type") == "code"
        ]
    except (msgspec.DecodeError, AttributeError, KeyError, TypeError):
        return ["notebook is not valid JSON"]
    findings: list[str] = []
    for n, source in enumerate(sources, 1):
        python_lines = []
        for line in source.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("!", "%%bash", "%%sh", "%%script", "%sx", "%system")):
                findings.append(f"cell {n}: runs a shell command")
            python_lines.append("" if stripped.startswith(("%", "!")) else line)
        findings += [f"cell {n}: {f}" for f in _python_findings("\n".join(python_lines))]
    return findings


_TEXT_DYNAMIC = re.compile(r"\b(eval|exec|__import__|__builtins__)\b")
_PYTHON_SUFFIXES = (".py", ".pyw", ".pyi")


def dynamic_code_findings(code: str, file_path: str = "change.py") -> list[str]:
    """What in ``code`` makes it high risk, one line each (empty: nothing found).

    Python (``.py``; notebooks cell by cell) is read as a syntax tree: calls or
    references to eval/exec/compile/``__import__``/globals/vars/locals, getattr and
    friends with a computed (or dangerous literal) name, ``__builtins__``/``__dict__`` and
    similar namespace attributes, importlib/subprocess/ctypes/builtins, process starters
    in ``os`` (system, popen, exec*, spawn*), pickle loads, and code that does not parse.
    Other files (JavaScript, YAML, text) are searched for the words eval/exec.

    >>> dynamic_code_findings("(eval)(p)")
    ['line 1: refers to eval']
    """
    if not code.strip():
        return []
    path = _normalise(file_path).lower()
    if path.endswith(".ipynb"):
        return _notebook_findings(code)
    if path.endswith(_PYTHON_SUFFIXES):
        return _python_findings(code)
    return [f"mentions {m.group(1)}" for m in _TEXT_DYNAMIC.finditer(code)][:10]


def uses_dynamic_code(code: str, file_path: str = "change.py") -> bool:
    """True when :func:`dynamic_code_findings` finds anything (high risk)."""
    return bool(dynamic_code_findings(code, file_path))


def is_docs_only(file_path: str) -> bool:
    path = _normalise(file_path)
    return path.lower().endswith(DOC_SUFFIXES) or path.startswith("docs/") or "/docs/" in path


def assess_modification_risk(
    modification: Modification | dict[str, Any],
    core_files: Iterable[str] = DEFAULT_CORE_FILES,
) -> Risk:
    """``"high"``, ``"medium"`` or ``"low"`` by the rules in this module's docstring.

    >>> assess_modification_risk({"file_path": "pyproject.toml", "code": "x = 1"})
    'high'
    >>> assess_modification_risk({"file_path": "analysis/clean.py", "code": "x = 1"})
    'medium'
    >>> assess_modification_risk({"file_path": "README.md", "code": "# hi"})
    'low'
    """
    mod = parse_modification(modification)
    if is_core_file(mod.file_path, core_files) or leaves_repository(mod.file_path):
        return "high"
    if mod.operation == "DELETE":
        return "high"
    if uses_dynamic_code(mod.code, mod.file_path):
        return "high"
    if not mod.code.strip() or is_docs_only(mod.file_path):
        return "low"
    return "medium"
