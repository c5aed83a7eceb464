"""The ``SWARM_NOTEBOOK_*`` variable names have one home, and the README lists them all."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import swarm_notebook.environment as environment

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"^SWARM_NOTEBOOK_[A-Z_]+$")


def test_only_environment_py_spells_a_variable_name() -> None:
    spelled = []
    for path in sorted((REPO / "swarm_notebook").rglob("*.py")):
        if path.name == "environment.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if NAME.match(node.value):
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value}")
    assert spelled == [], "use swarm_notebook.environment instead"


def test_every_variable_is_documented_in_its_module_and_the_readme() -> None:
    names = {
        v
        for k, v in vars(environment).items()
        if k.isupper() and isinstance(v, str) and v.startswith("SWARM_NOTEBOOK_")
    }
    assert names == set(environment.ALL)
    readme = (REPO / "README.md").read_text()
    doc = environment.__doc__ or ""
    for name in environment.ALL:
        assert f"`{name}`" in readme, name
        assert f"``{name}``" in doc, name
