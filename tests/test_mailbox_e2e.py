"""Offline delivery through real mailbox daemons (subprocesses on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nacl.signing import SigningKey

from daemons import (
    BOX,
    PASSPHRASE,
    Daemon,
    mailbox_network,
    record_published,
    status,
    wait_for,
)
from helpers import HeldDatabase, deposit_token, register_request
from pigeon.node.control import Client
from pigeon.node.framing import frame, read_frame
from pigeon.node.host import build_host, close_host
from pigeon.node.mailbox import MAILBOX_PROTOCOL, call
from pigeon.node.storage import Database
from pigeon.protocol.mailbox import (
    MAX_RESPONSE_SIZE,
    Op,
    Request,
    Response,
    mailbox_id,
    proof_message,
)
from pigeon.protocol.wire import encode_varint

pytestmark = pytest.mark.slow


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    with mailbox_network(tmp_path) as nodes:
        yield nodes


def incoming(daemon: Daemon) -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == "in"]


def test_offline_delivery_survives_a_mailbox_killed_midway(net):
    alice, bob = net["alice"], net["bob"]
    alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
    bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
    wait_for(lambda: len(status(bob)["mailboxes"]) == 3, timeout=60)
    wait_for(lambda: bob.log.read_text().count("left 100 one-time prekeys") >= 3, 60)
    record_published(bob)  # Bob's record lists his three mailboxes
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
    bob_id = bob.id()["identity_id"][:8]
    assert (
        f"starting a session with contact {bob_id} with a one-time prekey" in alice.log.read_text()
    )

    # A disappearing message whose time runs out while it waits in the mailboxes
    # is never delivered (and is gone from Alice's side too).
    alice.cli("timer", "bob", "3s")
    wait_for(lambda: json.loads(bob.cli("contacts", "list", "--json").stdout)["timer_s"] == 3)
    bob.stop()
    alice.cli("send", "bob", "gone before you are back")
    wait_for(lambda: "sent" in [m["status"] for m in alice.inbox() if m["direction"] == "out"][-1:])
    alice.cli("timer", "bob", "off")  # queued after it, so it is collected after it
    wait_for(lambda: "gone before you are back" not in [m["text"] for m in alice.inbox()])
    bob.start()
    wait_for(
        lambda: json.loads(bob.cli("contacts", "list", "--json").stdout)["timer_s"] is None,
        timeout=60,
    )
    assert "gone before you are back" not in incoming(bob)


def test_a_mailbox_out_of_reach_for_a_while_is_kept(net):
    """A 15-second partition in `pigeon sim` lost messages: three failed
    collections in a row (seconds apart) made the owner drop a mailbox that
    senders on the other side had just left messages with, and nothing ever
    collected them.  Now a mailbox that cannot be reached is replaced only
    after 20 collection intervals, and a replaced one is still collected."""
    bob = net["bob"]
    box = net["box0"]
    peer, port = _peer_of(box), box.address.split("/")[4]
    wait_for(lambda: peer in status(bob)["mailboxes"] and len(status(bob)["mailboxes"]) == 3, 60)
    box.stop()
    failed = f"collecting from mailbox {peer} failed"
    wait_for(lambda: bob.log.read_text().count(failed) >= 5, timeout=30)
    box.extra = [*BOX, "--listen", f"/ip4/127.0.0.1/tcp/{port}"]  # back where it was
    box.start()
    time.sleep(3)
    assert peer in status(bob)["mailboxes"]
    assert "keeps failing" not in bob.log.read_text()


def test_a_retired_mailbox_is_still_drained(net, tmp_path: Path):
    """A mailbox out of reach long enough is replaced, but senders who still
    hold the old record (on the far side of a partition, say) leave messages
    there: the owner keeps collecting from it when it comes back, until it
    holds nothing for us."""
    bob, box = net["bob"], net["box0"]
    peer, port = _peer_of(box), box.address.split("/")[4]
    wait_for(lambda: peer in status(bob)["mailboxes"] and len(status(bob)["mailboxes"]) == 3, 60)
    spare = Daemon(tmp_path, "box3", [net["boot"].address], BOX).start()
    try:
        _drained_after_retiring(bob, box, peer, port, spare)
    finally:
        spare.stop()


def _drained_after_retiring(bob: Daemon, box: Daemon, peer: str, port: str, spare: Daemon) -> None:
    box.stop()
    wait_for(lambda: "replacing it (what it holds" in bob.log.read_text(), timeout=60)
    # the spare takes its place: Bob has three mailboxes again, none of them box0
    wait_for(lambda: _peer_of(spare) in status(bob)["mailboxes"], timeout=60)
    assert peer not in status(bob)["mailboxes"] and len(status(bob)["mailboxes"]) == 3
    bob.stop()
    box.extra = [*BOX, "--listen", f"/ip4/127.0.0.1/tcp/{port}"]  # back where it was
    box.start()
    db = Database.open(bob.home, PASSPHRASE)
    try:
        seed = db.get_meta("mailbox_seed")
    finally:
        db.close()
    key = SigningKey(seed)

    async def deposit() -> None:  # what a sender holding Bob's old record does
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                request = Request(
                    Op.DEPOSIT,
                    mailbox_id(bytes(key.verify_key)),
                    envelope=os.urandom(1024),
                    token=deposit_token(key),
                )
                (reply,) = await call(
                    host, info_from_p2p_addr(multiaddr.Multiaddr(box.address)), [request]
                )
                assert reply.ok, reply.error
            finally:
                await close_host(host)

    trio.run(deposit)
    held = lambda: sum(int(u["messages"]) for u in status(box)["mailbox_serving"])  # noqa: E731
    assert held() == 1
    bob.start()
    wait_for(lambda: held() == 0, 60)


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
                (reply,) = await call(host, info, [register_request(key)])
                mailbox = reply.item_id
                token = deposit_token(key)  # as a contact of the owner's deposits
                for i in range(200):
                    if i == 50:
                        box.kill9()
                    try:
                        deposit = Request(Op.DEPOSIT, mailbox, envelope=b"e%d" % i, token=token)
                        (reply,) = await call(host, info, [deposit])
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


def test_a_mailbox_killed_amid_grouped_deposits_keeps_every_one_it_acknowledged(
    tmp_path: Path,
):
    """Five nodes pipeline deposits at once, so the mailbox stores them in
    groups (one transaction each); it is killed with SIGKILL midway.  Every
    deposit it acknowledged is there after the restart, nothing else is
    there but what was sent, and the owner's counters match what it holds."""
    box = Daemon(tmp_path, "box", extra=BOX).start()
    key = SigningKey(os.urandom(32))
    acknowledged: set[bytes] = set()
    sent: set[bytes] = set()

    async def deposit_until_killed() -> bytes:
        hosts = [build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(5)]
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run(listen_addrs=listen))
                stack.push_async_callback(close_host, host)
            (reply,) = await call(hosts[0], info, [register_request(key)])
            mailbox = reply.item_id

            async def node(host: Any) -> None:
                token = deposit_token(key)
                await host.connect(info)
                for _ in range(20):  # until the mailbox is gone
                    stream = await host.new_stream(info.peer_id, [MAILBOX_PROTOCOL])
                    envelopes = [os.urandom(300) for _ in range(50)]
                    sent.update(envelopes)
                    requests = [
                        Request(Op.DEPOSIT, mailbox, envelope=e, token=token) for e in envelopes
                    ]
                    await stream.write(b"".join(frame(r.encode()) for r in requests))
                    for envelope in envelopes:
                        reply = Response.decode(await read_frame(stream, MAX_RESPONSE_SIZE))
                        assert reply.ok, reply.error
                        acknowledged.add(envelope)
                        # killed with deposits in flight: some sent, not yet acknowledged
                        in_flight = len(sent) > len(acknowledged)
                        if len(acknowledged) >= 600 and in_flight and box.alive():
                            box.kill9()
                    await stream.close()

            async def one(host: Any) -> None:
                with contextlib.suppress(Exception):
                    await node(host)

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for host in hosts:
                        nursery.start_soon(one, host)
            return mailbox

    try:
        mailbox = trio.run(deposit_until_killed)
        assert not box.alive() and 600 <= len(acknowledged) < len(sent)
        box.start()
        serving = {entry["mailbox"]: entry["messages"] for entry in status(box)["mailbox_serving"]}
    finally:
        box.stop()
    db = Database.open(box.home, PASSPHRASE)
    stored = {bytes(r[0]) for r in db.all("SELECT envelope FROM mailbox_items")}
    counted = db.one("SELECT items FROM mailbox_owners WHERE mailbox_id = ?", (mailbox,))[0]
    db.close()
    assert acknowledged <= stored <= sent
    assert serving == {mailbox.hex(): len(stored)} and counted == len(stored)


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
        key = SigningKey(seed)
        mailbox = mailbox_id(bytes(key.verify_key))
        time.sleep(2)  # Bob's first collection proves his ownership to the mailbox

        async def deposit() -> None:
            host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
            async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    info = info_from_p2p_addr(multiaddr.Multiaddr(box.address))
                    deposit = Request(
                        Op.DEPOSIT, mailbox, envelope=b"x" * 400, token=deposit_token(key)
                    )
                    (reply,) = await call(host, info, [deposit])
                    assert reply.ok, reply.error
                finally:
                    await close_host(host)

        trio.run(deposit)
        # Bob collects within seconds, not at his next 300-second round
        wait_for(lambda: status(box)["mailbox_fetched"] >= 1, timeout=15)
    finally:
        for node in reversed(nodes):
            node.stop()


async def take_prekeys_at_once(
    hosts: list[Any], info: Any, mailbox: bytes, token: bytes
) -> list[bytes]:
    """One TAKE_PREKEY from each host, all in flight together: every host opens
    its stream, then every host writes its request, and only when all are
    written does any of them read its answer."""
    from pigeon.node.framing import read_frame
    from pigeon.protocol.mailbox import MAX_RESPONSE_SIZE, Response

    opened, written = trio.Event(), trio.Event()
    counts = {"opened": 0, "written": 0}
    answers: list[bytes] = [b""] * len(hosts)

    async def arrived(step: str, event: trio.Event) -> None:
        counts[step] += 1
        if counts[step] == len(hosts):
            event.set()
        await event.wait()

    async def take(index: int, host: Any) -> None:
        await host.connect(info)
        stream = await host.new_stream(info.peer_id, [MAILBOX_PROTOCOL])
        try:
            await arrived("opened", opened)
            await stream.write(frame(Request(Op.TAKE_PREKEY, mailbox, token=token).encode()))
            await arrived("written", written)
            reply = Response.decode(await read_frame(stream, MAX_RESPONSE_SIZE))
            assert reply.ok, reply.error
            answers[index] = reply.prekey
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index, host in enumerate(hosts):
                nursery.start_soon(take, index, host)
    return answers


def test_two_senders_racing_for_the_last_one_time_prekey(tmp_path: Path):
    """Senders whose TAKE_PREKEY requests are in flight at the same time ask a
    real mailbox daemon for its owner's last one-time prekey: it goes to one
    of them, once, and the other gets none.

    The daemon answers requests one at a time on its one database connection,
    so overlapping requests alone never interleave inside ``take_prekey``; the
    transaction there is what keeps a second connection to the same database
    from handing out the same prekey.  So the last round opens one (a second
    server of the same mailbox) and holds its own take between reading the
    last prekey and deleting it while the two senders' requests arrive at the
    daemon: with the transaction the daemon waits and hands out nothing;
    without it the prekey goes out twice."""
    from pigeon.node.mailbox_store import MailboxLimits, MailboxStore
    from pigeon.protocol import IdentityKeyPair, OneTimePrekey

    box = Daemon(tmp_path, "box", [], BOX).start()
    owner, identity = SigningKey(os.urandom(32)), IdentityKeyPair.generate(os.urandom)
    rounds = 5  # the senders alone, then one more with the held second connection
    handed_out: list[list[str]] = []
    second: HeldDatabase | None = None
    local_has_read, senders_answered = threading.Event(), threading.Event()
    held: list[bool] = []

    def hold() -> None:
        held.append(True)
        local_has_read.set()
        # the daemon answers at once unless it waits for this connection's write
        # lock; then give up after a while (well within its 5 s busy timeout)
        senders_answered.wait(timeout=2.0)

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
                (reply,) = await call(hosts[0], info, [register_request(owner)])
                mailbox = reply.item_id
                token = deposit_token(owner)

                async def add_last_prekey(n: int) -> bytes:
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
                    assert added.ok and added.prekeys_left == 1  # none left from the round before
                    return prekey

                def who_got(prekey: bytes, takers: dict[str, bytes | BaseException]) -> list[str]:
                    for name, got in takers.items():
                        assert not isinstance(got, BaseException), f"{name}: {got!r}"
                        assert got in (b"", prekey), f"{name} got another prekey"
                    return sorted(name for name, got in takers.items() if got)

                for n in range(1, rounds + 1):
                    prekey = await add_last_prekey(n)
                    carol, dave = await take_prekeys_at_once(hosts[1:], info, mailbox, token)
                    handed_out.append(who_got(prekey, {"carol": carol, "dave": dave}))

                prekey = await add_last_prekey(rounds + 1)
                local: dict[str, bytes | BaseException] = {}

                def take_on_the_second_connection() -> None:
                    try:
                        local["second connection"] = MailboxStore(
                            second, MailboxLimits()
                        ).take_prekey(mailbox, int(time.time()))
                    except BaseException as error:
                        local["second connection"] = error
                    finally:
                        local_has_read.set()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, take_on_the_second_connection)
                    await trio.to_thread.run_sync(local_has_read.wait, 30)
                    try:
                        carol, dave = await take_prekeys_at_once(hosts[1:], info, mailbox, token)
                    finally:
                        senders_answered.set()
                handed_out.append(who_got(prekey, {**local, "carol": carol, "dave": dave}))
            finally:
                for host in hosts:
                    await close_host(host)

    try:
        second = HeldDatabase.open(box.home, PASSPHRASE)
        second.hold = hold
        trio.run(scenario)
    finally:
        if second is not None:
            second.close()
        box.stop()
    assert held == [True]  # the second connection really held the last prekey once
    assert [len(names) for names in handed_out] == [1] * (rounds + 1), handed_out
