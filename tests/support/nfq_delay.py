"""Delay packets in user space through NFQUEUE (this kernel has no ``tc netem``).

Run inside a router namespace next to ``iptables -A FORWARD -j NFQUEUE --queue-num N``:
every queued packet is accepted ``--delay-ms`` after it arrived, in arrival order, so the
link gets a fixed one-way delay. Speaks nfnetlink_queue directly (no library needed):
bind the queue, ask for metadata only, and answer each packet id with an ACCEPT verdict.
Prints ``ready`` once bound; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import collections
import select
import signal
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG = 0, 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN = 1, 2, 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NF_ACCEPT = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2


def _attr(kind: int, payload: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def _message(msg: int, queue: int, attrs: bytes, seq: int) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    header = struct.pack(
        "=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, NLM_F_REQUEST, seq, 0
    )
    return header + body


def _packet_ids(data: bytes) -> list[int]:
    ids, offset = [], 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            pos = offset + 20  # nlmsghdr + nfgenmsg
            while pos + 4 <= offset + length:
                alen, akind = struct.unpack_from("=HH", data, pos)
                if alen < 4:
                    break
                if akind & 0x7FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, pos + 4)[0])
                pos += (alen + 3) & ~3
        elif kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + 16)
            if code != 0:
                raise OSError(-code, "nfnetlink_queue refused a request")
        offset += (length + 3) & ~3
    return ids


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", type=int, default=0)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    delay = args.delay_ms / 1000.0
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 2**20)
    sock.bind((0, 0))
    bind = struct.pack("=BxH", NFQNL_CFG_CMD_BIND, 0)
    params = struct.pack("!IB", 0, NFQNL_COPY_META) + b"\0" * 3
    sock.send(_message(NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_CMD, bind), 1))
    sock.send(_message(NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_PARAMS, params[:5]), 2))
    sock.send(
        _message(
            NFQNL_MSG_CONFIG, args.queue, _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 8192)), 3
        )
    )
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    held: collections.deque[tuple[float, int]] = collections.deque()
    seq = 10
    while running:
        now = time.monotonic()
        while held and held[0][0] <= now:
            _, packet_id = held.popleft()
            seq += 1
            verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, packet_id))
            sock.send(_message(NFQNL_MSG_VERDICT, args.queue, verdict, seq))
        wait = max(0.0, held[0][0] - now) if held else 0.2
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            data = sock.recv(2**20)
            arrived = time.monotonic()
            held.extend((arrived + delay, pid) for pid in _packet_ids(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
