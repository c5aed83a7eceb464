"""A sandbox child's large results travel to the pool in sealed memfds, not over its socket.

Read over the socket, a 50 MB result existed twice in the worker's process tree: in the
buffer the child wrote its Arrow stream to and in the one the pool read it into. Here the
child writes each large stream straight into a memfd of its exact size
(:class:`ResultBuffers`, the value codec's allocator), unmaps it, seals it against any
change (``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE``) and passes it over a second
socket with ``SCM_RIGHTS`` (bubblewrap's namespaces share the kernel, so that works from
inside the sandbox). Its place in the result is ``Ext(EXT_SHM, index (u32) | length
(u64))``. The pool (:class:`ResultMaps`) maps each memfd read-only: the result it sends on
is those pages, the child's own.

The child is untrusted: the pool maps nothing it has not checked. A memfd must carry all
three seals (an unsealed one could shrink under the mapping, a SIGBUS in the worker, or
change while being sent), its size must fit what is left of the result budget before it
is mapped, and references must stay inside it. Any failure is a ``ProtocolError`` with
its own reason, which the pool counts and answers by replacing the child.

Large inputs go the other way the same way, without a copy at all: a worker that runs a
pool reassembles large messages in memfds (``protocol/shared_frame.py``), and an input
that is a view of one (:class:`InputFrames`, the pool's side) becomes ``Ext(EXT_SHM_INPUT,
index (u32) | offset (u64) | length (u64))`` with a read-only fd of that memfd, sealed
against size changes and new writes first, passed on the same second socket. The child
(:class:`InputMaps`) maps it copy-on-write: an input decoded in place and then edited by
task code gets private copies of the pages it writes, never the worker's. Only a task's
own inputs go this way (the memfd holds that one message from its delegator); refs held
here are still written over the socket.

Measuring: pages of a memfd mapped by two processes count in both processes' RSS; the
bench sums PSS (``/proc/<pid>/smaps_rollup``) over a process tree for that reason.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

import msgspec

from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol.shared_frame import MIN_SHARED_BYTES, SharedFrame
from swarm_notebook.reasons import Reason

EXT_SHM = 82
EXT_SHM_INPUT = 83
MAX_FDS = 64  # memfds in one result (one per large value or output)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_REF = struct.Struct(">IQ")
_INPUT_REF = struct.Struct(">IQQ")
_NAME = "swarm-result"


class ResultBuffers:
    """The child's side: memfds its results are written into, then sealed and sent.

    ``allocate`` is the value codec's allocator; ``pack`` swaps the views of these
    buffers in a response for references and seals them; ``send`` passes the fds on.
    """

    def __init__(self) -> None:
        self._maps: list[tuple[int, mmap.mmap]] = []

    def allocate(self, size: int) -> mmap.mmap:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            mapped = mmap.mmap(fd, max(size, 1)) if size else mmap.mmap(-1, 1)
        except BaseException:
            os.close(fd)
            raise
        self._maps.append((fd, mapped))
        return mapped

    def pack(self, response: Any) -> tuple[Any, list[int]]:
        """``response`` with views of these buffers replaced by references, and the
        sealed fds in reference order (the caller sends them, then ``close``s)."""
        if not self._maps:
            return response, []
        index = {id(m): i for i, (_, m) in enumerate(self._maps)}
        packed = _swap(response, index)
        fds: list[int] = []
        for fd, mapped in self._maps:
            # No writable mapping may exist when F_SEAL_WRITE is added; the views were
            # released by ``_swap`` (a view still held elsewhere raises BufferError).
            mapped.close()
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
            fds.append(fd)
        return packed, fds

    def close(self) -> None:
        """Close every fd and mapping (the pool holds its own copies of the sent ones)."""
        for fd, mapped in self._maps:
            with contextlib.suppress(BufferError):
                mapped.close()
            with contextlib.suppress(OSError):
                os.close(fd)
        self._maps.clear()


def _swap(x: Any, index: dict[int, int]) -> Any:
    t = type(x)
    if t is dict:
        return {k: _swap(v, index) for k, v in x.items()}
    if t is list:
        return [_swap(v, index) for v in x]
    if t is memoryview:
        i = index.get(id(x.obj))
        if i is not None:
            length = x.nbytes
            x.release()
            return msgspec.msgpack.Ext(EXT_SHM, _REF.pack(i, length))
    return x


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    """Pass ``fds`` as one message on the child's fd socket (before the frame naming them)."""
    if fds:
        socket.send_fds(sock, [bytes((len(fds),))], fds)


def _recv_fds(sock: socket.socket) -> tuple[list[int], int]:
    """The fds of one message waiting on ``sock`` (none waiting: none), and its flags.

    Never waits: the child sent them before the frame that names them. (``socket.recv_fds``
    drops its ``flags`` argument before Python 3.12, so it would block here.)
    """
    fds = array.array("i")
    try:
        _, ancdata, flags, _ = sock.recvmsg(
            1, socket.CMSG_LEN(MAX_FDS * fds.itemsize), socket.MSG_DONTWAIT
        )
    except BlockingIOError:
        return [], 0
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return list(fds), flags


class ResultMaps:
    """The pool's side for one result: the fds a child passed, checked, then mapped.

    ``hook`` is the ``ext_hook`` part for ``EXT_SHM``: the first reference takes the fds
    off the socket (the child sent them before the frame), each is checked and mapped
    once, and a reference gets a read-only view of its mapping. ``close`` closes the fds;
    the mappings live as long as the views of them.
    """

    def __init__(self, sock: socket.socket, max_bytes: int, refused: Callable[[str], None]):
        self._sock = sock
        self._budget = max_bytes
        self._refused = refused
        self._fds: list[int] | None = None
        self._maps: dict[int, mmap.mmap] = {}

    def hook(self, data: memoryview) -> memoryview:
        if len(data) != _REF.size:
            raise self._refuse(Reason.SHM_BAD_REFERENCE, "shared-memory reference of bad size")
        i, length = _REF.unpack(data)
        mapped = self._map(i)
        if length != len(mapped):
            raise self._refuse(
                Reason.SHM_BAD_REFERENCE, f"reference of {length} bytes to {len(mapped)} mapped"
            )
        return memoryview(mapped)

    def _map(self, i: int) -> mmap.mmap:
        if i in self._maps:
            raise self._refuse(Reason.SHM_BAD_REFERENCE, f"memfd {i} referenced twice")
        fds = self._received()
        if i >= len(fds):
            raise self._refuse(Reason.SHM_BAD_REFERENCE, f"memfd {i} of {len(fds)} sent")
        fd = fds[i]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            size = os.fstat(fd).st_size
        except OSError as exc:  # not a memfd (a pipe, a socket, a plain file)
            raise self._refuse(Reason.SHM_UNSEALED, f"fd {i} cannot be sealed: {exc}") from exc
        if seals & SEALS != SEALS:
            raise self._refuse(Reason.SHM_UNSEALED, f"memfd {i} seals {seals:#x}")
        if size > self._budget:
            raise self._refuse(
                Reason.SHM_OVERSIZED, f"memfd {i} of {size} bytes, {self._budget} left"
            )
        self._budget -= size
        if size == 0:
            self._maps[i] = mapped = mmap.mmap(-1, 1)
            return mapped
        # Populated at once: the pages exist already (the child wrote them), and the
        # worker's RSS then shows them from the moment it holds them.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        self._maps[i] = mapped = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
        return mapped

    def _received(self) -> list[int]:
        if self._fds is None:
            fds, flags = _recv_fds(self._sock)
            self._fds = fds
            if flags & socket.MSG_CTRUNC:
                raise self._refuse(Reason.SHM_BAD_REFERENCE, f"more than {MAX_FDS} memfds")
            if not fds:
                raise self._refuse(Reason.SHM_BAD_REFERENCE, "result names memfds, none sent")
        return self._fds

    def _refuse(self, reason: Reason, detail: str) -> ProtocolError:
        self._refused(str(reason))
        return ProtocolError(reason, detail)

    def close(self) -> None:
        for fd in self._fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


class InputFrames:
    """The pool's side for one task: its large inputs that are views of a memfd frame.

    ``swap`` replaces each such view by a reference and keeps its frame (sealed first; a
    frame that cannot be sealed, or one larger than ``max_bytes``, stays inline), ``send``
    passes read-only fds of the frames on, ``close`` lets go of them once the child has
    answered (it maps them before it runs the task).
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._frames: list[SharedFrame] = []
        self.nbytes = 0  # referenced, as the request's size counts it

    def __bool__(self) -> bool:
        return bool(self._frames)

    def swap(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` with views of memfd frames replaced by references.

        Raises ``ProtocolError`` for an input that already carries a shared-memory
        reference: only this pool makes those (a delegator forged it)."""
        return {name: self._swap(value) for name, value in inputs.items()}

    def _swap(self, x: Any) -> Any:
        t = type(x)
        if t is dict:
            return {k: self._swap(v) for k, v in x.items()}
        if t is list:
            return [self._swap(v) for v in x]
        if t is msgspec.msgpack.Ext and x.code in (EXT_SHM, EXT_SHM_INPUT):
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, "an input names shared memory")
        if t is not memoryview or x.nbytes < MIN_SHARED_BYTES or not x.contiguous:
            return x
        frame = x.obj
        if not isinstance(frame, SharedFrame) or len(frame) > self._max_bytes:
            return x
        if not frame.seal():
            return x
        offset = _address(x) - _address(memoryview(frame))
        index = next((i for i, f in enumerate(self._frames) if f is frame), None)
        if index is None:
            index = len(self._frames)
            self._frames.append(frame)
        self.nbytes += x.nbytes
        return msgspec.msgpack.Ext(EXT_SHM_INPUT, _INPUT_REF.pack(index, offset, x.nbytes))

    def send(self, sock: socket.socket) -> None:
        """Pass a read-only fd of each frame (before the frame that names them)."""
        fds: list[int] = []
        try:
            for frame in self._frames:
                fds.append(frame.read_only_fd())
            send_fds(sock, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self) -> None:
        self._frames.clear()


def _address(view: memoryview) -> int:
    """Where ``view``'s bytes start in this process (read-only views too)."""
    import numpy as np  # the pool's process has it loaded already (the value codec)

    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class InputMaps:
    """The child's side for one request: the memfds the pool passed, mapped copy-on-write.

    ``hook`` is the ``ext_hook`` part for ``EXT_SHM_INPUT``: the first reference takes the
    fds off the socket (the pool sent them before the frame), each memfd is mapped once
    (no larger than ``max_bytes``), and a reference gets a writable view of its range, a
    read-only one where it overlaps a range already given (two inputs never alias each
    other's writes). References must stay inside their memfd and add up to at most
    ``max_bytes``. ``close`` closes the fds; the mappings live as long as the views.
    """

    def __init__(self, sock: socket.socket, max_bytes: int) -> None:
        self._sock = sock
        self._budget = max_bytes
        self._max_bytes = max_bytes
        self._fds: list[int] | None = None
        self._maps: dict[int, mmap.mmap] = {}
        self._claimed: dict[int, list[tuple[int, int]]] = {}

    def hook(self, data: memoryview) -> memoryview:
        if len(data) != _INPUT_REF.size:
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, "input reference of bad size")
        i, offset, length = _INPUT_REF.unpack(data)
        mapped = self._map(i)
        end = offset + length
        if end > len(mapped):
            raise ProtocolError(
                Reason.SHM_BAD_REFERENCE,
                f"input reference to {offset}+{length} past memfd {i} of {len(mapped)} bytes",
            )
        if length > self._budget:
            raise ProtocolError(
                Reason.SHM_OVERSIZED, f"inputs of more than {self._max_bytes} bytes in memfds"
            )
        self._budget -= length
        view = memoryview(mapped)[offset:end]
        claimed = self._claimed.setdefault(i, [])
        if any(offset < e and s < end for s, e in claimed):
            return view.toreadonly()
        claimed.append((offset, end))
        return view

    def _map(self, i: int) -> mmap.mmap:
        if i in self._maps:
            return self._maps[i]
        if self._fds is None:
            fds, flags = _recv_fds(self._sock)
            self._fds = fds
            if flags & socket.MSG_CTRUNC:
                raise ProtocolError(Reason.SHM_BAD_REFERENCE, f"more than {MAX_FDS} memfds")
        if i >= len(self._fds):
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, f"memfd {i} of {len(self._fds)} sent")
        fd = self._fds[i]
        try:
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, f"fd {i}: {exc}") from exc
        if size > self._max_bytes:
            raise ProtocolError(
                Reason.SHM_OVERSIZED, f"memfd {i} of {size} bytes, limit {self._max_bytes}"
            )
        if size == 0:
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, f"memfd {i} is empty")
        try:
            # Private: task code may write into an input decoded in place; those writes
            # copy the page for this process and never reach the worker's memfd.
            mapped = mmap.mmap(
                fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except (OSError, ValueError) as exc:  # not mappable: a pipe, a socket
            detail = f"fd {i} cannot be mapped: {exc}"
            raise ProtocolError(Reason.SHM_BAD_REFERENCE, detail) from exc
        self._maps[i] = mapped
        return mapped

    def close(self) -> None:
        for fd in self._fds or ():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
