"""Direct messaging speed between two daemons in separate processes on loopback.

    python benchmarks/messaging.py [--json] [--messages 500]

latency: from the ``send`` call on Alice's control socket to the message being
committed in Bob's database (both clocks are this machine's), with messages
paced so they do not queue; throughput: a burst of ``--messages`` sends, from
the first call to the last commit at Bob.  ``raw_stream_rtt_ms`` is a bare
py-libp2p stream round trip (two hosts, one process) in the same run, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr

from daemons import Daemon, wait_for
from pigeon.node.control import Client
from pigeon.node.framing import frame, read_frame
from pigeon.node.host import build_host, close_host, quiet_libp2p_logs

ECHO = TProtocol("/pigeon/bench-echo/1.0.0")


async def raw_rtt(rounds: int = 300) -> float:
    quiet_libp2p_logs()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    a = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
    b = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])

    async def echo(stream: INetStream) -> None:
        try:
            while True:
                await stream.write(frame(await read_frame(stream, 1 << 20)))
        except Exception:
            return

    async with a.run(listen_addrs=listen), b.run(listen_addrs=listen):
        try:
            b.set_stream_handler(ECHO, echo)
            info = info_from_p2p_addr(b.get_addrs()[0])
            await a.connect(info)
            stream = await a.new_stream(info.peer_id, [ECHO])
            payload = frame(os.urandom(1024))
            times = []
            for _ in range(rounds):
                start = time.perf_counter()
                await stream.write(payload)
                await read_frame(stream, 1 << 20)
                times.append(time.perf_counter() - start)
            await stream.close()
            return statistics.median(times) * 1000
        finally:
            await close_host(a)
            await close_host(b)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def received(bob: Client) -> dict[str, float]:
    return {
        m["id"]: m["received_at"]
        for m in bob.request("inbox")["messages"]
        if m["direction"] == "in"
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--messages", type=int, default=500)
    args = parser.parse_args()
    n = args.messages
    text = "x" * 200
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        alice = Daemon(root, "alice").start()
        bob = Daemon(root, "bob", [alice.address]).start()
        try:
            alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
            bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
            a, b = Client(alice.home), Client(bob.home)
            a.request("send", contact="bob", text="warm-up")
            wait_for(lambda: len(received(b)) == 1)

            sent: dict[str, float] = {}
            for _ in range(n):  # latency, paced
                start = time.time()
                sent[a.request("send", contact="bob", text=text)["id"]] = start
                time.sleep(0.02)
            wait_for(lambda: b.request("status")["received"] >= n + 1, timeout=120, interval=0.5)
            got = received(b)
            latencies = [(got[i] - t) * 1000 for i, t in sent.items()]

            start = time.time()
            for _ in range(n):  # throughput, a burst
                a.request("send", contact="bob", text=text)
            wait_for(
                lambda: b.request("status")["received"] >= 2 * n + 1, timeout=300, interval=0.5
            )
            got = received(b)
            elapsed = max(got.values()) - start
            a.close()
            b.close()
        finally:
            alice.stop()
            bob.stop()
    result = {
        "messages": n,
        "latency_p50_ms": round(percentile(latencies, 50), 2),
        "latency_p99_ms": round(percentile(latencies, 99), 2),
        "throughput_msgs_per_s": round(n / elapsed, 1),
        "raw_stream_rtt_ms": round(trio.run(raw_rtt), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
