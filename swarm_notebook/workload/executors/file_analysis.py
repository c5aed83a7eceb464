"""``file-analysis``: length, lines, type, size and hash of a file inside the workspace.

Only paths inside the configured workspace folder are served: absolute paths, ``..``
components, symlinks that resolve outside, and files with more than one hard link (the
other name may be anywhere on the disk: a link planted in the workspace made a file
outside it readable) are refused with ``path-outside-workspace``.

Example::

    executor = FileAnalysisExecutor(Path("~/project").expanduser())
    await executor.run({"path": "data/report.csv"}, ctx)
    # {"success": True, "analysis": {"length": ..., "lines": ..., "type": "csv", ...}}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import msgspec

from swarm_notebook.workload.executors.base import (
    ErrorType,
    TaskContext,
    TaskRefused,
    failure,
    parse_task_data,
)

MAX_PATH_CHARS = 4096


class FileAnalysisData(msgspec.Struct, forbid_unknown_fields=True):
    path: str


class _Refused(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class FileAnalysisExecutor:
    """Executor for ``file-analysis`` confined to one workspace folder."""

    task_type = "file-analysis"

    def __init__(self, workspace: Path, *, max_bytes: int = 50 * 1024 * 1024) -> None:
        self.workspace = Path(workspace).resolve()
        self.max_bytes = max_bytes

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Analyse ``data["path"]`` (relative to the workspace)."""
        task = parse_task_data(data, FileAnalysisData)
        if not task.path or len(task.path) > MAX_PATH_CHARS or "\x00" in task.path:
            raise TaskRefused(ErrorType.BAD_INPUT, "path must be 1-4096 characters without NUL")
        try:
            analysis = await asyncio.to_thread(self._analyse, task.path)
        except _Refused as exc:
            return failure(exc.error_type, exc.message, path=task.path)
        return {"success": True, "path": task.path, "analysis": analysis}

    async def close(self) -> None:
        """Nothing to release."""

    def resolve(self, relative: str) -> Path:
        """The real path of ``relative`` inside the workspace, or ``_Refused``."""
        outside = _Refused(
            ErrorType.PATH_OUTSIDE_WORKSPACE,
            f"{relative!r:.200} is not inside this peer's workspace; send a path relative to it",
        )
        if (
            PurePosixPath(relative).is_absolute()
            or PureWindowsPath(relative).is_absolute()
            or relative.startswith(("\\", "~"))
            or ".." in PurePosixPath(relative.replace("\\", "/")).parts
        ):
            raise outside
        real = (self.workspace / relative).resolve()  # follows every symlink on the way
        if not real.is_relative_to(self.workspace):
            raise outside
        return real

    def _analyse(self, relative: str) -> dict[str, Any]:
        real = self.resolve(relative)
        try:
            # O_NOFOLLOW: the file must not have become a symlink since resolve();
            # O_NONBLOCK: a FIFO must not hang the task.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise _Refused(
                ErrorType.NOT_FOUND, f"no file {relative!r:.200} in the workspace"
            ) from None
        except OSError as exc:
            raise _Refused(
                ErrorType.BAD_INPUT, f"cannot open {relative!r:.200}: {exc.strerror}"
            ) from None
        try:
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise _Refused(ErrorType.BAD_INPUT, f"{relative!r:.200} is not a regular file")
        if info.st_nlink > 1:
            os.close(fd)
            raise _Refused(
                ErrorType.PATH_OUTSIDE_WORKSPACE,
                f"{relative!r:.200} has {info.st_nlink} hard links; another name of it may "
                "be outside the workspace, so it is not read",
            )
        if info.st_size > self.max_bytes:
            os.close(fd)
            raise _Refused(
                ErrorType.TOO_LARGE,
                f"{relative!r:.200} has {info.st_size} bytes; this peer analyses at most "
                f"{self.max_bytes}",
            )
        with os.fdopen(fd, "rb") as handle:
            content = handle.read(self.max_bytes + 1)
        if len(content) > self.max_bytes:
            raise _Refused(
                ErrorType.TOO_LARGE, f"{relative!r:.200} grew past {self.max_bytes} bytes"
            )
        try:
            text = content.decode("utf-8")
            binary = False
        except UnicodeDecodeError:
            text = content.decode("utf-8", errors="replace")
            binary = True
        return {
            "length": len(text),
            "lines": text.count("\n") + 1,  # like len(text.split("\n")): "a\n" has 2
            "type": PurePosixPath(relative).suffix.lstrip("."),
            "size_bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
            "binary": binary,
        }
