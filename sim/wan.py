"""WAN conditions for ``pigeon sim --netns``: delay and loss on every packet
that crosses the hub.

The usual tool, ``tc qdisc ... netem``, needs the kernel's sch_netem module,
and kernels built without it (this project's CI machines among them) say
"Specified qdisc kind is unknown".  What such kernels do have is
netfilter's NFQUEUE: a rule hands each packet to a program in user space,
which says when to let it go.  So the hub namespace gets two iptables rules
on its bridged traffic (``bridge-nf-call-iptables`` makes bridged packets
pass through FORWARD):

    -A FORWARD -m statistic --mode random --probability P -j DROP
    -A FORWARD -j NFQUEUE --queue-num 0

and this module, run inside the hub (``python -m pigeon.sim.wan MS``), holds
each queued packet for MS milliseconds and then accepts it.  Every packet
from one node to another crosses the hub once, so, as with netem on every
node's own interface, a round trip takes twice the delay and each way loses
its share.

The program speaks netlink itself (no library needed): it asks for packet
metadata only (not their bytes), keeps the ids in arrival order, and, since
every packet waits the same time, releases all that are due with one batch
verdict ("accept every id up to N").  A batch verdict also releases ids it
never read (when its socket's buffer overflowed), so nothing stays stuck in
the kernel.
"""

from __future__ import annotations

import collections
import errno
import select
import socket
import struct
import sys
import time

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
NLM_F_ACK = 4
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NF_ACCEPT = 1
QUEUE_MAXLEN = 8192  # packets held at once (at 40 ms, 200,000 packets a second)


class NetlinkError(OSError):
    """The kernel refused a request on the queue."""


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(kind: int, queue: int, attrs: list[bytes], flags: int = NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + b"".join(attrs)
    header = struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | kind, flags, 0, 0)
    return header + body


def packet_ids(data: bytes) -> list[int]:
    """The ids of the queued packets in one read from the socket."""
    ids = []
    offset = 0
    while offset + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, offset)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            at, end = offset + 20, min(offset + length, len(data))  # after the headers
            while at + 4 <= end:
                size, attr = struct.unpack_from("=HH", data, at)
                if size < 4:
                    break
                if attr & 0x7FFF == NFQA_PACKET_HDR and at + 8 <= end:
                    ids.append(struct.unpack_from("!I", data, at + 4)[0])
                at += (size + 3) & ~3
        offset += (length + 3) & ~3
    return ids


class Delayer:
    def __init__(self, queue: int, delay_s: float) -> None:
        self.queue = queue
        self.delay = delay_s
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._request(_attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)))
        self._request(
            _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META)),
            _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN)),
        )
        self.held: collections.deque[tuple[float, int]] = collections.deque()

    def _request(self, *attrs: bytes) -> None:
        self.sock.send(
            _message(NFQNL_MSG_CONFIG, self.queue, list(attrs), NLM_F_REQUEST | NLM_F_ACK)
        )
        reply = self.sock.recv(4096)
        _, kind = struct.unpack_from("=IH", reply)
        (code,) = struct.unpack_from("=i", reply, 16)
        if kind != NLMSG_ERROR or code != 0:
            raise NetlinkError(-code, f"queue {self.queue}: {errno.errorcode.get(-code, code)}")

    def serve(self) -> None:
        while True:
            timeout = None if not self.held else max(0.0, self.held[0][0] - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if readable:
                try:
                    data = self.sock.recv(1 << 16)
                except OSError as error:
                    if error.errno != errno.ENOBUFS:
                        raise
                    data = b""  # ids lost; the next batch verdict releases them
                due = time.monotonic() + self.delay
                self.held.extend((due, pid) for pid in packet_ids(data))
            now = time.monotonic()
            last = None
            while self.held and self.held[0][0] <= now:
                last = self.held.popleft()[1]
            if last is not None:
                verdict = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
                self.sock.send(_message(NFQNL_MSG_VERDICT_BATCH, self.queue, [verdict]))


def main(argv: list[str]) -> int:
    delay_ms = float(argv[0])
    delayer = Delayer(0, delay_ms / 1000)
    print("ready", flush=True)
    delayer.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
