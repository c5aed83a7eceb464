"""What a peer runs (Python and key package versions), and whether it meets a task's needs.

Environment mismatches are among the most common errors of remote execution: a card
carries its peer's report, ``requires={"pandas": ">=2.2"}`` picks only peers that meet it,
and a major.minor difference in numpy or pandas is worth a warning before it bites.

>>> report = {"python": "3.11.9", "pandas": "2.1.4", "numpy": "1.26.4"}
>>> unmet(report, parse_requires({"pandas": ">=2.2"}))
['pandas 2.1.4 (needs >=2.2)']
>>> major_minor_differences({"numpy": "1.26.4"}, {"numpy": "2.1.0"})
['numpy 1.26 here, 2.1 there']
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Iterable, Mapping

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from swarm_notebook.errors import TaskInputError
from swarm_notebook.reasons import Reason

PYTHON = "python"
KEY_PACKAGES = ("numpy", "pandas", "pyarrow", "scikit-learn")
WARN_ON_MAJOR_MINOR = ("numpy", "pandas")
# Import names people type for distributions named otherwise.
ALIASES = {"sklearn": "scikit-learn"}
MAX_REPORTED = 32
MAX_NAME_LENGTH = 64
MAX_VERSION_LENGTH = 64


def package_key(name: str) -> str:
    """The key a report uses for ``name``.

    >>> package_key("Scikit_Learn"), package_key("sklearn"), package_key("Python")
    ('scikit-learn', 'scikit-learn', 'python')
    """
    key = str(canonicalize_name(name.strip()))
    return ALIASES.get(key, key)


def environment_report(extra: Iterable[str] = ()) -> dict[str, str]:
    """This interpreter's version and those of the key packages and ``extra`` ones
    that are installed (read from their metadata: nothing is imported)."""
    report = {PYTHON: platform.python_version()}
    for name in (*KEY_PACKAGES, *extra):
        key = package_key(name)
        if key in report or len(report) >= MAX_REPORTED or len(key) > MAX_NAME_LENGTH:
            continue
        try:
            version = importlib.metadata.version(key)
        except importlib.metadata.PackageNotFoundError:
            continue
        report[key] = version[:MAX_VERSION_LENGTH]
    return report


def report_problem(report: Mapping[str, str]) -> str | None:
    """Why a report from a card is not acceptable, or None."""
    if len(report) > MAX_REPORTED:
        return f"{len(report)} package versions (at most {MAX_REPORTED})"
    for name, version in report.items():
        if not isinstance(name, str) or not isinstance(version, str):
            return "package names and versions must be text"
        if not name or len(name) > MAX_NAME_LENGTH or len(version) > MAX_VERSION_LENGTH:
            return f"package {name[:MAX_NAME_LENGTH]!r} or its version is empty or too long"
    return None


def parse_requires(requires: Mapping[str, str] | None) -> dict[str, SpecifierSet]:
    """``{"pandas": ">=2.2"}`` as specifier sets; ``TaskInputError`` says what is wrong.

    >>> parse_requires({"pandas": "2.2"})
    Traceback (most recent call last):
    ...
    swarm_notebook.errors.TaskInputError: bad-arguments: requires['pandas'] = '2.2' is not \
a version specifier (e.g. '>=2.2' or '==2.2.*')
    """
    if not requires:
        return {}
    if not isinstance(requires, Mapping):
        raise TaskInputError(
            Reason.BAD_ARGUMENTS,
            f'requires must map package names to specifiers, e.g. {{"pandas": ">=2.2"}}, '
            f"got {type(requires).__name__}",
        )
    specs: dict[str, SpecifierSet] = {}
    for name, text in requires.items():
        try:
            specs[package_key(str(name))] = SpecifierSet(str(text))
        except InvalidSpecifier:
            raise TaskInputError(
                Reason.BAD_ARGUMENTS,
                f"requires[{name!r}] = {text!r} is not a version specifier "
                "(e.g. '>=2.2' or '==2.2.*')",
            ) from None
    return specs


def unmet(report: Mapping[str, str], specs: Mapping[str, SpecifierSet]) -> list[str]:
    """The requirements ``report`` does not meet, in words (empty: all met)."""
    missing = []
    for name, spec in specs.items():
        version = report.get(name)
        if version is None:
            missing.append(f"no {name}")
            continue
        try:
            # A pre-release the owner chose to install counts as that version.
            ok = spec.contains(Version(version), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            missing.append(f"{name} {version} (needs {spec})")
    return missing


def _major_minor(version: str) -> tuple[int, int] | None:
    try:
        release = Version(version).release
    except InvalidVersion:
        return None
    return (release[0], release[1] if len(release) > 1 else 0)


def major_minor_differences(here: Mapping[str, str], there: Mapping[str, str]) -> list[str]:
    """numpy / pandas whose major.minor differs between two reports, in words."""
    differences = []
    for name in WARN_ON_MAJOR_MINOR:
        ours, theirs = here.get(name), there.get(name)
        if ours is None or theirs is None:
            continue
        a, b = _major_minor(ours), _major_minor(theirs)
        if a is not None and b is not None and a != b:
            differences.append(f"{name} {a[0]}.{a[1]} here, {b[0]}.{b[1]} there")
    return differences
