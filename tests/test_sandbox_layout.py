"""The sandbox's mounts when Python itself lives under /tmp (a virtualenv in a CI clone)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from swarm_notebook.workload.sandbox.bwrap import SCRATCH, SandboxLayout, bound_under_scratch
from swarm_notebook.workload.sandbox.child import wipe


def test_the_private_tmp_is_mounted_before_a_python_that_lives_under_it() -> None:
    layout = SandboxLayout.for_this_python(tmp_mb=16, shm_mb=16)
    venv = "/tmp/another-checkout/.venv"
    layout = dataclasses.replace(layout, python_dirs=(*layout.python_dirs, venv))
    argv = layout.argv(["--fd", "3"], {})
    tmpfs = argv.index("--tmpfs")
    assert argv[tmpfs + 1] == SCRATCH
    bind = next(i for i in range(len(argv) - 2) if argv[i] == "--ro-bind" and argv[i + 1] == venv)
    # bwrap applies mounts in order: a tmpfs after the bind would hide the interpreter.
    assert tmpfs < bind
    assert venv in bound_under_scratch(layout.python_dirs)
    assert all(p.startswith(SCRATCH + "/") for p in bound_under_scratch(layout.python_dirs))


def test_the_per_task_wipe_keeps_binds_inside_scratch_and_removes_the_rest(
    tmp_path: Path,
) -> None:
    kept = tmp_path / "ci-clone" / ".venv"
    (kept / "bin").mkdir(parents=True)
    (kept / "bin" / "python").write_text("interpreter")
    (tmp_path / "ci-clone" / "left-by-task.txt").write_text("x")
    (tmp_path / "argparse.py").write_text("planted")
    (tmp_path / "folder" / "deep").mkdir(parents=True)
    wipe([str(tmp_path)], frozenset({str(kept)}))
    assert (kept / "bin" / "python").read_text() == "interpreter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ci-clone"]
    assert [p.name for p in (tmp_path / "ci-clone").iterdir()] == [".venv"]
