"""A large received message reassembled in a memfd, so a sandbox child can map it.

A task's input arrives on a worker as one reassembled message; the sandbox pool used to
write it over the child's socket into a buffer of the child's own, so the frame existed
twice in the worker's process tree. Reassembled in a memfd instead (:class:`SharedFrame`,
a writable shared mapping of it), the pool can hand the child a read-only fd of the very
pages the message arrived in (``workload/sandbox/shm.py``).

Before an fd leaves this process the memfd is sealed (:meth:`SharedFrame.seal`) against
shrinking and growing (a shrink would be a ``SIGBUS`` in every process mapping it) and
against any new write (``F_SEAL_FUTURE_WRITE``: the fd is read-only, but a memfd can be
reopened read-write through ``/proc/self/fd``; this mapping, made before the seal, stays
writable, so values decoded in place here keep working). The child maps it copy-on-write.

Each live frame holds two fds (this one and the mapping's own), so only a peer that runs
a sandbox pool reassembles this way (``ReassemblyLimits.shared_min_bytes``).
"""

from __future__ import annotations

import fcntl
import mmap
import os
import weakref

# Below this a message is reassembled in a bytearray (as small results go inline).
MIN_SHARED_BYTES = 1 << 20
# Python 3.11 lacks the constant; the kernel has it since 5.1.
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
INPUT_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | F_SEAL_FUTURE_WRITE
_NAME = "swarm-frame"


class SharedFrame(mmap.mmap):
    """A writable shared mapping of a memfd of its own, grown as chunks arrive.

    ``fd`` is the memfd (closed when the frame is collected). Until :meth:`finish` the
    mapping may be larger than what was written: a memfd's pages exist only once
    written, so sizing it for the announced chunks costs nothing.
    """

    fd: int

    @classmethod
    def create(cls, capacity: int) -> SharedFrame:
        fd = os.memfd_create(_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, capacity)
            frame = cls(fd, capacity)
        except BaseException:
            os.close(fd)
            raise
        frame.fd = fd
        weakref.finalize(frame, os.close, fd)
        return frame

    def put(self, at: int, data: memoryview) -> None:
        """Write ``data`` at ``at``, growing the memfd when a sender's chunks were larger
        than its first one announced."""
        end = at + data.nbytes
        if end > len(self):
            self.resize(max(end, 2 * len(self)))
        self[at:end] = data

    def finish(self, size: int) -> None:
        """Cut the memfd and the mapping to the ``size`` bytes written."""
        if size != len(self):
            self.resize(size)

    def seal(self) -> bool:
        """Seal against size changes and new writes (idempotent); False if it cannot be."""
        try:
            seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)
            if seals & INPUT_SEALS != INPUT_SEALS:
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, INPUT_SEALS | fcntl.F_SEAL_SEAL)
        except OSError:
            return False  # a kernel without F_SEAL_FUTURE_WRITE: the input is copied
        return True

    def read_only_fd(self) -> int:
        """A new read-only fd of the memfd, for a child (the caller closes it)."""
        return os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
