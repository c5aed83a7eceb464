"""Whether an Arrow IPC stream should travel compressed, decided per table and per link.

aiortc's SCTP moves ~30 MB/s between two processes, while lz4 compresses at hundreds of
MB/s: for a frame of strings, small ints or rounded floats, compressing costs less time
than the bytes it saves. For random float64 it saves nothing and only costs time, so the
choice is made from a sample of the table itself:

* tables under ``min_bytes`` are sent as they are (the sample would cost more than it saves);
* a slice of about ``sample_bytes`` is written once plain and once compressed;
* the codec is kept only if the sample shrank by at least ``min_saving`` *and* the
  estimated transfer time with compression (compress + fewer bytes on the link) beats the
  plain transfer on a link of ``link_bytes_per_s`` (``transport/throughput.py`` measures it).

Arrow compresses each buffer on its own and stores a buffer uncompressed when that is
smaller, and the receiver's decode budget charges the *declared* uncompressed sizes before
anything is inflated (``declared_sizes.py``), so a compressed stream never lets a peer make
us allocate more than it declared.

Example::

    >>> import pyarrow as pa
    >>> table = pa.table({"s": ["same text"] * 200_000})
    >>> choose_codec(table, Compression(link_bytes_per_s=30e6)).codec
    'lz4'
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.ipc as pa_ipc

CODECS = ("lz4", "zstd")
DEFAULT_CODEC = "lz4"  # pyarrow names the LZ4 frame format "lz4"
TIMING_RUNS = 3


@dataclass(frozen=True)
class Compression:
    """The sender's compression settings and what it knows about the link.

    ``link_bytes_per_s=None`` means no link cost is known (an in-process transport):
    nothing is compressed then. ``codec=None`` turns compression off.
    """

    link_bytes_per_s: float | None
    codec: str | None = DEFAULT_CODEC
    min_saving: float = 0.10
    min_bytes: int = 256 * 1024
    sample_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        if self.codec is not None and self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS} or None, not {self.codec!r}")


@dataclass(frozen=True)
class Choice:
    """What :func:`choose_codec` decided and why (kept for counters and the bench notes)."""

    codec: str | None
    why: str
    saving: float | None = None
    codec_bytes_per_s: float | None = None


def ipc_size(table: pa.Table, options: pa_ipc.IpcWriteOptions) -> int:
    """Bytes of ``table`` as one IPC stream (counted, nothing is written)."""
    sink = pa.MockOutputStream()
    with pa_ipc.new_stream(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return int(sink.size())


def _sample(table: pa.Table, sample_bytes: int) -> pa.Table:
    """Rows spread over the table (start, middle, end), about ``sample_bytes`` in all."""
    rows = table.num_rows
    per_row = max(1.0, table.nbytes / max(rows, 1))
    want = max(1, int(sample_bytes / per_row))
    if want >= rows:
        return table
    third = max(1, want // 3)
    parts = [table.slice(0, third), table.slice(rows // 2, third), table.slice(rows - third, third)]
    return pa.concat_tables(parts)


def choose_codec(table: pa.Table, settings: Compression) -> Choice:
    """Decide whether ``table`` goes out compressed, from a sample and the link's speed."""
    if settings.codec is None:
        return Choice(None, "off")
    if settings.link_bytes_per_s is None:
        return Choice(None, "no link cost")
    if table.nbytes < settings.min_bytes:
        return Choice(None, "small")
    sample = _sample(table, settings.sample_bytes)
    plain = ipc_size(sample, pa_ipc.IpcWriteOptions())
    options = pa_ipc.IpcWriteOptions(compression=settings.codec)
    # Best of a few: one run on a busy machine can be descheduled midway and read as a
    # slow codec (it turned compression off for a frame that lz4 halves).
    elapsed = float("inf")
    for _ in range(TIMING_RUNS):
        started = time.perf_counter()
        packed = ipc_size(sample, options)
        elapsed = min(elapsed, time.perf_counter() - started)
    elapsed = max(elapsed, 1e-6)
    saving = 1.0 - packed / max(plain, 1)
    codec_speed = plain / elapsed
    if saving < settings.min_saving:
        return Choice(None, "incompressible", saving, codec_speed)
    link = settings.link_bytes_per_s
    # Per plain byte: plain costs 1/link; compressed costs 1/codec + (1 - saving)/link
    # (decompression on the far end runs at a similar speed and overlaps the next chunk).
    if 1.0 / codec_speed + (1.0 - saving) / link >= 1.0 / link:
        return Choice(None, "link faster than codec", saving, codec_speed)
    return Choice(settings.codec, "smaller and faster", saving, codec_speed)


def write_options(choice: Choice) -> pa_ipc.IpcWriteOptions:
    """IPC writer options for a choice (compressed or not)."""
    if choice.codec is None:
        return pa_ipc.IpcWriteOptions()
    return pa_ipc.IpcWriteOptions(compression=choice.codec)
