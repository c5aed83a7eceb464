"""What delegating and serving peers say to each other, and what each task type needs.

Both sides of delegation import this module and nothing heavier: the message names and
schemas, the capability each task type requires, and which refusals are worth a retry.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from swarm_notebook.errors import UnknownTaskTypeError
from swarm_notebook.reasons import Reason

TASK_EXECUTION = "task-execution"
TASK_STATUS = "task-status"
TASK_OUTPUT = "task-output"

PYTHON_EXECUTION = "python-execution"
FILE_MANAGEMENT = "file-management"
GIT_VFS = "git-vfs"
LOCAL_LLM = "local-llm"
CODE_GENERATION = "code-generation"

REQUIREMENTS: Mapping[str, tuple[str, ...]] = {
    "python-computation": (PYTHON_EXECUTION,),
    "code-generation": (LOCAL_LLM,),
    "file-analysis": (FILE_MANAGEMENT,),
    "git-operation": (GIT_VFS,),
}

# Refusals that pass with time: the task waits for room instead of using up an attempt.
TEMPORARY_REFUSALS = frozenset({Reason.BUSY, Reason.RATE_LIMITED})
# Refusals that would be the same on every peer: retrying elsewhere cannot help.
FINAL_REFUSALS = frozenset(
    {Reason.BAD_INPUT, Reason.WRONG_SCHEMA, Reason.TOO_LARGE, Reason.UNKNOWN_TASK_TYPE}
)


def requirements_for_task_type(task_type: str) -> list[str]:
    """Capabilities a peer needs to run ``task_type``; ``UnknownTaskTypeError`` if none knows it.

    >>> requirements_for_task_type("python-computation")
    ['python-execution']
    """
    try:
        return list(REQUIREMENTS[task_type])
    except KeyError:
        raise UnknownTaskTypeError(
            f"unknown task type {task_type!r:.80}; known types: {', '.join(sorted(REQUIREMENTS))}"
        ) from None


class TaskRequest(msgspec.Struct):
    task_id: str
    type: str
    data: Any
    timeout: float | None = None


class TaskStatus(msgspec.Struct):
    task_id: str
    state: str


MAX_OUTPUT_MESSAGE_CHARS = 256 * 1024  # of text in one task-output message
MAX_OUTPUT_MESSAGE_CHUNKS = 512


class OutputChunk(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    stream: Literal["stdout", "stderr"]
    text: Annotated[str, msgspec.Meta(max_length=MAX_OUTPUT_MESSAGE_CHARS)]


class TaskOutput(msgspec.Struct, forbid_unknown_fields=True):
    """What a running task printed since the last message: ``seq`` counts from 0 per
    attempt, so the delegator can tell a gap or a replay from the next batch."""

    task_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    seq: Annotated[int, msgspec.Meta(ge=0)]
    chunks: Annotated[list[OutputChunk], msgspec.Meta(max_length=MAX_OUTPUT_MESSAGE_CHUNKS)]
