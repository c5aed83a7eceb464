"""The package root is the public surface: ``__all__`` is exactly the documented list.

The list lives in ``swarm_notebook``'s docstring (between ``.. public-names`` and
``.. end-public-names``); adding or dropping a name in one place without the other fails
here, as does a name that does not resolve.
"""

from __future__ import annotations

import subprocess
import sys

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
