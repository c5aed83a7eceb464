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
    {
        Reason.BAD_INPUT,
        Reason.WRONG_SCHEMA,
        Reason.TOO_LARGE,
        Reason.UNKNOWN_TASK_TYPE,
        Reason.REF_FORBIDDEN,  # another peer's ref is refused on every peer
    }
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


# -- resident data (refs) ----------------------------------------------------------------
# The owner puts, pulls (tells a peer to copy a ref from a holder), releases; a holder
# answers gets from the owner, or from a peer showing the ref's token.
REF_PUT = "ref-put"
REF_GET = "ref-get"
REF_PULL = "ref-pull"
REF_RELEASE = "ref-release"
MAX_REF_IDS = 4096
MAX_DTYPE_ENTRIES = 80

RefId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Digest = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Dtypes = Annotated[dict[str, str], msgspec.Meta(max_length=MAX_DTYPE_ENTRIES)]


class RefPut(msgspec.Struct, forbid_unknown_fields=True):
    ref_id: RefId
    digest: Digest
    token: Digest
    payload: bytes
    dtypes: Dtypes = msgspec.field(default_factory=dict)


class RefGet(msgspec.Struct, forbid_unknown_fields=True):
    ref_id: RefId
    owner: str | None = None  # another peer's ref: needs its token
    token: str | None = None


class RefPull(msgspec.Struct, forbid_unknown_fields=True):
    ref_id: RefId
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    digest: Digest
    token: Digest
    dtypes: Dtypes = msgspec.field(default_factory=dict)


class RefRelease(msgspec.Struct, forbid_unknown_fields=True):
    ref_ids: Annotated[list[RefId], msgspec.Meta(max_length=MAX_REF_IDS)]
