"""``git-operation``: read-only git queries (log, status, diff, show) with dulwich.

Write operations (commit, push, reset, ...) are refused: a peer's repository changes
only by its owner's hand. Every output is bounded.

Example::

    executor = GitOperationExecutor(Path("~/project").expanduser())
    await executor.run({"op": "log", "max_count": 5}, ctx)
    # {"success": True, "op": "log", "commits": [{"id": ..., "message": ...}, ...]}
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
from pathlib import Path
from typing import Any

import msgspec
from dulwich.errors import NotGitRepository
from dulwich.objects import Commit, ObjectID
from dulwich.objectspec import parse_commit
from dulwich.patch import write_tree_diff
from dulwich.porcelain import status as porcelain_status
from dulwich.repo import Repo

from swarm_notebook.workload.executors.base import (
    ErrorType,
    TaskContext,
    TaskRefused,
    failure,
    parse_task_data,
)

READ_OPS = ("log", "status", "diff", "show")
WRITE_OPS = frozenset(
    {
        "add", "branch", "checkout", "cherry-pick", "clean", "clone", "commit", "fetch",
        "init", "merge", "mv", "pull", "push", "rebase", "reset", "restore", "revert",
        "rm", "stash", "switch", "tag", "update-ref", "write",
    }
)  # fmt: skip
MAX_LOG_COUNT = 500
MAX_MESSAGE_CHARS = 4_000
MAX_PATHS = 2_000
_COMMITTISH = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/~^@{}-]{0,199}$")


class LogOp(msgspec.Struct, tag="log", tag_field="op", forbid_unknown_fields=True):
    max_count: int = 20
    ref: str = "HEAD"


class StatusOp(msgspec.Struct, tag="status", tag_field="op", forbid_unknown_fields=True):
    pass


class DiffOp(msgspec.Struct, tag="diff", tag_field="op", forbid_unknown_fields=True):
    """Diff from ``base`` (default: the first parent of ``target``) to ``target``."""

    target: str = "HEAD"
    base: str | None = None


class ShowOp(msgspec.Struct, tag="show", tag_field="op", forbid_unknown_fields=True):
    commit: str = "HEAD"


GitOp = LogOp | StatusOp | DiffOp | ShowOp


class _OutputFull(Exception):
    pass


class _BoundedBytes(io.BytesIO):
    """Collects at most ``limit`` bytes, then stops the writer."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.truncated = False

    def write(self, data: Any) -> int:
        room = self.limit - self.tell()
        if len(data) > room:
            super().write(bytes(data[: max(room, 0)]))
            self.truncated = True
            raise _OutputFull
        return super().write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)


class _GitFailure(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


class GitOperationExecutor:
    """Executor for ``git-operation`` on one repository (read-only)."""

    task_type = "git-operation"

    def __init__(
        self, repo_path: Path, allow_write: bool = False, *, max_output_bytes: int = 1_000_000
    ) -> None:
        self.repo_path = Path(repo_path)
        # Write ops are not implemented; the flag exists so the refusal can say so plainly.
        self.allow_write = allow_write
        self.max_output_bytes = max_output_bytes

    async def run(self, data: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run one read-only git query; see the module docstring."""
        op_name = data.get("op") if isinstance(data, dict) else None
        if isinstance(op_name, str) and op_name in WRITE_OPS:
            reason = (
                "write operations are not implemented on this peer"
                if self.allow_write
                else "this peer serves git read-only"
            )
            return failure(
                ErrorType.WRITE_REFUSED,
                f"git {op_name!r} refused: {reason}; allowed: {', '.join(READ_OPS)}",
            )
        if op_name not in READ_OPS:
            raise TaskRefused(
                ErrorType.BAD_INPUT,
                f"unknown git op {op_name!r:.40}; allowed: {', '.join(READ_OPS)}",
            )
        op: GitOp = parse_task_data(data, GitOp)  # type: ignore[arg-type]
        for ref in _refs_of(op):
            if not _COMMITTISH.match(ref):
                raise TaskRefused(ErrorType.BAD_INPUT, f"{ref!r:.60} is not a commit or ref name")
        if isinstance(op, LogOp) and not 1 <= op.max_count <= MAX_LOG_COUNT:
            raise TaskRefused(ErrorType.BAD_INPUT, f"max_count must be 1-{MAX_LOG_COUNT}")
        try:
            result = await asyncio.to_thread(self._run_sync, op)
        except _GitFailure as exc:
            return failure(exc.error_type, exc.message, op=op_name)
        return {"success": True, "op": op_name, **result}

    async def close(self) -> None:
        """Nothing to release: each call opens and closes the repository."""

    def _run_sync(self, op: GitOp) -> dict[str, Any]:
        try:
            repo = Repo(str(self.repo_path))
        except (NotGitRepository, FileNotFoundError) as exc:
            raise _GitFailure(ErrorType.GIT_ERROR, f"no git repository here: {exc}") from exc
        try:
            if isinstance(op, LogOp):
                return self._log(repo, op)
            if isinstance(op, StatusOp):
                return self._status(repo)
            if isinstance(op, DiffOp):
                return self._diff(repo, op)
            return self._show(repo, op)
        finally:
            repo.close()

    def _log(self, repo: Repo, op: LogOp) -> dict[str, Any]:
        head = _commit(repo, op.ref)
        walker = repo.get_walker(include=[head.id], max_entries=op.max_count)
        return {"commits": [_describe(entry.commit) for entry in walker]}

    def _status(self, repo: Repo) -> dict[str, Any]:
        # optional_locks=False: never refresh (write) the index while answering a peer.
        st = porcelain_status(repo, optional_locks=False)
        staged = {kind: _paths(paths) for kind, paths in st.staged.items()}
        unstaged = _paths(st.unstaged)
        untracked = _paths(st.untracked)
        total = sum(len(v) for v in st.staged.values()) + len(st.unstaged) + len(st.untracked)
        return {
            "staged": staged,
            "unstaged": unstaged,
            "untracked": untracked,
            "truncated": total
            > sum(len(v) for v in staged.values()) + len(unstaged) + len(untracked),
        }

    def _diff(self, repo: Repo, op: DiffOp) -> dict[str, Any]:
        target = _commit(repo, op.target)
        if op.base is not None:
            base_tree: ObjectID | None = _commit(repo, op.base).tree
        else:
            base_tree = repo[target.parents[0]].tree if target.parents else None  # type: ignore[attr-defined]
        patch, truncated = self._patch(repo, base_tree, target.tree)
        return {
            "base": op.base,
            "target": target.id.decode(),
            "patch": patch,
            "truncated": truncated,
        }

    def _show(self, repo: Repo, op: ShowOp) -> dict[str, Any]:
        commit = _commit(repo, op.commit)
        parent_tree = repo[commit.parents[0]].tree if commit.parents else None  # type: ignore[attr-defined]
        patch, truncated = self._patch(repo, parent_tree, commit.tree)
        return {"commit": _describe(commit), "patch": patch, "truncated": truncated}

    def _patch(self, repo: Repo, old: ObjectID | None, new: ObjectID) -> tuple[str, bool]:
        out = _BoundedBytes(self.max_output_bytes)
        try:
            write_tree_diff(out, repo.object_store, old, new)
        except _OutputFull:
            pass
        text = out.getvalue().decode("utf-8", errors="replace")
        if out.truncated:
            text += f"\n[diff truncated at {self.max_output_bytes} bytes]\n"
        return text, out.truncated


def _refs_of(op: GitOp) -> list[str]:
    if isinstance(op, LogOp):
        return [op.ref]
    if isinstance(op, DiffOp):
        return [op.target] + ([op.base] if op.base is not None else [])
    if isinstance(op, ShowOp):
        return [op.commit]
    return []


def _commit(repo: Repo, committish: str) -> Commit:
    try:
        return parse_commit(repo, committish)
    except (KeyError, ValueError) as exc:
        raise _GitFailure(
            ErrorType.NOT_FOUND, f"no commit {committish!r:.60} in this repository"
        ) from exc


def _describe(commit: Commit) -> dict[str, Any]:
    tz = dt.timezone(dt.timedelta(seconds=commit.commit_timezone))
    message = commit.message.decode("utf-8", errors="replace")
    return {
        "id": commit.id.decode(),
        "parents": [p.decode() for p in commit.parents],
        "author": commit.author.decode("utf-8", errors="replace"),
        "time": dt.datetime.fromtimestamp(commit.commit_time, tz).isoformat(),
        "message": message[:MAX_MESSAGE_CHARS],
    }


def _paths(paths: Any) -> list[str]:
    out = []
    for p in list(paths)[:MAX_PATHS]:
        out.append(p.decode("utf-8", errors="replace") if isinstance(p, bytes) else str(p))
    return out
