"""Offline delivery through real mailbox daemons (subprocesses on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nacl.signing import SigningKey

from daemons import PASSPHRASE, Daemon, wait_for
from pigeon.node.control import Client
from pigeon.node.framing import frame
from pigeon.node.host import build_host, close_host
from pigeon.node.mailbox import MAILBOX_PROTOCOL, call
from pigeon.node.storage import Database
from pigeon.protocol.mailbox import Op, Request, mailbox_id, proof_message
from pigeon.protocol.wire import encode_varint

pytestmark = pytest.mark.slow
FAST = ["--mailbox-interval", "1"]
BOX = ["--mailbox", "--mailbox-rate-limit", "1000", *FAST]


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    nodes: dict[str, Daemon] = {}
    try:
        nodes["boot"] = Daemon(tmp_path, "boot").start()
        boot = [nodes["boot"].address]
        for i in range(3):
            nodes[f"box{i}"] = Daemon(tmp_path, f"box{i}", boot, BOX).start()
        for name in ("alice", "bob"):
            nodes[name] = Daemon(tmp_path, name, boot, FAST).start()
        yield nodes
    finally:
        for daemon in nodes.values():
            if daemon.alive():
                daemon.stop()


def status(daemon: Daemon) -> dict:
    client = Client(daemon.home)
    try:
        return client.request("status")
    finally:
        client.close()


def incoming(daemon: Daemon) -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == "in"]


def test_offline_delivery_survives_a_mailbox_killed_midway(net):
    alice, bob = net["alice"], net["bob"]
    alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
    bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
    wait_for(lambda: len(status(bob)["mailboxes"]) == 3, timeout=60)
    time.sleep(3)  # Bob's record with his mailboxes is published, prekeys left with them
    bob.stop()

    client = Client(alice.home)
    victim = None
    for i in range(100):
        client.request("send", contact="bob", text=f"offline {i:03d}")
        if i == 40:
            wait_for(lambda: any(m["status"] == "sent" for m in alice.inbox()), timeout=30)
            victim = net["box0"]  # one of Bob's three mailboxes
            victim.kill9()
    client.close()
    wait_for(lambda: all(m["status"] != "pending" for m in alice.inbox()), timeout=120)

    # the mailboxes hold envelopes only: no plaintext, no sender identity
    alice_id = alice.id()
    for name in ("box1", "box2"):
        assert_mailbox_learned_nothing(net[name], alice_id, "offline 007")

    bob.start()
    wait_for(lambda: len(incoming(bob)) == 100, timeout=120)
    assert incoming(bob) == [f"offline {i:03d}" for i in range(100)]  # once each, in order
    wait_for(
        lambda: all(m["status"] == "delivered" for m in alice.inbox() if m["direction"] == "out"),
        timeout=120,
    )
    assert victim is not None and not victim.alive()
    # Bob replaces the mailbox that stays unreachable with a fourth one
    spare = Daemon(victim.home.parent, "box3", [net["boot"].address], BOX).start()
    net["box3"] = spare
    wait_for(
        lambda: len(status(bob)["mailboxes"]) == 3 and _peer_of(spare) in status(bob)["mailboxes"],
        timeout=90,
    )
    # the session started with a one-time prekey that one of Bob's mailboxes handed out
    assert "starting a session with bob with a one-time prekey" in alice.log.read_text()


def _peer_of(daemon: Daemon) -> str:
    return str(daemon.id()["peer_id"])


def assert_mailbox_learned_nothing(box: Daemon, sender: dict, plaintext: str) -> None:
    db = Database.open(box.home, PASSPHRASE)
    try:
        parts: list[bytes] = []
        for (table,) in db.all("SELECT name FROM sqlite_master WHERE type = 'table'"):
            for row in db.all(f"SELECT * FROM {table}"):
                parts += [v if isinstance(v, bytes) else str(v).encode() for v in row]
        dump = b"\n".join(parts)
        blobs = b"".join(bytes(row[0]) for row in db.all("SELECT envelope FROM mailbox_items"))
    finally:
        db.close()
    assert blobs, "the mailbox holds nothing: the test would prove nothing"
    secrets = [
        plaintext.encode(),
        sender["identity_id"].encode(),
        bytes.fromhex(sender["identity_id"]),
        sender["name"].encode() + b"\x00",
    ]
    from pigeon.protocol import ContactCode

    key = ContactCode.parse(sender["contact_code"]).identity_key
    secrets += [key, key.hex().encode()]
    log = box.log.read_bytes()
    for secret in secrets:
        assert secret not in dump and secret not in blobs and secret not in log, secret


def test_a_mailbox_killed_during_deposits_keeps_what_it_acknowledged(net):
    box = net["box0"]
    key = SigningKey(os.urandom(32))
    acknowledged: list[bytes] = []

    async def deposit_until_killed() -> bytes:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                (reply,) = await call(
                    host, info, [Request(Op.REGISTER, public_key=bytes(key.verify_key))]
                )
                mailbox = reply.item_id
                for i in range(200):
                    if i == 50:
                        box.kill9()
                    try:
                        (reply,) = await call(
                            host, info, [Request(Op.DEPOSIT, mailbox, envelope=b"e%d" % i)]
                        )
                    except Exception:
                        break
                    if reply.ok:
                        acknowledged.append(b"e%d" % i)
                return mailbox
            finally:
                await close_host(host)

    mailbox = trio.run(deposit_until_killed)
    assert len(acknowledged) >= 50
    box.start()

    async def fetch_all() -> list[bytes]:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                (challenge,) = await call(host, info, [Request(Op.CHALLENGE, mailbox)])
                signature = key.sign(proof_message(Op.FETCH, mailbox, challenge.nonce)).signature
                (fetched,) = await call(
                    host,
                    info,
                    [Request(Op.FETCH, mailbox, nonce=challenge.nonce, signature=signature)],
                )
                return [item.envelope for item in fetched.items]
            finally:
                await close_host(host)

    stored = trio.run(fetch_all)
    assert set(acknowledged) <= set(stored)


def test_garbage_on_the_mailbox_protocol(net):
    box = net["box1"]

    async def send(data: bytes) -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [MAILBOX_PROTOCOL])
                await stream.write(data)
                with trio.move_on_after(2):
                    with contextlib.suppress(Exception):
                        await stream.read(100)
            finally:
                await close_host(host)

    for data in (
        os.urandom(200),
        encode_varint(500 * 1024 * 1024) + b"x",
        frame(b"\x08\x02\x12"),  # truncated deposit
        frame(Request(Op.DEPOSIT, b"\1" * 16, envelope=b"x" * 10).encode())[:-3],
        frame(b"\x08\x63"),  # unknown operation
    ):
        trio.run(send, data)
        assert box.alive() and box.cli("status").returncode == 0
    wait_for(lambda: "bad mailbox frame" in box.log.read_text(), timeout=5)


def test_a_connected_owner_gets_a_push(tmp_path: Path):
    boot = Daemon(tmp_path, "boot").start()
    nodes = [boot]
    try:
        box = Daemon(tmp_path, "box", [boot.address], BOX).start()
        nodes.append(box)
        bob = Daemon(
            tmp_path, "bob", [boot.address], ["--mailbox-interval", "300", "--mailboxes", "1"]
        ).start()
        nodes.append(bob)
        wait_for(lambda: len(status(bob)["mailboxes"]) == 1, timeout=60)
        db = Database.open(bob.home, PASSPHRASE)
        seed = db.get_meta("mailbox_seed")
        db.close()
        assert seed is not None
        mailbox = mailbox_id(bytes(SigningKey(seed).verify_key))
        time.sleep(2)  # Bob's first collection proves his ownership to the mailbox

        async def deposit() -> None:
            host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
            async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                    (reply,) = await call(
                        host, info, [Request(Op.DEPOSIT, mailbox, envelope=b"x" * 400)]
                    )
                    assert reply.ok
                finally:
                    await close_host(host)

        trio.run(deposit)
        # Bob collects within seconds, not at his next 300-second round
        wait_for(lambda: status(box)["mailbox_fetched"] >= 1, timeout=15)
    finally:
        for node in reversed(nodes):
            node.stop()


def test_two_senders_racing_for_the_last_one_time_prekey(tmp_path: Path):
    from pigeon.protocol import IdentityKeyPair, OneTimePrekey

    box = Daemon(tmp_path, "box", [], BOX).start()
    owner, identity = SigningKey(os.urandom(32)), IdentityKeyPair.generate(os.urandom)
    rounds, winners = 10, []

    async def scenario() -> None:
        hosts = [build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(3)]
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with (
            hosts[0].run(listen_addrs=listen),
            hosts[1].run(listen_addrs=listen),
            hosts[2].run(listen_addrs=listen),
        ):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                (reply,) = await call(
                    hosts[0], info, [Request(Op.REGISTER, public_key=bytes(owner.verify_key))]
                )
                mailbox = reply.item_id
                for n in range(1, rounds + 1):
                    prekey = OneTimePrekey.create(identity, n, os.urandom)[0].encode()
                    (challenge,) = await call(hosts[0], info, [Request(Op.CHALLENGE, mailbox)])
                    signature = owner.sign(
                        proof_message(Op.ADD_PREKEYS, mailbox, challenge.nonce, (prekey,))
                    ).signature
                    (added,) = await call(
                        hosts[0],
                        info,
                        [
                            Request(
                                Op.ADD_PREKEYS,
                                mailbox,
                                nonce=challenge.nonce,
                                signature=signature,
                                prekeys=(prekey,),
                            )
                        ],
                    )
                    assert added.ok and added.prekeys_left == 1
                    got: list[bytes] = []

                    async def take(host: object, into: list[bytes]) -> None:
                        (r,) = await call(host, info, [Request(Op.TAKE_PREKEY, mailbox)])
                        into.append(r.prekey)

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(take, hosts[1], got)
                        nursery.start_soon(take, hosts[2], got)
                    winners.append(sum(1 for p in got if p))
            finally:
                for host in hosts:
                    await close_host(host)

    try:
        trio.run(scenario)
    finally:
        box.stop()
    assert winners == [1] * rounds  # never both, never neither
