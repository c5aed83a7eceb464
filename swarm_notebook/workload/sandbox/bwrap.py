"""The bubblewrap command line that isolates one sandbox child, and a check that it can run.

Everything here is pure command building and one probe; the pool spawns the processes.
See docs/sandbox.md for what the sandbox promises and what it does not.

Example::

    problem = bubblewrap_problem()          # None when bwrap works here
    layout = SandboxLayout.for_this_python(tmp_mb=32, shm_mb=32)
    argv = layout.argv(["--fd", "3"])        # bwrap ... python -I -c <bootstrap> --fd 3
"""

from __future__ import annotations

import functools
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ISOLATION_BUBBLEWRAP = "bubblewrap"
ISOLATION_NONE = "none"
# Where the swarm_notebook package appears inside the sandbox: isolated mode (-I) ignores
# PYTHONPATH, so the bootstrap puts this folder on sys.path explicitly.
PACKAGE_MOUNT = "/opt/swarm-notebook"
SCRATCH = "/tmp"
CHILD_ENTRY = "swarm_notebook.workload.sandbox.child"
_SYSTEM_DIRS = ("/usr",)
_SYSTEM_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Only what the dynamic loader and Python's locale/time code read; no passwd, no hosts.
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
_FIX_HINT = (
    "install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora: `dnf install "
    "bubblewrap`) and allow unprivileged user namespaces (`sysctl user.max_user_namespaces` "
    "must be > 0; on Ubuntu 24.04+ also `sysctl kernel.apparmor_restrict_unprivileged_userns=0`"
    " or an AppArmor profile for bwrap), or start the worker with --unsafe-no-isolation to run "
    "other peers' code with your own user rights (see docs/sandbox.md)"
)


def bootstrap_code(package_parent: str = PACKAGE_MOUNT) -> str:
    """The ``-c`` program: the package's folder first on sys.path, then the child's main."""
    return (
        f"import sys; sys.path.insert(0, {package_parent!r}); "
        f"from {CHILD_ENTRY} import main; sys.exit(main())"
    )


def package_dir() -> Path:
    """The swarm_notebook package this process runs (editable, installed or on PYTHONPATH)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class SandboxLayout:
    """What one sandbox sees: read-only Python and system files, private tmpfs, no network."""

    bwrap: str
    python: str
    python_dirs: tuple[str, ...]
    package: str
    tmp_bytes: int
    shm_bytes: int

    @classmethod
    def for_this_python(
        cls, *, tmp_mb: int, shm_mb: int, python: str = sys.executable
    ) -> SandboxLayout:
        bwrap = shutil.which("bwrap") or "/usr/bin/bwrap"
        return cls(
            bwrap=bwrap,
            python=python,
            python_dirs=python_dirs(),
            package=str(package_dir()),
            tmp_bytes=tmp_mb * 1024 * 1024,
            shm_bytes=shm_mb * 1024 * 1024,
        )

    def argv(self, child_args: list[str], env: dict[str, str]) -> list[str]:
        """The full command: bwrap options, then ``python -I -c <bootstrap> child_args``."""
        args = [
            self.bwrap,
            "--unshare-all",  # user, pid, ipc, uts, net, cgroup; no --share-net
            "--unshare-user",  # also when run as root, where -all only *tries* a user ns
            "--die-with-parent",
            "--new-session",  # no TIOCSTI into the owner's terminal
            "--clearenv",
            "--hostname",
            "sandbox",
        ]
        for key, value in sorted(env.items()):
            args += ["--setenv", key, value]
        # The private /tmp comes first: bwrap applies mounts in order, so a Python that lives
        # under /tmp (a virtualenv in a CI clone, say) is bound on top of it, not hidden.
        args += ["--size", str(self.tmp_bytes), "--tmpfs", SCRATCH]
        args += system_binds()
        for path in self.python_dirs:
            args += ["--ro-bind", path, path]
        args += ["--ro-bind", self.package, f"{PACKAGE_MOUNT}/swarm_notebook"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--size", str(self.shm_bytes), "--tmpfs", "/dev/shm"]
        args += ["--chdir", SCRATCH, "--", self.python, "-I", "-c", bootstrap_code()]
        return args + child_args


def system_binds() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        args += ["--ro-bind", path, path]
    for path in _SYSTEM_LINKS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in _ETC_FILES:
        args += ["--ro-bind-try", path, path]
    return args


def python_dirs() -> tuple[str, ...]:
    """Folders of the interpreter, its stdlib and site-packages (not under /usr already)."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths = sysconfig.get_paths()
    candidates.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    candidates.update(site.getsitepackages())
    candidates.add(os.path.dirname(os.path.realpath(sys.executable)))
    kept: list[str] = []
    for path in sorted({os.path.abspath(p) for p in candidates}, key=len):
        if not os.path.isdir(path) or any(path.startswith(d + "/") for d in _SYSTEM_DIRS):
            continue
        if any(path == k or path.startswith(k + "/") for k in kept):
            continue
        kept.append(path)
    return tuple(kept)


@functools.cache
def bubblewrap_problem() -> str | None:
    """Why bubblewrap cannot isolate a child here and how to fix it, or None if it can."""
    if not sys.platform.startswith("linux"):
        return (
            f"the sandbox needs Linux with bubblewrap; this is {sys.platform}. Run workers "
            f"that execute other peers' code on Linux, or {_FIX_HINT.split(', or ', 1)[1]}"
        )
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return f"bubblewrap (`bwrap`) is not installed: {_FIX_HINT}"
    probe = [bwrap, "--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"]
    # --size (bubblewrap 0.6+) is what the real sandbox needs for its tmpfs caps.
    probe += [*system_binds(), "--size", "1048576", "--tmpfs", "/tmp", "--", "/usr/bin/true"]
    try:
        done = subprocess.run(probe, capture_output=True, timeout=20, check=False, env={})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run ({exc}): {_FIX_HINT}"
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[:300] or f"exit {done.returncode}"
        return f"bubblewrap cannot create a sandbox here ({why}): {_FIX_HINT}"
    return None


def bound_under_scratch(paths: tuple[str, ...]) -> list[str]:
    """The read-only binds that sit inside the sandbox's /tmp: the per-task wipe keeps them."""
    return [p for p in paths if p.startswith(SCRATCH + "/")]
