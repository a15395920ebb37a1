"""Hostile peers against mailboxes, with real daemons; each attacker is written
with py-libp2p as an attacker would write it.  Identities cost nothing, so
every attacker here may use as many peer IDs as it likes."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.abc import IHost, INetStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service
from nacl.signing import SigningKey

from daemons import BOX, FAST, PASSPHRASE, Daemon, record_published, rss_mb, status, wait_for
from helpers import deposit_token
from pigeon.node.framing import StreamClosed, frame, read_frame
from pigeon.node.host import build_host, close_host
from pigeon.node.mailbox import MAILBOX_PROTOCOL, PROVIDER_KEY, call
from pigeon.node.mailbox_owner import MAX_OUTSTANDING_PREKEYS
from pigeon.node.storage import Database
from pigeon.protocol.mailbox import MAX_REQUEST_SIZE, Item, Op, Request, Response, mailbox_id

pytestmark = pytest.mark.slow
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@asynccontextmanager
async def stranger(target: str) -> AsyncIterator[tuple[IHost, PeerInfo]]:
    """A fresh identity connected to ``target``."""
    host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
    async with host.run(listen_addrs=LISTEN):
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(target))
            await host.connect(info)
            yield host, info
        finally:
            await close_host(host)


def mailbox_of(daemon: Daemon) -> tuple[SigningKey, bytes]:
    """A node's mailbox key and ID, read from its database."""
    db = Database.open(daemon.home, PASSPHRASE)
    try:
        seed = db.get_meta("mailbox_seed")
    finally:
        db.close()
    assert seed is not None
    key = SigningKey(seed)
    return key, mailbox_id(bytes(key.verify_key))


def incoming(daemon: Daemon) -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == "in"]


def test_requests_a_stranger_does_not_pay_for_are_refused(tmp_path: Path):
    box = Daemon(tmp_path, "box", [], BOX).start()
    bob = Daemon(tmp_path, "bob", [box.address], [*FAST, "--mailboxes", "1"]).start()
    try:
        wait_for(lambda: len(status(bob)["mailboxes"]) == 1, timeout=60)
        _, bob_box = mailbox_of(bob)

        async def attack() -> list[Response]:
            async with stranger(box.address) as (host, info):
                return await call(
                    host,
                    info,
                    [
                        Request(
                            Op.REGISTER, public_key=bytes(SigningKey(os.urandom(32)).verify_key)
                        ),
                        Request(Op.DEPOSIT, bob_box, envelope=os.urandom(1 << 20)),
                        Request(Op.TAKE_PREKEY, bob_box),
                        Request(Op.DEPOSIT, bob_box, envelope=b"x" * 500, token=b"\x0a" * 40),
                    ],
                )

        replies = trio.run(attack)
        assert [r.ok for r in replies] == [False] * 4
        assert replies[0].error == "registering needs proof of work (20 bits)"
        assert replies[1].error == "a deposit without a token needs proof of work (22 bits)"
        assert replies[2].error == "taking a prekey without a token needs proof of work (20 bits)"
        assert replies[3].error.startswith("deposit token refused")
        assert status(box)["mailbox_serving"] == [
            {"mailbox": bob_box.hex(), "messages": 0, "bytes": 0}
        ]
    finally:
        bob.stop()
        box.stop()


def test_a_challenge_flood_locks_no_owner_out(tmp_path: Path):
    """10,001 challenges used to fill the mailbox's table and lock every owner
    out of pickup for a minute.  Now a challenge is not remembered at all."""
    box = Daemon(tmp_path, "box", [], BOX).start()
    bob = Daemon(tmp_path, "bob", [box.address], [*FAST, "--mailboxes", "1"]).start()
    alice = Daemon(tmp_path, "alice", [box.address], FAST).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        wait_for(lambda: len(status(bob)["mailboxes"]) == 1, timeout=60)
        record_published(bob)
        _, bob_box = mailbox_of(bob)
        before = rss_mb(box)

        async def flood() -> None:
            async with stranger(box.address) as (host, info):
                for first in range(0, 10_200, 300):
                    requests = [
                        Request(Op.CHALLENGE, bob_box if i % 2 else os.urandom(16))
                        for i in range(first, first + 300)
                    ]
                    await call(host, info, requests)

        bob.stop()
        alice.cli("send", "bob", "through the flood")
        wait_for(lambda: [m["status"] for m in alice.inbox()] == ["sent"], timeout=60)
        trio.run(flood)
        # well inside the 60 s a flooded challenge used to stay in the table
        bob.start()
        wait_for(lambda: incoming(bob) == ["through the flood"], timeout=20)
        assert box.alive() and rss_mb(box) < before + 50
    finally:
        for daemon in (alice, bob, box):
            if daemon.alive():
                daemon.stop()


@asynccontextmanager
async def evil_mailbox(boot: str, fetches: list[str]) -> AsyncIterator[str]:
    """A mailbox that advertises itself like any other, takes registrations,
    and then always serves the same junk item and refuses every DELETE."""
    host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
    dht = KadDHT(host, DHTMode.SERVER)

    async def serve(stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            while True:
                try:
                    request = Request.decode(await read_frame(stream, MAX_REQUEST_SIZE))
                except StreamClosed:
                    return
                if request.op == Op.REGISTER:
                    reply = Response(ok=True, item_id=mailbox_id(request.public_key))
                elif request.op == Op.CHALLENGE:
                    reply = Response(ok=True, nonce=os.urandom(32))
                elif request.op == Op.FETCH:
                    fetches.append(peer)
                    junk = Item(b"j" * 16, os.urandom(400), int(time.time()))
                    reply = Response(ok=True, items=(junk,), prekeys_left=100)
                elif request.op == Op.DELETE:
                    reply = Response(ok=False, error="no")
                else:
                    reply = Response(ok=True)
                await stream.write(frame(reply.encode()))
        except Exception:
            return

    async with host.run(listen_addrs=LISTEN), background_trio_service(dht):
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(boot))
            await host.connect(info)
            await dht.add_peer(info.peer_id)
            host.set_stream_handler(MAILBOX_PROTOCOL, serve)
            await dht.provide(PROVIDER_KEY)
            yield f"{host.get_addrs()[0]}"
        finally:
            await close_host(host)


def test_a_mailbox_that_serves_junk_and_keeps_it_is_replaced(tmp_path: Path):
    """A mailbox that always returns one junk item and ignores DELETE served
    3,592 FETCHes and was never counted as failing.  Now each collection takes
    few rounds from it, it is replaced after three, and never chosen again."""
    boot = Daemon(tmp_path, "boot").start()
    nodes = [boot]
    fetches: list[str] = []
    try:

        async def scenario() -> None:
            async with evil_mailbox(boot.address, fetches):
                bob = Daemon(tmp_path, "bob", [boot.address], [*FAST, "--mailboxes", "1"]).start()
                nodes.append(bob)
                with trio.fail_after(60):
                    while not fetches:
                        await trio.sleep(0.2)
                with trio.fail_after(60):
                    while "keeps failing: replacing it" not in bob.log.read_text():
                        await trio.sleep(0.2)
                bob_peer = bob.id()["peer_id"]
                served = fetches.count(bob_peer)
                honest = Daemon(tmp_path, "honest", [boot.address], BOX).start()
                nodes.append(honest)
                honest_peer = honest.id()["peer_id"]
                with trio.fail_after(90):
                    while status(bob)["mailboxes"] != [honest_peer]:
                        await trio.sleep(0.5)
                await trio.sleep(3)
                assert fetches.count(bob_peer) == served, "the failed mailbox was chosen again"
                assert served <= 3  # a refused DELETE fails a collection at its first page

        trio.run(scenario)
    finally:
        for node in reversed(nodes):
            if node.alive():
                node.stop()


def test_a_leaked_token_cannot_drain_prekeys_for_ever(tmp_path: Path):
    """76 throwaway IDs took 1,300 one-time prekeys in 60 s and the owner's
    table grew without end.  Now taking a prekey costs a token or work, and
    the owner stops refilling a mailbox drained faster than sessions start:
    what it keeps stays bounded, and senders fall back to three-DH X3DH."""
    box = Daemon(tmp_path, "box", [], [*BOX, "--mailbox-rate-limit", "100000"]).start()
    bob = Daemon(tmp_path, "bob", [box.address], [*FAST, "--mailboxes", "1"]).start()
    alice = Daemon(tmp_path, "alice", [box.address], FAST).start()
    try:
        wait_for(lambda: "left 100 one-time prekeys" in bob.log.read_text(), timeout=60)
        key, bob_box = mailbox_of(bob)
        leaked = deposit_token(key)  # a contact's token, in the wrong hands

        async def drain(seconds: float) -> int:
            taken = 0
            deadline = trio.current_time() + seconds
            while trio.current_time() < deadline:
                async with stranger(box.address) as (host, info):
                    replies = await call(
                        host, info, [Request(Op.TAKE_PREKEY, bob_box, token=leaked)] * 50
                    )
                    taken += sum(1 for r in replies if r.ok and r.prekey)
            return taken

        taken = trio.run(drain, 25.0)
        assert taken >= MAX_OUTSTANDING_PREKEYS - 20  # the attack really drained, refills too
        db = Database.open(bob.home, PASSPHRASE)
        try:
            kept = db.one("SELECT count(*) FROM one_time_prekeys")[0]
        finally:
            db.close()
        assert kept <= MAX_OUTSTANDING_PREKEYS
        assert "drain too fast" in bob.log.read_text()
        # Bob is still reachable: a new contact's session starts without one
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        alice.cli("send", "bob", "hello anyway")
        wait_for(lambda: incoming(bob) == ["hello anyway"], timeout=60)
    finally:
        for daemon in (alice, bob, box):
            if daemon.alive():
                daemon.stop()
