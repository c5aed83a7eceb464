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
from swarm_notebook.reasons import Reason

EXT_SHM = 82
MAX_FDS = 64  # memfds in one result (one per large value or output)
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_REF = struct.Struct(">IQ")
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
