"""Direct messaging speed between two daemons in separate processes on loopback.

    python benchmarks/messaging.py [--json] [--messages 500] [--contacts 1000]
                                   [--stranger-every 0.5] [--spaced 20]

Every latency runs from the ``send`` call on Alice's control socket to Bob's
daemon announcing the message on a ``follow`` stream, which it does only after
the transaction that stored it has committed (both clocks are this machine's).

- ``paced``: messages 20 ms apart, so they do not queue; the delivery stream
  stays open between them.
- ``spaced``: messages 3 s apart, longer than a delivery stream is kept idle,
  so each one opens a new stream.
- ``loaded``: paced again, between two daemons that each hold ``--contacts``
  other contacts (with signed records and a device each), while a stranger (a
  new py-libp2p host every time) connects to one of them every
  ``--stranger-every`` seconds and says hello on the presence protocol.
- ``throughput``: a burst of ``--messages`` sends, from the first call to
  the last message announced at Bob.

``raw_stream_rtt_ms`` is a bare py-libp2p stream round trip (two hosts, one
process) in the same run: the baseline the latencies are divided by.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr

from daemons import PASSPHRASE, Daemon, wait_for
from pigeon.node.contacts import ContactBook
from pigeon.node.control import Client
from pigeon.node.framing import frame, read_frame
from pigeon.node.host import build_host, close_host, quiet_libp2p_logs
from pigeon.node.presence import PRESENCE_PROTOCOL
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode, DirectoryRecord, IdentityKeyPair
from pigeon.protocol.crypto import x25519_keypair
from pigeon.protocol.frames import MAX_PRESENCE_FRAME, Presence
from pigeon.protocol.records import Device, DeviceCertificate, SignedPrekey

ECHO = TProtocol("/pigeon/bench-echo/1.0.0")
TEXT = "x" * 200


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
    """When each incoming message was received, by Bob's clock (the inbox)."""
    return {
        m["id"]: m["received_at"]
        for m in bob.request("inbox")["messages"]
        if m["direction"] == "in"
    }


class Arrivals:
    """Bob's ``follow`` stream, read in a thread: when each message was
    announced, which is after its commit."""

    def __init__(self, home: Path) -> None:
        self.client = Client(home, timeout=None)
        self.client.request("follow")
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for event in self.client.events():
                if event.get("event") == "message" and event.get("direction") == "in":
                    with self.lock:
                        self.at[str(event["id"])] = time.time()
        except Exception:
            return

    def count(self) -> int:
        with self.lock:
            return len(self.at)

    def close(self) -> None:
        self.client.sock.shutdown(socket.SHUT_RDWR)  # ends the reading thread's wait
        self.thread.join(timeout=5)
        self.client.close()


def add_contacts(home: Path, count: int) -> None:
    """``count`` other contacts, each with a signed record naming one device,
    written before the daemon starts (as if added over months)."""
    if not count:
        return
    db = Database.open(home, PASSPHRASE)
    try:
        book = ContactBook(db)
        now = int(time.time())
        with db.transaction():
            for n in range(count):
                identity = IdentityKeyPair.generate(os.urandom)
                _, prekey_public = x25519_keypair(os.urandom)
                prekey = SignedPrekey(1, prekey_public, now)
                peer = ID.from_pubkey(build_host_key()).to_bytes()
                device = Device(
                    DeviceCertificate.issue(identity, peer, now),
                    (f"/ip4/127.0.0.1/tcp/9/p2p/{ID(peer).to_base58()}",),
                )
                record = DirectoryRecord(
                    identity.public_key, f"friend{n}", 1, now, now + 86400, prekey, (device,)
                )
                book.add(ContactCode(identity.public_key, f"friend{n}"), None, now)
                book.store_record(identity.public_key, record.sign(identity), now)
    finally:
        db.close()


def build_host_key() -> Any:
    from libp2p.crypto.ed25519 import create_new_key_pair

    return create_new_key_pair(os.urandom(32)).public_key


async def strangers(addresses: list[str], every: float, stop: threading.Event) -> None:
    """A new host every ``every`` seconds, taking the daemons in turn:
    connect, say hello on the presence protocol, stay a second, leave."""
    quiet_libp2p_logs()

    async def one(address: str) -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        try:
            async with host.run(listen_addrs=listen):
                try:
                    with trio.move_on_after(5):
                        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                        await host.connect(info)
                        stream = await host.new_stream(info.peer_id, [PRESENCE_PROTOCOL])
                        await stream.write(frame(Presence(True).encode()))
                        await read_frame(stream, MAX_PRESENCE_FRAME, timeout=5)
                        await stream.close()
                        await trio.sleep(1)
                finally:
                    await close_host(host)
        except Exception:
            return

    async with trio.open_nursery() as nursery:
        turn = 0
        while not stop.is_set():
            nursery.start_soon(one, addresses[turn % len(addresses)])
            turn += 1
            await trio.sleep(every)


def pair(root: Path, contacts: int) -> tuple[Daemon, Daemon, Client]:
    alice = Daemon(root, "alice")
    bob = Daemon(root, "bob")
    add_contacts(alice.home, contacts)
    add_contacts(bob.home, contacts)
    alice.start()
    bob.bootstrap = [alice.address]
    bob.start()
    alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
    bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
    return alice, bob, Client(alice.home)


def latencies(a: Client, arrivals: Arrivals, count: int, gap: float) -> list[float]:
    sent: dict[str, float] = {}
    before = arrivals.count()
    for _ in range(count):
        start = time.time()
        sent[a.request("send", contact="bob", text=TEXT)["id"]] = start
        time.sleep(gap)
    wait_for(lambda: arrivals.count() >= before + count, timeout=120, interval=0.1)
    with arrivals.lock:
        return [(arrivals.at[i] - t) * 1000 for i, t in sent.items()]


def warm_up(a: Client, arrivals: Arrivals) -> None:
    before = arrivals.count()
    a.request("send", contact="bob", text="warm-up")
    wait_for(lambda: arrivals.count() > before, timeout=60)


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": round(percentile(values, 50), 2), "p99_ms": round(percentile(values, 99), 2)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    n = args.messages
    result: dict[str, Any] = {"messages": n}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        alice, bob, a = pair(root / "plain", 0)
        arrivals = Arrivals(bob.home)
        try:
            warm_up(a, arrivals)
            result["paced"] = summary(latencies(a, arrivals, n, 0.02))
            if args.spaced:
                result["spaced"] = summary(latencies(a, arrivals, args.spaced, 3.0))
            before = arrivals.count()
            start = time.time()
            for _ in range(n):
                a.request("send", contact="bob", text=TEXT)
            wait_for(lambda: arrivals.count() >= before + n, timeout=300, interval=0.05)
            with arrivals.lock:
                last = max(arrivals.at.values())
            result["throughput_msgs_per_s"] = round(n / (last - start), 1)
        finally:
            arrivals.close()
            a.close()
            alice.stop()
            bob.stop()
        if args.contacts:
            alice, bob, a = pair(root / "loaded", args.contacts)
            arrivals = Arrivals(bob.home)
            stop = threading.Event()
            load = threading.Thread(
                target=trio.run,
                args=(strangers, [alice.address, bob.address], args.stranger_every, stop),
                daemon=True,
            )
            try:
                warm_up(a, arrivals)
                load.start()
                time.sleep(2)  # the strangers' load reaches its steady state
                result["loaded"] = {
                    "contacts": args.contacts,
                    "stranger_every_s": args.stranger_every,
                    **summary(latencies(a, arrivals, n, 0.02)),
                }
            finally:
                stop.set()
                load.join(timeout=30)
                arrivals.close()
                a.close()
                alice.stop()
                bob.stop()
    rtt = trio.run(raw_rtt)
    result["raw_stream_rtt_ms"] = round(rtt, 3)
    result["paced_p50_vs_raw_rtt"] = round(result["paced"]["p50_ms"] / rtt, 2)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--contacts", type=int, default=1000, help="0: no loaded run")
    parser.add_argument("--stranger-every", type=float, default=0.5)
    parser.add_argument("--spaced", type=int, default=20, help="messages 3 s apart (0: none)")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
