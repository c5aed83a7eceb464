"""Live output of running tasks: batched on the serving side, kept bounded on the asking side.

The serving peer's :class:`OutputRelay` takes what the sandbox reports (without ever
making the task wait), and sends it as ``task-output`` messages, at most one per
``interval_s`` and at most ``max_bytes`` per task; what goes past the cap is counted and
said once, as ``[output truncated: N bytes]``. The delegating peer's :class:`OutputLog`
keeps each task's output in order, bounded too, and tells whoever watches the task.

Example::

    relay = OutputRelay(send, interval_s=0.1, max_bytes=2_000_000)
    relay.push([("stdout", "epoch 1\\n")])   # returns at once
    await relay.close()                       # the rest is sent before the result
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from swarm_notebook.workload.messages import (
    MAX_OUTPUT_MESSAGE_CHARS,
    MAX_OUTPUT_MESSAGE_CHUNKS,
    OutputChunk,
    TaskOutput,
)

log = logging.getLogger(__name__)

Chunks = list[tuple[str, str]]
SendOutput = Callable[[TaskOutput], Awaitable[object]]
OutputWatcher = Callable[[str, str], None]

DEFAULT_INTERVAL_S = 0.1
DEFAULT_MAX_BYTES = 2_000_000  # per task: both streams of the sandbox's 1 MB each
DEFAULT_CLOSE_TIMEOUT_S = 10.0


def truncation_note(dropped: int) -> str:
    """The one line that says output was cut.

    >>> truncation_note(12)
    '\\n[output truncated: 12 bytes]\\n'
    """
    return f"\n[output truncated: {dropped} bytes]\n"


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _clip(text: str, room: int) -> str:
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= room else data[:room].decode("utf-8", "ignore")


class OutputRelay:
    """One task's output on its way back to the delegator (serving side)."""

    def __init__(
        self,
        send: SendOutput,
        task_id: str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        max_bytes: int = DEFAULT_MAX_BYTES,
        close_timeout_s: float = DEFAULT_CLOSE_TIMEOUT_S,
    ) -> None:
        self._send = send
        self.task_id = task_id
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.close_timeout_s = close_timeout_s
        self._pending: Chunks = []
        self._accepted = 0
        self.dropped = 0
        self._dropped_stream = "stdout"
        self._seq = 0
        self.messages_sent = 0
        self.send_failures = 0
        self._wake = asyncio.Event()
        self._close_requested = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None

    def push(self, chunks: Chunks) -> None:
        """Take output (never blocks, never raises); the flusher sends it soon."""
        for stream, text in chunks:
            if not text:
                continue
            room = self.max_bytes - self._accepted
            kept = _clip(text, max(room, 0))
            if kept != text:
                if not self.dropped:
                    self._dropped_stream = stream
                self.dropped += _size(text) - _size(kept)
            if not kept:
                continue
            self._accepted += _size(kept)
            if self._pending and self._pending[-1][0] == stream:
                self._pending[-1] = (stream, self._pending[-1][1] + kept)
            else:
                self._pending.append((stream, kept))
        if self._pending and not self._closing:
            if self._flusher is None:
                self._flusher = asyncio.get_running_loop().create_task(
                    self._flush_forever(), name=f"task-output-{self.task_id[:8]}"
                )
            self._wake.set()

    async def _flush_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._send_pending()
            if self._closing:
                if not self._pending:
                    return
                self._wake.set()
                continue
            # The throttle: a task printing in a tight loop costs one message per interval
            # (cut short by close(), which must not wait out the interval).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._close_requested.wait(), self.interval_s)

    async def _send_pending(self) -> None:
        while self._pending:
            message, self._pending = self._take_message(self._pending)
            try:
                await self._send(message)
                self.messages_sent += 1
            except Exception as exc:  # the link went away: nobody is left to read it
                self.send_failures += 1
                self._pending.clear()
                log.debug("task output for %s not delivered: %s", self.task_id[:8], exc)
                return

    def _take_message(self, pending: Chunks) -> tuple[TaskOutput, Chunks]:
        """One message's worth of chunks (bounded in text and count), and the rest."""
        chunks: list[OutputChunk] = []
        room = MAX_OUTPUT_MESSAGE_CHARS
        rest = list(pending)
        while rest and room > 0 and len(chunks) < MAX_OUTPUT_MESSAGE_CHUNKS:
            stream, text = rest.pop(0)
            head, tail = text[:room], text[room:]
            chunks.append(OutputChunk(stream, head))  # type: ignore[arg-type]
            room -= len(head)
            if tail:
                rest.insert(0, (stream, tail))
        message = TaskOutput(task_id=self.task_id, seq=self._seq, chunks=chunks)
        self._seq += 1
        return message, rest

    async def close(self) -> None:
        """Send what is left (and the truncation note), then stop; bounded in time.

        The flusher finishes its own sends rather than being cancelled mid-send, so no
        batch is lost and the sequence has no gap.
        """
        self._closing = True
        if self.dropped:
            self._pending.append((self._dropped_stream, truncation_note(self.dropped)))
        if self._flusher is None:
            if self._pending:
                self._flusher = asyncio.get_running_loop().create_task(self._flush_forever())
            else:
                return
        self._close_requested.set()
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._flusher), self.close_timeout_s)
        except asyncio.CancelledError:
            self.abort()
            raise
        except TimeoutError:
            self.send_failures += 1
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher

    def abort(self) -> None:
        """Stop at once (the task was canceled): what is pending is not sent."""
        self._closing = True
        self._pending.clear()
        if self._flusher is not None:
            self._flusher.cancel()


@dataclass
class TaskOutputText:
    """What one task printed so far, in order (delegating side)."""

    peer: str | None = None
    next_seq: int = 0
    chunks: Chunks = field(default_factory=list)
    size: int = 0
    dropped: int = 0
    watchers: list[OutputWatcher] = field(default_factory=list)

    def text(self, stream: str) -> str:
        return "".join(t for s, t in self.chunks if s == stream)


class OutputLog:
    """The output of the most recent tasks, each bounded; old ones fall off."""

    def __init__(self, max_bytes_per_task: int = DEFAULT_MAX_BYTES, max_tasks: int = 256) -> None:
        self.max_bytes_per_task = max_bytes_per_task
        self.max_tasks = max_tasks
        self._tasks: OrderedDict[str, TaskOutputText] = OrderedDict()

    def _entry(self, task_id: str) -> TaskOutputText:
        entry = self._tasks.get(task_id)
        if entry is None:
            entry = self._tasks[task_id] = TaskOutputText()
            while len(self._tasks) > self.max_tasks:
                self._tasks.popitem(last=False)
        return entry

    def watch(self, task_id: str, watcher: OutputWatcher) -> Callable[[], None]:
        """Call ``watcher(stream, text)`` for each new piece of ``task_id``'s output."""
        entry = self._entry(task_id)
        entry.watchers.append(watcher)

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                entry.watchers.remove(watcher)

        return unwatch

    def accept(self, task_id: str, peer: str, message: TaskOutput) -> str | None:
        """Add one message from ``peer``; returns why it was refused, or None.

        Batches count from 0 per attempt: a new peer (a retry) starts a new sequence.
        """
        entry = self._entry(task_id)
        if entry.peer != peer:
            entry.peer, entry.next_seq = peer, 0
        if message.seq != entry.next_seq:
            return f"batch {message.seq} where {entry.next_seq} was next"
        entry.next_seq += 1
        for chunk in message.chunks:
            room = self.max_bytes_per_task - entry.size
            kept = _clip(chunk.text, max(room, 0))
            entry.dropped += _size(chunk.text) - _size(kept)
            if not kept:
                continue
            entry.size += _size(kept)
            if entry.chunks and entry.chunks[-1][0] == chunk.stream:
                entry.chunks[-1] = (chunk.stream, entry.chunks[-1][1] + kept)
            else:
                entry.chunks.append((chunk.stream, kept))
            for watcher in list(entry.watchers):
                try:
                    watcher(chunk.stream, kept)
                except Exception:
                    log.exception("output watcher of task %s failed", task_id[:8])
        return None

    def get(self, task_id: str) -> TaskOutputText | None:
        return self._tasks.get(task_id)

    def forget_watchers(self, task_id: str) -> None:
        entry = self._tasks.get(task_id)
        if entry is not None:
            entry.watchers.clear()
