"""Large sandbox results travel as sealed memfds the pool maps (issue 12 item 4).

The checks on the pool's side are tested on a real socket pair with real memfds (each way
a child could lie), then end to end: a real sandboxed child's honest result is the mapped
memfd, and task code that forges a result with an unsealed memfd gets its child replaced
with the refusal counted.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
import struct

import msgspec
import pytest

from swarm_notebook.bench.data_frames import df50
from swarm_notebook.errors import ProtocolError
from swarm_notebook.protocol.values import decode_value, encode_value
from swarm_notebook.reasons import Reason
from swarm_notebook.workload.executors.base import TaskContext
from swarm_notebook.workload.sandbox.pool import PythonSandboxPool
from swarm_notebook.workload.sandbox.shm import EXT_SHM, SEALS, ResultBuffers, ResultMaps

CTX = TaskContext(task_id="t-1", delegator="peer-a")
REF = struct.Struct(">IQ")


def _memfd(data: bytes, seals: int) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def _send(sock: socket.socket, fds: list[int]) -> None:
    socket.send_fds(sock, [b"x"], fds)
    for fd in fds:
        os.close(fd)


def _maps(sock: socket.socket, budget: int = 1 << 20) -> tuple[ResultMaps, list[str]]:
    refused: list[str] = []
    return ResultMaps(sock, budget, refused.append), refused


def _ref(index: int, length: int) -> memoryview:
    return memoryview(REF.pack(index, length))


def test_a_sealed_memfd_is_mapped_read_only(pair: tuple[socket.socket, socket.socket]) -> None:
    child, parent = pair
    _send(child, [_memfd(b"result bytes", SEALS)])
    maps, refused = _maps(parent)
    view = maps.hook(_ref(0, 12))
    maps.close()
    assert bytes(view) == b"result bytes" and view.readonly and isinstance(view.obj, mmap.mmap)
    assert refused == []


@pytest.mark.parametrize(
    "seals",
    [0, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW],
)
def test_a_memfd_that_could_still_change_is_refused_and_counted(
    pair: tuple[socket.socket, socket.socket], seals: int
) -> None:
    child, parent = pair
    _send(child, [_memfd(b"x" * 4096, seals)])
    maps, refused = _maps(parent)
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(0, 4096))
    maps.close()
    assert caught.value.reason == Reason.SHM_UNSEALED
    assert refused == [Reason.SHM_UNSEALED]


def test_an_fd_that_is_no_memfd_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    child, parent = pair
    read, write = os.pipe()
    _send(child, [read])
    os.close(write)
    maps, refused = _maps(parent)
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(0, 1))
    maps.close()
    assert caught.value.reason == Reason.SHM_UNSEALED and refused == [Reason.SHM_UNSEALED]


def test_a_memfd_past_the_budget_is_refused_before_it_is_mapped(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    child, parent = pair
    # Sparse: 1 GiB declared, nothing written, so the test costs no memory.
    fd = os.memfd_create("big", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 1 << 30)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    _send(child, [fd])
    maps, refused = _maps(parent, budget=64 << 20)
    with pytest.raises(ProtocolError) as caught:
        maps.hook(_ref(0, 1 << 30))
    maps.close()
    assert caught.value.reason == Reason.SHM_OVERSIZED and refused == [Reason.SHM_OVERSIZED]
    assert maps._maps == {}  # nothing was mapped


@pytest.mark.parametrize(
    ("sent", "refs"),
    [
        (0, [(0, 12)]),  # names a memfd, sends none
        (1, [(1, 12)]),  # names one past those sent
        (1, [(0, 12), (0, 12)]),  # the same memfd twice
        (1, [(0, 4096)]),  # a length that is not the memfd's
    ],
)
def test_references_to_memfds_not_sent_or_not_as_sent_are_refused(
    pair: tuple[socket.socket, socket.socket], sent: int, refs: list[tuple[int, int]]
) -> None:
    child, parent = pair
    if sent:
        _send(child, [_memfd(b"result bytes", SEALS) for _ in range(sent)])
    maps, refused = _maps(parent)
    with pytest.raises(ProtocolError) as caught:
        for index, length in refs:
            maps.hook(_ref(index, length))
    maps.close()
    assert caught.value.reason == Reason.SHM_BAD_REFERENCE
    assert refused == [Reason.SHM_BAD_REFERENCE]


def test_the_child_side_seals_what_it_wrote_and_names_it_in_the_result() -> None:
    buffers = ResultBuffers()
    wire = encode_value(df50(200_000), allocator=buffers.allocate)
    response, fds = buffers.pack({"success": True, "value": wire})
    try:
        assert len(fds) == 1
        assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & SEALS == SEALS
        ref = response["value"]["data"]
        assert isinstance(ref, msgspec.msgpack.Ext) and ref.code == EXT_SHM
        assert REF.unpack(ref.data) == (0, os.fstat(fds[0]).st_size)
    finally:
        buffers.close()


def _result_memfds_open() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "memfd:swarm-result" in target:
            out.append(target)
    return out


async def test_a_large_result_is_the_childs_sealed_memfd_mapped_here(
    pool: PythonSandboxPool,
) -> None:
    frame = df50(200_000)  # 6.4 MB
    for _ in range(3):
        result = await pool.run({"code": "df", "inputs": {"df": encode_value(frame)}}, CTX)
        assert result["success"], result
        data = result["value"]["data"]
        assert isinstance(data.obj, mmap.mmap) and data.readonly
        assert decode_value(result["value"]).equals(frame)
        del result, data
    small = await pool.run({"code": "df.iloc[:10]", "inputs": {"df": encode_value(frame)}}, CTX)
    assert isinstance(small["value"]["data"], bytes)  # small results stay inline
    assert decode_value(small["value"]).equals(frame.iloc[:10])
    assert _result_memfds_open() == []  # every received fd was closed (mappings stay)
    stats = pool.stats()
    assert stats["shm_refused"] == 0 and stats["crashes"] == 0


FORGE = """
import fcntl, os, socket, struct, sys
import msgspec
argv = sys.argv
main = socket.socket(fileno=int(argv[argv.index("--fd") + 1]))
fds = socket.socket(fileno=int(argv[argv.index("--fd-sock") + 1]))
fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
os.write(fd, b"x" * 100_000)
if SEALED:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
socket.send_fds(fds, [b"x"], [fd])
data = msgspec.msgpack.Ext(82, struct.pack(">IQ", 0, 100_000))
body = msgspec.msgpack.encode({"success": True, "value": {"__sn__": "df", "data": data}})
main.sendall(struct.pack("!I", len(body)) + body)
os._exit(0)
"""


@pytest.mark.parametrize("sealed", [False, True])
async def test_a_child_that_passes_a_memfd_that_can_change_is_replaced_and_counted(
    pool: PythonSandboxPool, sealed: bool
) -> None:
    # ``sealed``: shrink and grow only; the missing write seal would let it change
    # under the mapping while the worker sends it on.
    forged = await pool.run({"code": f"SEALED = {sealed}\n" + FORGE}, CTX)
    assert not forged["success"]
    assert forged["error_type"] == "worker-crashed", forged
    stats = pool.stats()
    assert stats["shm_refused"] == 1 and stats["shm_refusals"] == {Reason.SHM_UNSEALED: 1}
    honest = await pool.run({"code": "6 * 7"}, CTX)
    assert honest["success"] and decode_value(honest["value"]) == 42  # its replacement


async def test_inputs_decoded_in_place_in_the_child_stay_editable_and_separate(
    pool: PythonSandboxPool,
) -> None:
    frame = df50(200_000)
    code = (
        "a.iloc[0, 0] = -1.0\n"
        "a.loc[a['b'] > 0.5, 'c'] = 0.0\n"
        "(float(a.iloc[0, 0]), float(b.iloc[0, 0]), bool((a.loc[a['b'] > 0.5, 'c'] == 0).all()))"
    )
    inputs = {"a": encode_value(frame), "b": encode_value(frame)}
    result = await pool.run({"code": code, "inputs": inputs}, CTX)
    assert result["success"], result
    assert decode_value(result["value"]) == (-1.0, float(frame.iloc[0, 0]), True)
