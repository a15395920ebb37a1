"""WAN conditions for ``--netns`` (sim/wan.py, sim/netns.py): the netlink
parser against garbage, and, as root, real namespaces where the round trip
really takes twice the delay and the loss really drops packets."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pigeon.sim.netns import Namespaces, address
from pigeon.sim.wan import NFNL_SUBSYS_QUEUE, NFQA_PACKET_HDR, NFQNL_MSG_PACKET, packet_ids


def packet_message(pid: int) -> bytes:
    hdr = struct.pack("!IHB", pid, 0x0800, 3)  # id, hw protocol, hook
    attr = struct.pack("=HH", 4 + len(hdr), NFQA_PACKET_HDR) + hdr + b"\0"  # padded to 4
    body = b"\x02\x00\x00\x00" + attr
    kind = (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def test_packet_ids_in_one_read() -> None:
    assert packet_ids(packet_message(7) + packet_message(8)) == [7, 8]
    # A message of another kind is skipped, a truncated one ends the read.
    other = struct.pack("=IHHII", 20, 2, 0, 0, 0) + b"\0" * 4
    assert packet_ids(other + packet_message(9) + packet_message(10)[:18]) == [9]


def test_packet_ids_survive_garbage() -> None:
    rng = random.Random(4)
    for _ in range(2000):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(80)))
        ids = packet_ids(data)
        assert all(isinstance(pid, int) for pid in ids)


root_only = pytest.mark.skipif(
    os.geteuid() != 0, reason="network namespaces need root (CI runs as root)"
)


@pytest.fixture
def pair() -> Iterator[Namespaces]:
    namespaces = Namespaces(2)
    namespaces.create()
    try:
        yield namespaces
    finally:
        namespaces.remove()
    assert (
        namespaces.names[0]
        not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


SERVER = """
import socket, sys
kind = socket.SOCK_STREAM if sys.argv[1] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(socket.AF_INET, kind)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[2], 5555))
print("listening", flush=True)
if kind == socket.SOCK_STREAM:
    s.listen(50)
    while True: s.accept()[0].close()
s.settimeout(3); n = 0
try:
    while True: s.recv(100); n += 1
except OSError: print(n, flush=True)
"""

CLIENT = """
import socket, sys, time
if sys.argv[1] == "tcp":
    best = 1e9
    for _ in range(5):
        t = time.monotonic(); c = socket.create_connection((sys.argv[2], 5555), timeout=10)
        best = min(best, time.monotonic() - t); c.close()
    print(best)
else:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _ in range(int(sys.argv[3])): c.sendto(b"x", (sys.argv[2], 5555)); time.sleep(0.002)
"""


def exchange(namespaces: Namespaces, kind: str, *args: str) -> tuple[str, str]:
    server = subprocess.Popen(
        [*namespaces.command(1), sys.executable, "-c", SERVER, kind, address(1)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"
        client = subprocess.run(
            [*namespaces.command(0), sys.executable, "-c", CLIENT, kind, address(1), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        heard = server.stdout.readline().strip() if kind == "udp" else ""
        return client.stdout.strip(), heard
    finally:
        server.kill()
        server.communicate()


@root_only
def test_a_round_trip_takes_twice_the_latency(pair: Namespaces) -> None:
    plain, _ = exchange(pair, "tcp")
    pair.shape(25, 0.0)
    shaped, _ = exchange(pair, "tcp")
    # A TCP connect is one round trip: the SYN and its answer each cross the hub once.
    assert float(plain) < 0.02
    assert 0.050 <= float(shaped) < 0.5, shaped
    counts = pair.counters()
    assert counts["delayed"] >= 20 and counts["dropped"] == 0


@root_only
def test_loss_drops_its_share(pair: Namespaces) -> None:
    pair.shape(0, 0.3)
    _, heard = exchange(pair, "udp", "400")
    # 400 datagrams, 30% dropped: 280 expected, 9 standard deviations either side.
    assert 200 <= int(heard) <= 360, heard
    assert pair.counters()["dropped"] == 400 - int(heard)


@root_only
def test_a_delayer_that_cannot_start_is_one_clear_error(pair: Namespaces, monkeypatch) -> None:
    from pigeon.sim import netns
    from pigeon.sim.scenario import ScenarioError

    monkeypatch.setattr(netns.sys, "executable", "/bin/false")
    started = time.monotonic()
    with pytest.raises(ScenarioError, match="packet delayer"):
        pair.shape(10, 0.0)
    assert time.monotonic() - started < 10
