"""Mailbox speed, into an empty mailbox and into one that holds 10,000 items.

    python benchmarks/mailbox.py [--json] [--held 10000] [--pickup 1000] [--dir DIR]

One mailbox daemon (``pigeon daemon --mailbox`` in its own process on
127.0.0.1, its default limits: 60 deposits a minute per depositing peer and
per deposit token); SQLCipher with ``synchronous=FULL``, so an acknowledged
deposit is fsynced.

deposit_per_s_*: deposits acknowledged per second, first request to last
acknowledgement.  They come as Pigeon nodes make them: each depositing node
is a libp2p host of its own (its own peer ID) holding its own deposit token
from the owner (a contact's), and leaves its envelopes with
``pigeon.node.mailbox.deposit``, the call a node's courier makes (one stream,
the requests pipelined).  At the default limit a node may leave 60 a minute,
so ``ceil(deposits / 60)`` nodes deposit at once, 60 each (17 for 1,000).
Measured twice in the same run, each time on a daemon just started: with
the mailbox empty, and with it holding ``--held`` items, as many of them as
its quota leaves room for in the box being deposited into (9,000 of 10,000:
the deposits fill it), the rest in another owner's (and in more owners'
beyond 10,000).

mailbox_cpu_ms_per_deposit_*: the mailbox daemon's CPU time (user and
system) while the deposits came, per deposit: steadier than the rate on a
shared machine.

pickup_s_*: a real owner node (``pigeon.node.node.Node`` over its own
database, run in this process) collects ``--pickup`` text messages that a
real sender session sealed for it: fetch with proofs, open each envelope,
decrypt through the ratchet, commit, delete at the mailbox (and leave one-time
prekeys, as every collection that finds few left does); timed from the start
of the collection to its end, every message checked in the owner's
database.  Measured with the mailbox otherwise empty, and with it holding
more than ``--held`` other items.

How the mailbox comes to hold items: at the default limit, 10,000 deposits
would take 167 nodes a minute each, so the items the mailbox already holds
are put in through its own store (``MailboxStore.deposit``, each with the
deposit token it is counted against) while the daemon is stopped, and the
daemon is started again.  The sender's sealed envelopes go in the same way
(one sender leaves 60 a minute: 1,000 take 17 minutes).

raw_stream_rtt_ms and fsync_ms: a bare py-libp2p stream round trip and one
4 KiB write + fsync in ``--dir``, in the same run, for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import info_from_p2p_addr
from nacl.signing import SigningKey

from benchmarks.messaging import raw_rtt
from daemons import PASSPHRASE, Daemon, create_home
from pigeon.node.conversations import Conversations
from pigeon.node.host import build_host, close_host, quiet_libp2p_logs
from pigeon.node.mailbox import deposit
from pigeon.node.mailbox_store import MailboxLimits, MailboxStore
from pigeon.node.node import Node, NodeConfig
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode, DirectoryRecord
from pigeon.protocol.mailbox import DepositToken, mailbox_id
from pigeon.protocol.records import MailboxEntry, SignedPrekey

LIMITS = MailboxLimits()  # the daemon runs with these: no --mailbox-rate-limit
ENVELOPE = 1024  # bytes of each deposited envelope
LISTEN = "/ip4/127.0.0.1/tcp/0"


class Owner:
    """A mailbox owner the depositing nodes are contacts of."""

    def __init__(self) -> None:
        self.key = SigningKey(os.urandom(32))
        self.public = bytes(self.key.verify_key)
        self.box = mailbox_id(self.public)

    def token(self) -> bytes:
        return DepositToken.issue(
            self.public,
            lambda m: self.key.sign(m).signature,
            os.urandom(16),
            int(time.time()) + 3600,
        ).encode()

    def record(self, address: str) -> DirectoryRecord:
        """What a depositing node reads in the owner's record: its mailbox."""
        now = int(time.time())
        peer = info_from_p2p_addr(multiaddr.Multiaddr(address)).peer_id
        entry = MailboxEntry(peer.to_bytes(), self.box, (address,))
        prekey = SignedPrekey(1, os.urandom(32), now)
        return DirectoryRecord(os.urandom(32), "owner", 1, now, now + 3600, prekey, (), (entry,))


async def deposits(address: str, owner: Owner, count: int, pid: int) -> tuple[float, float]:
    """``count`` deposits from as many nodes as the default limit asks:
    (deposits per second, CPU milliseconds per deposit of process ``pid``)."""
    quiet_libp2p_logs()
    per_node = LIMITS.deposits_per_minute
    nodes = math.ceil(count / per_node)
    record = owner.record(address)
    info = info_from_p2p_addr(multiaddr.Multiaddr(address))
    hosts = [build_host(os.urandom(32), [LISTEN]) for _ in range(nodes)]
    async with AsyncExitStack() as stack:
        for host in hosts:
            await stack.enter_async_context(host.run([multiaddr.Multiaddr(LISTEN)]))
            stack.push_async_callback(close_host, host)
        for host in hosts:
            await host.connect(info)  # already connected, as a node near its mailbox is
        work = []
        left = count
        for host in hosts:
            mine = min(per_node, left)
            left -= mine
            pending = [(os.urandom(32), os.urandom(ENVELOPE)) for _ in range(mine)]
            work.append((host, pending, owner.token()))
        stored_total = 0

        async def one(host: IHost, pending: list[tuple[bytes, bytes]], token: bytes) -> None:
            nonlocal stored_total
            stored, refusals = await deposit(host, record, pending, token)
            assert not refusals and len(stored) == len(pending), refusals[:1]
            stored_total += len(stored)

        start, cpu = time.perf_counter(), cpu_seconds(pid)
        async with trio.open_nursery() as nursery:
            for host, pending, token in work:
                nursery.start_soon(one, host, pending, token)
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(pid) - cpu
    assert stored_total == count
    return count / elapsed, cpu * 1000 / count


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(home: Path, owners: list[tuple[bytes, list[tuple[bytes, bytes]]]]) -> None:
    """Put (public key, [(source, envelope)]) into the stopped mailbox's own
    store, through its API: registered, counted and deduplicated as deposits
    over the network are."""
    db = Database.open(home, PASSPHRASE)
    try:
        store = MailboxStore(db, LIMITS)
        now = int(time.time())
        with db.transaction():
            for public, items in owners:
                box = store.register(public, now)
                for source, envelope in items:
                    store.deposit(box, envelope, 0, now, source)
    finally:
        db.close()


def held(home: Path) -> int:
    db = Database.open(home, PASSPHRASE)
    try:
        return int(db.one("SELECT count(*) FROM mailbox_items")[0])
    finally:
        db.close()


def filler(count: int) -> list[tuple[bytes, bytes]]:
    """``count`` envelopes, counted against as few deposit tokens as their
    share allows (2,000 each), as contacts' deposits are."""
    sources = [os.urandom(16) for _ in range(math.ceil(count / LIMITS.token_messages))]
    return [(sources[i // LIMITS.token_messages], os.urandom(ENVELOPE)) for i in range(count)]


class Pickup:
    """A real owner node (Bob) and a real sender (Alice) with a session,
    Alice's sealed texts to Bob in two batches."""

    def __init__(self, root: Path, messages: int) -> None:
        create_home(root / "bob", "bob")
        create_home(root / "alice", "alice")
        self.bob_db = Database.open(root / "bob", PASSPHRASE)
        self.alice_db = Database.open(root / "alice", PASSPHRASE)
        bob = self.node()
        alice = Conversations(self.alice_db, os.urandom)
        self.bob_public = bytes(bob.owner.mailbox_key.verify_key)
        self.source = DepositToken.decode(bob.owner.issue_token()).token_id  # Alice's token
        bob_key = bob.conversations.identity.public_key
        alice.add_contact(ContactCode(bob_key, "bob"), "bob")
        bob.conversations.add_contact(ContactCode(alice.identity.public_key, "alice"), "alice")
        record = DirectoryRecord.verify(bob.record(), now=int(time.time()))
        with self.alice_db.transaction():
            for i in range(2 * messages):
                alice.send_text(bob_key, f"message {i:05d} " + "x" * 100)
        alice.encrypt_queued(bob_key, record)
        envelopes = [e for _, e in alice.pending_envelopes(bob_key, limit=2 * messages + 10)]
        extra = len(envelopes) - 2 * messages  # Alice's introduction, first
        self.batches = [envelopes[: extra + messages], envelopes[extra + messages :]]
        self.messages = messages

    def node(self) -> Node:
        config = NodeConfig(listen=[LISTEN], mailbox_count=1, announce_presence=False)
        return Node(self.bob_db, config)

    def texts(self) -> int:
        return int(
            self.bob_db.one(
                "SELECT count(*) FROM messages WHERE direction = 'in' AND via = 'mailbox'"
            )[0]
        )

    async def collect(self, address: str) -> float:
        """Seconds for Bob's node to collect everything its mailbox holds."""
        quiet_libp2p_logs()
        before = self.texts()
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        with self.bob_db.transaction():
            self.bob_db.execute("DELETE FROM my_mailboxes")
            self.bob_db.execute(
                "INSERT INTO my_mailboxes (peer_id, addresses, registered_at) VALUES (?, ?, ?)",
                (info.peer_id.to_bytes(), json.dumps([address]), int(time.time())),
            )
        bob = self.node()
        async with bob.host.run([multiaddr.Multiaddr(LISTEN)]):
            try:
                await bob.host.connect(info)
                start = time.perf_counter()
                while True:
                    bob.owner.collect_now = trio.Event()
                    await bob.owner.collect_mailboxes()
                    if not bob.owner.collect_now.is_set():
                        break  # drained (more would have asked for another round)
                elapsed = time.perf_counter() - start
            finally:
                await close_host(bob.host)
        got = self.texts() - before
        assert got == self.messages, f"{got} of {self.messages} messages stored"
        return elapsed

    def close(self) -> None:
        self.bob_db.close()
        self.alice_db.close()


def pid(daemon: Daemon) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fsync_ms(folder: Path, rounds: int = 50) -> float:
    path = folder / "fsync.probe"
    times = []
    with path.open("wb") as handle:
        for _ in range(rounds):
            start = time.perf_counter()
            handle.write(os.urandom(4096))
            handle.flush()
            os.fsync(handle.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    return statistics.median(times) * 1000


def run(root: Path, count: int, target_held: int, messages: int) -> dict[str, object]:
    port = free_port()
    box = Daemon(root, "mailbox", extra=["--mailbox", "--listen", f"/ip4/127.0.0.1/tcp/{port}"])
    pickup = Pickup(root, messages)
    first, second = Owner(), Owner()
    result: dict[str, object] = {"deposits": count, "pickup_messages": messages}
    try:
        # 1. pickup, the mailbox holding only what the sender left
        bobs = [(pickup.source, e) for e in pickup.batches[0]]
        fill(box.home, [(pickup.bob_public, bobs), (first.public, []), (second.public, [])])
        box.start()
        address = box.address
        result["pickup_s_empty"] = round(trio.run(pickup.collect, address), 3)
        box.stop()
        # 2. deposits into an empty mailbox (each measurement on a daemon just
        #    started, so that both find it in the same state)
        result["held_empty"] = held(box.home)
        box.start()
        empty, cpu = trio.run(deposits, address, first, count, pid(box))
        result["deposit_per_s_empty"] = round(empty, 1)
        result["mailbox_cpu_ms_per_deposit_empty"] = round(cpu, 3)
        box.stop()
        # 3. deposits into a mailbox that holds target_held items, most of them
        #    for the owner deposited into
        more = target_held - held(box.home)
        theirs = min(more, LIMITS.quota_messages - count)  # room left for the deposits
        owners = [(second.public, filler(theirs))]
        for first_item in range(theirs, more, LIMITS.quota_messages):  # --held over 10,000
            owners.append((Owner().public, filler(min(LIMITS.quota_messages, more - first_item))))
        fill(box.home, owners)
        result["held"] = held(box.home)
        result["held_by_the_owner"] = theirs
        box.start()
        full, cpu = trio.run(deposits, address, second, count, pid(box))
        result["deposit_per_s_held"] = round(full, 1)
        result["mailbox_cpu_ms_per_deposit_held"] = round(cpu, 3)
        result["deposit_ratio_held_to_empty"] = round(full / empty, 2)
        box.stop()
        # 4. pickup, the mailbox holding more than target_held other items
        fill(box.home, [(pickup.bob_public, [(pickup.source, e) for e in pickup.batches[1]])])
        result["held_at_second_pickup"] = held(box.home)
        box.start()
        result["pickup_s_held"] = round(trio.run(pickup.collect, address), 3)
    finally:
        box.stop()
        pickup.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--deposits", type=int, default=1000)
    parser.add_argument("--held", type=int, default=10_000)
    parser.add_argument("--pickup", type=int, default=1000)
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where the daemons' homes go (default: a temporary folder); on a real disk,"
        " not tmpfs, or fsync costs nothing",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pigeon-mailbox-bench-", dir=args.dir))
    try:
        result = run(root, args.deposits, args.held, args.pickup)
        result["fsync_ms"] = round(fsync_ms(root), 2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["raw_stream_rtt_ms"] = round(trio.run(raw_rtt), 2)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:30} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
