"""Large task inputs reach a sandbox child as the memfd they arrived in (issue 12 item 4).

A worker with a sandbox pool reassembles a large message in a memfd; the pool passes the
child a read-only fd of it, sealed against size changes and new writes, and the child
maps it copy-on-write. Tested: the reassembly itself, a real sandboxed child decoding
such an input equal, task code in that child failing at every way to change or shrink
the worker's memfd, and the child's checks of the references on a real socket pair.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from swarm_notebook.bench.data_frames import df50
from swarm_notebook.client import _resolve_config
from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol import oob
from swarm_notebook.protocol.framing import Reassembler, ReassemblyLimits, frame_message
from swarm_notebook.protocol.shared_frame import MIN_SHARED_BYTES, SharedFrame
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import TaskContext, TaskRefused
from swarm_notebook.workload.sandbox import child
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from swarm_notebook.workload.sandbox.shm import EXT_SHM_INPUT, InputMaps

CTX = TaskContext(task_id="t-1", delegator="peer-a")
REF = struct.Struct(">IQQ")
LIMITS = ReassemblyLimits(shared_min_bytes=MIN_SHARED_BYTES)


def _reassembled(message: Any) -> bytes | bytearray | SharedFrame:
    """``message`` sent through chunk framing and reassembled as a worker's mesh does."""
    parts = oob.encode(message, msgspec.msgpack.Encoder())
    reassembler = Reassembler(LIMITS)
    out = None
    for frame in frame_message(parts, transfer_id=7):
        out = reassembler.feed(frame, 0.0)
    assert out is not None and reassembler.pending_bytes == 0
    return out


def _arrived(task: dict[str, Any]) -> tuple[dict[str, Any], SharedFrame]:
    """``task`` as the pool gets it from a worker's mesh: binaries are views of a memfd."""
    frame = _reassembled(task)
    assert isinstance(frame, SharedFrame)
    data = oob.decode(memoryview(frame), oob.plain_decoder(), owned=True)
    return data, frame


def test_a_large_message_is_reassembled_in_a_memfd_of_its_exact_size() -> None:
    blob = os.urandom(3 * MIN_SHARED_BYTES + 123)
    frame = _reassembled({"blob": memoryview(blob)})
    assert isinstance(frame, SharedFrame)
    assert os.fstat(frame.fd).st_size == len(frame)
    data = oob.decode(memoryview(frame), oob.plain_decoder(), owned=True)
    assert bytes(data["blob"]) == blob and data["blob"].obj is frame
    small = _reassembled({"blob": memoryview(blob[: MIN_SHARED_BYTES // 4])})
    assert isinstance(small, bytearray)  # below the threshold: as before


def test_without_the_setting_nothing_is_reassembled_in_a_memfd() -> None:
    blob = memoryview(os.urandom(2 * MIN_SHARED_BYTES))
    parts = oob.encode({"blob": blob}, msgspec.msgpack.Encoder())
    reassembler = Reassembler(ReassemblyLimits())
    out = None
    for frame in frame_message(parts, transfer_id=1):
        out = reassembler.feed(frame, 0.0)
    assert isinstance(out, bytearray)


MAPPED = (
    "mapped = [line.split()[1] for line in open('/proc/self/maps') if 'swarm-frame' in line]\n"
    "df"
)


async def test_a_large_input_reaches_the_child_as_a_memfd_and_decodes_equal(
    pool: PythonSandboxPool,
) -> None:
    frame = df50(200_000)  # 6.4 MB
    data, shared = _arrived(
        {"code": MAPPED, "inputs": {"df": encode_value(frame)}, "outputs": ["mapped"]}
    )
    result = await pool.run(data, CTX)
    assert result["success"], result
    assert decode_value(result["value"]).equals(frame)
    # The child mapped the worker's memfd privately (copy-on-write): "rw-p".
    assert decode_value(result["outputs"]["mapped"]) == ["rw-p"]
    assert pool.stats()["shm_inputs"] == 1
    # An input that did not arrive in a memfd is written over the socket as before.
    plain = await pool.run({"code": MAPPED, "inputs": {"df": encode_value(frame)},
                            "outputs": ["mapped"]}, CTX)  # fmt: skip
    assert plain["success"] and decode_value(plain["outputs"]["mapped"]) == []
    assert decode_value(plain["value"]).equals(frame)
    assert pool.stats()["shm_inputs"] == 1
    del shared


ATTACK = r"""
import ctypes, fcntl, mmap, os
tried = {}
def attempt(name, fn):
    try:
        fn()
        tried[name] = "changed"
    except OSError as exc:
        tried[name] = exc.errno
libc = ctypes.CDLL(None, use_errno=True)
def punch(fd):
    # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")
def shared_write(fd):
    m = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:4] = b"evil"
frames = []
for name in os.listdir("/proc/self/fd"):
    try:
        if "swarm-frame" in os.readlink(f"/proc/self/fd/{name}"):
            frames.append(int(name))
    except OSError:
        pass
for fd in frames:
    attempt("write", lambda: os.pwrite(fd, b"evil", 0))
    attempt("shrink", lambda: os.ftruncate(fd, 1))
    attempt("grow", lambda: os.ftruncate(fd, 1 << 30))
    rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    attempt("reopened write", lambda: os.pwrite(rw, b"evil", 0))
    attempt("reopened shrink", lambda: os.ftruncate(rw, 1))
    attempt("reopened grow", lambda: os.ftruncate(rw, 1 << 30))
    attempt("reopened shared mapping", lambda: shared_write(rw))
    attempt("punch hole", lambda: punch(rw))
    attempt("seal", lambda: fcntl.fcntl(rw, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE))
# Writes into the input decoded in place are the child's own pages (copy-on-write).
df.iloc[:, 0] = -1.0
(len(frames), tried, float(df.iloc[0, 0]))
"""


async def test_task_code_cannot_change_or_shrink_the_workers_memfd(
    pool: PythonSandboxPool,
) -> None:
    frame = df50(200_000)
    data, shared = _arrived({"code": ATTACK, "inputs": {"df": encode_value(frame)}})
    before, size = bytes(shared), os.fstat(shared.fd).st_size
    result = await pool.run(data, CTX)
    assert result["success"], result
    found, tried, edited = decode_value(result["value"])
    assert found >= 1 and edited == -1.0  # the attacks ran against the worker's memfd
    assert "changed" not in tried.values(), tried
    assert bytes(shared) == before and os.fstat(shared.fd).st_size == size
    again = decode_value(oob.decode(memoryview(shared), oob.plain_decoder())["inputs"]["df"])
    assert again.equals(frame)


async def test_an_input_that_names_shared_memory_itself_is_refused(
    pool: PythonSandboxPool,
) -> None:
    forged = msgspec.msgpack.Ext(EXT_SHM_INPUT, REF.pack(0, 0, 16))
    with pytest.raises(TaskRefused) as caught:
        await pool.run({"code": "x", "inputs": {"x": {"data": forged}}}, CTX)
    assert "shared memory" in str(caught.value)


# -- the child's checks ---------------------------------------------------------------


def _send_memfd(sock: socket.socket, size: int) -> None:
    fd = os.memfd_create("input", 0)
    os.ftruncate(fd, size)  # sparse: the test costs no memory
    socket.send_fds(sock, [b"x"], [fd])
    os.close(fd)


def _ref(index: int, offset: int, length: int) -> memoryview:
    return memoryview(REF.pack(index, offset, length))


def test_references_inside_a_sent_memfd_are_copy_on_write_views(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pool_side, child_side = pair
    _send_memfd(pool_side, 8192)
    maps = InputMaps(child_side, 1 << 20)
    first = maps.hook(_ref(0, 0, 4096))
    overlapping = maps.hook(_ref(0, 2048, 4096))
    maps.close()
    assert not first.readonly and overlapping.readonly
    first[0:4] = b"mine"  # private to this process
    assert bytes(overlapping[:4]) == bytes(4)


@pytest.mark.parametrize(
    ("sent", "ref", "limit", "reason"),
    [
        (None, (0, 0, 16), 1 << 20, Reason.SHM_BAD_REFERENCE),  # names a memfd, none sent
        (4096, (1, 0, 16), 1 << 20, Reason.SHM_BAD_REFERENCE),  # one past those sent
        (4096, (0, 4000, 200), 1 << 20, Reason.SHM_BAD_REFERENCE),  # past its end
        (4096, (0, 2**63, 2**63), 1 << 20, Reason.SHM_BAD_REFERENCE),  # wraps nothing
        (1 << 30, (0, 0, 16), 64 << 20, Reason.SHM_OVERSIZED),  # a memfd past the limit
        (0, (0, 0, 0), 1 << 20, Reason.SHM_BAD_REFERENCE),  # empty
    ],
)
def test_bad_input_references_are_refused_with_their_reason(
    pair: tuple[socket.socket, socket.socket],
    sent: int | None,
    ref: tuple[int, int, int],
    limit: int,
    reason: Reason,
) -> None:
    pool_side, child_side = pair
    if sent is not None:
        _send_memfd(pool_side, sent)
    maps = InputMaps(child_side, limit)
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(*ref))
    maps.close()
    assert caught.value.reason == reason


def test_references_adding_up_past_the_limit_are_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pool_side, child_side = pair
    _send_memfd(pool_side, 8192)
    maps = InputMaps(child_side, 8192)
    maps.hook(_ref(0, 0, 8192))
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(0, 0, 8192))  # the same range again: 16 KiB referenced
    maps.close()
    assert caught.value.reason == Reason.SHM_OVERSIZED


def test_an_fd_that_cannot_be_mapped_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    pool_side, child_side = pair
    read, write = os.pipe()
    socket.send_fds(pool_side, [b"x"], [read])
    os.close(read)
    os.close(write)
    maps = InputMaps(child_side, 1 << 20)
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(0, 0, 1))
    maps.close()
    assert caught.value.reason == Reason.SHM_BAD_REFERENCE


def test_the_child_answers_a_bad_reference_with_its_reason_and_ends() -> None:
    main_pool, main_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fds_pool, fds_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    served = threading.Thread(
        target=child.serve, args=(main_child, 1 << 20), kwargs={"fd_sock": fds_child}
    )
    served.start()
    try:
        reader = main_pool.makefile("rb")

        def frame() -> Any:
            (size,) = child.FRAME_HEADER.unpack(reader.read(child.FRAME_HEADER.size))
            return msgspec.msgpack.decode(reader.read(size))

        assert frame()["ready"]
        forged = msgspec.msgpack.Ext(EXT_SHM_INPUT, REF.pack(0, 0, 16))
        body = msgspec.msgpack.encode({"code": "x", "inputs": {"x": {"data": forged}}})
        main_pool.sendall(child.FRAME_HEADER.pack(len(body)) + body)
        answer = frame()
        served.join(10.0)
        assert not served.is_alive()  # the child ends instead of serving on
        assert answer["error_type"] == "bad-input" and answer["recycle"]
        assert str(Reason.SHM_BAD_REFERENCE) in answer["error"]
    finally:
        for s in (main_pool, main_child, fds_pool, fds_child):
            s.close()


@pytest.mark.parametrize("runs_code", [True, False])
def test_only_a_peer_that_runs_a_sandbox_pool_reassembles_in_memfds(
    tmp_path: Path, runs_code: bool
) -> None:
    # Each live memfd frame holds two fds: a notebook keeping many results must not.
    cfg, _ = _resolve_config(
        "room", "ws://127.0.0.1:1/ws", None, None, tmp_path, runs_code,
        None, None, None, None, None, None,
    )  # fmt: skip
    expected = MIN_SHARED_BYTES if runs_code else None
    assert cfg.mesh.reassembly.shared_min_bytes == expected
