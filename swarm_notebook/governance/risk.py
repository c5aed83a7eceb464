"""Risk of a proposed code modification (the blueprint's ``assessModificationRisk``).

Rules, first match wins:

* **high** — the target is a core file (``core_files``: the blueprint's ``agent-cycle``,
  ``sentinel-fsm``, ``tool-runner``, ``state-manager``, plus anything under
  ``swarm_notebook/``, i.e. the swarm's own code), or the operation is ``DELETE``, or the
  code calls ``eval(`` / ``exec(`` (whitespace before the parenthesis included).
* **low** — nothing to change (empty code, not a delete), or only documentation or
  notebooks: ``.md``, ``.rst``, ``.txt``, ``.ipynb`` files or anything under ``docs/``.
* **medium** — every other code change.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from typing import Any, Literal

import msgspec

from swarm_notebook.errors import ModificationRejected

Risk = Literal["high", "medium", "low"]
Operation = Literal["CREATE", "MODIFY", "DELETE"]

DEFAULT_CORE_FILES: tuple[str, ...] = (
    "agent-cycle",
    "sentinel-fsm",
    "tool-runner",
    "state-manager",
    "swarm_notebook/",
)
DOC_SUFFIXES = (".md", ".rst", ".txt", ".ipynb")
MAX_PATH_LENGTH = 1024
MAX_CODE_BYTES = 1024 * 1024
MAX_REASON_LENGTH = 2000
MODIFICATION_DOMAIN = "swarm-notebook/modification/v1"
_DYNAMIC_CODE = re.compile(r"\b(eval|exec)\s*\(")





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


def is_core_file(file_path: str, core_files: Iterable[str] = DEFAULT_CORE_FILES) -> bool:
    """Entries ending in ``/`` match a directory anywhere in the path (``a/swarm_notebook/x``
    but not ``my_swarm_notebook/x``); other entries match as substrings, like the blueprint.
    """
    path = _normalise(file_path)
    for core in core_files:
        core = _normalise(core)
        if core.endswith("/"):
            if path.startswith(core) or f"/{core}" in path:
                return True
        elif core in path:
            return True
    return False


def uses_dynamic_code(code: str) -> bool:
    """True when the code calls ``eval(`` or ``exec(``."""
    return _DYNAMIC_CODE.search(code) is not None


def is_docs_only(file_path: str) -> bool:
    path = _normalise(file_path)
    return path.lower().endswith(DOC_SUFFIXES) or path.startswith("docs/") or "/docs/" in path


def assess_modification_risk(
    modification: Modification | dict[str, Any],
    core_files: Iterable[str] = DEFAULT_CORE_FILES,
) -> Risk:
    """``"high"``, ``"medium"`` or ``"low"`` by the rules in this module's docstring.

    >>> assess_modification_risk({"file_path": "src/agent-cycle.js", "code": "x = 1"})
    'high'
    >>> assess_modification_risk({"file_path": "analysis/clean.py", "code": "x = 1"})
    'medium'
    >>> assess_modification_risk({"file_path": "README.md", "code": "# hi"})
    'low'
    """
    mod = parse_modification(modification)
    if is_core_file(mod.file_path, core_files):
        return "high"
    if mod.operation == "DELETE":
        return "high"
    if uses_dynamic_code(mod.code):
        return "high"
    if not mod.code.strip() or is_docs_only(mod.file_path):
        return "low"
    return "medium"
