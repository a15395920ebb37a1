"""No silent loss, end to end with real daemons: every message either arrives
or its sender is told why, and the command line never says more than is true.
Each test here is a way the node lost messages before (see docs/DECISIONS.md)."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from daemons import (
    FAST,
    PASSPHRASE,
    Daemon,
    mailbox_network,
    record_published,
    status,
    wait_for,
)
from helpers import deposit_token
from pigeon.node.delivery import NO_MAILBOX, UNREACHABLE
from pigeon.node.host import build_host, close_host
from pigeon.node.mailbox import call
from pigeon.node.storage import Database
from pigeon.protocol import (
    MAX_TEXT_BYTES,
    DirectoryRecord,
    IdentityKeyPair,
    SignedPrekey,
)
from pigeon.protocol.crypto import x25519_keypair
from pigeon.protocol.mailbox import Op, Request, mailbox_id
from pigeon.protocol.records import Device, DeviceCertificate

pytestmark = pytest.mark.slow


@pytest.fixture
def two(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    alice = Daemon(tmp_path, "alice", extra=FAST).start()
    bob = Daemon(tmp_path, "bob", [alice.address], FAST).start()
    try:
        yield alice, bob
    finally:
        for daemon in (alice, bob):
            if daemon.alive():
                daemon.stop()


def outgoing(daemon: Daemon) -> list[dict]:
    return [m for m in daemon.inbox() if m["direction"] == "out"]


def incoming(daemon: Daemon) -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == "in"]


def add(a: Daemon, b: Daemon) -> None:
    a.cli("contacts", "add", b.id()["contact_code"], "--as", b.name)


def test_a_refused_message_reads_failed_and_arrives_once_the_contact_lets_us_in(two):
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    bob.cli("block", "alice")
    alice.cli("send", "bob", "hello, it's alice")
    wait_for(lambda: [m["status"] for m in outgoing(alice)] == ["failed"])
    (message,) = outgoing(alice)
    assert "refused by bob's node" in message["reason"]
    assert incoming(bob) == []
    assert "[failed: refused by bob's node" in alice.cli("inbox").stdout
    # Bob unblocks Alice and writes to her: her node sends it again
    bob.cli("unblock", alice.id()["identity_id"][:8])
    bob.cli("send", "alice", "sorry, you were blocked")
    wait_for(lambda: incoming(bob) == ["hello, it's alice"], timeout=40)
    wait_for(lambda: [m["status"] for m in outgoing(alice)] == ["delivered"], timeout=40)
    assert incoming(bob) == ["hello, it's alice"]


def test_a_contact_that_lost_its_sessions_heals_and_every_message_arrives_once(two):
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    alice.cli("send", "bob", "first")
    wait_for(lambda: incoming(bob) == ["first"])
    bob.stop()
    db = Database.open(bob.home, PASSPHRASE)
    db.execute("DELETE FROM sessions")  # as after restoring an old backup
    db.close()
    bob.start()
    for i in range(5):
        alice.cli("send", "bob", f"after the loss {i}")
    wait_for(lambda: len(incoming(bob)) == 6, timeout=60)
    wait_for(
        lambda: all(m["status"] == "delivered" for m in outgoing(alice)), timeout=60, interval=0.5
    )
    assert incoming(bob) == ["first", *(f"after the loss {i}" for i in range(5))]
    assert "could not read" in bob.log.read_text()  # told once, in the log
    bob.cli("send", "alice", "all good")
    wait_for(lambda: incoming(alice) == ["all good"])


def _stale_record(bob: Daemon, *, issued_ago: int, lifetime: int) -> bytes:
    """A record genuinely signed by Bob, but old, naming a signed prekey Bob
    never had (as one he has since deleted would look)."""
    db = Database.open(bob.home, PASSPHRASE)
    try:
        identity = IdentityKeyPair(db.get_meta("identity_seed"))
        device_seed = db.get_meta("device_seed")
    finally:
        db.close()
    from pigeon.node.host import peer_id_for

    now = int(__import__("time").time())
    issued = now - issued_ago
    _, public = x25519_keypair(os.urandom)
    cert = DeviceCertificate.issue(identity, peer_id_for(device_seed).to_bytes(), issued)
    record = DirectoryRecord(
        identity.public_key,
        "bob",
        1,
        issued,
        issued + lifetime,
        SignedPrekey(999, public, issued),
        (Device(cert, ()),),
    )
    return record.sign(identity)


@pytest.mark.parametrize(
    ("issued_ago", "lifetime"),
    [
        pytest.param(20 * 86400, 14 * 86400, id="expired"),
        pytest.param(8 * 86400, 14 * 86400, id="older than the prekey rotation"),
    ],
)
def test_a_session_never_starts_from_a_stale_record(two, issued_ago, lifetime):
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    stale = _stale_record(bob, issued_ago=issued_ago, lifetime=lifetime)
    alice.stop()
    db = Database.open(alice.home, PASSPHRASE)
    db.execute("UPDATE contacts SET record = ?, record_sequence = 1 WHERE name = 'bob'", (stale,))
    db.close()
    alice.start()
    alice.cli("send", "bob", "from a fresh record")
    wait_for(lambda: incoming(bob) == ["from a fresh record"], timeout=40)
    wait_for(lambda: [m["status"] for m in outgoing(alice)] == ["delivered"])
    assert "could not read" not in bob.log.read_text()  # no X3DH against the stale prekey


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_session_waits_visibly_while_no_current_record_is_known(tmp_path):
    # Alice keeps her port across restarts, so Bob can find her again
    listen = ["--listen", f"/ip4/127.0.0.1/tcp/{_free_port()}"]
    alice = Daemon(tmp_path, "alice", extra=[*FAST, *listen]).start()
    bob = Daemon(tmp_path, "bob", [alice.address], FAST).start()
    try:
        add(alice, bob)
        add(bob, alice)
        bob.stop()
        # Alice knows Bob only by an expired record, and Bob is gone
        stale = _stale_record(bob, issued_ago=20 * 86400, lifetime=14 * 86400)
        alice.stop()
        db = Database.open(alice.home, PASSPHRASE)
        db.execute(
            "UPDATE contacts SET record = ?, record_sequence = 1 WHERE name = 'bob'", (stale,)
        )
        db.close()
        alice.start()
        alice.cli("send", "bob", "waits for bob")
        wait_for(lambda: outgoing(alice)[0]["reason"] is not None, timeout=40)
        (message,) = outgoing(alice)
        assert message["status"] == "pending"
        assert "directory record" in message["reason"]
        bob.start()  # Bob comes back and publishes his record: the message goes out
        wait_for(lambda: incoming(bob) == ["waits for bob"], timeout=90)
    finally:
        for daemon in (alice, bob):
            if daemon.alive():
                daemon.stop()


def test_a_message_the_contact_cannot_get_yet_says_why(two):
    """Bob offline, listing no mailbox: Alice's message is encrypted (her
    node held Bob's record) and waits, saying for what, not for a record."""
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    bob.stop()
    alice.cli("send", "bob", "when you are back")
    wait_for(lambda: outgoing(alice)[0]["reason"] is not None, timeout=40)
    (message,) = outgoing(alice)
    assert message["status"] == "pending"
    assert message["reason"] == NO_MAILBOX
    bob.start()
    wait_for(lambda: incoming(bob) == ["when you are back"], timeout=90)
    wait_for(lambda: outgoing(alice)[0]["reason"] is None)


@pytest.fixture
def net(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    with mailbox_network(tmp_path) as nodes:
        yield nodes


def acquainted(net: dict[str, Daemon]) -> tuple[Daemon, Daemon]:
    """Alice and Bob, each the other's contact, Bob registered with three
    mailboxes holding his one-time prekeys, and one message from Bob read."""
    alice, bob = net["alice"], net["bob"]
    add(alice, bob)
    add(bob, alice)
    wait_for(lambda: len(status(bob)["mailboxes"]) == 3, timeout=60)
    wait_for(lambda: "left 100 one-time prekeys" in bob.log.read_text(), timeout=30)
    bob.cli("send", "alice", "hi")
    wait_for(lambda: incoming(alice) == ["hi"])
    record_published(bob)  # Bob's record lists his mailboxes
    return alice, bob


def test_long_texts_left_with_mailboxes_all_arrive(net):
    """70 texts of 60,000 characters sent while Bob was offline: 4 MB in
    Bob's mailboxes, more than one reply may carry.  Pickup is paged, so all
    arrive, once and in order, and Alice sees each one delivered."""
    # They have talked before, so Alice holds Bob's deposit token and pays no
    # proof of work (tested in test_hostile_mailbox.py): this is about paging.
    alice, bob = acquainted(net)
    bob.stop()
    total = 70
    for i in range(total):
        alice.cli("send", "bob", f"{i:02d}" + "x" * 59_998)
    wait_for(lambda: all(m["status"] == "sent" for m in outgoing(alice)), timeout=120)
    bob.start()
    wait_for(lambda: len(incoming(bob)) == total, timeout=180, interval=1)
    assert [t[:2] for t in incoming(bob)] == [f"{i:02d}" for i in range(total)]
    wait_for(
        lambda: all(m["status"] == "delivered" for m in outgoing(alice)), timeout=120, interval=1
    )
    assert "replacing it" not in bob.log.read_text()  # no mailbox was dropped as failing


def test_a_message_neither_the_contact_nor_its_mailboxes_take_says_so(net):
    alice, bob = acquainted(net)
    for name in ("bob", "box0", "box1", "box2"):
        net[name].stop()
    alice.cli("send", "bob", "while everyone is away")
    wait_for(lambda: outgoing(alice)[-1]["reason"] is not None, timeout=60)
    assert [(m["status"], m["reason"]) for m in outgoing(alice)][-1] == ("pending", UNREACHABLE)
    bob.start()
    wait_for(lambda: incoming(bob) == ["while everyone is away"], timeout=90)


def test_junk_deposits_do_not_block_a_pickup(net):
    """Five 1 MiB deposits of junk in Bob's mailboxes (from a hostile contact,
    or a stranger who paid for them with work) must not stop his genuine
    messages, and are deleted."""
    alice, bob = net["alice"], net["bob"]
    add(alice, bob)
    add(bob, alice)
    wait_for(lambda: len(status(bob)["mailboxes"]) == 3, timeout=60)
    record_published(bob)
    db = Database.open(bob.home, PASSPHRASE)
    try:
        seed = db.get_meta("mailbox_seed")
    finally:
        db.close()
    from nacl.signing import SigningKey

    box = mailbox_id(bytes(SigningKey(seed).verify_key))
    # a hostile contact of Bob's, holding the deposit token Bob gave it
    token = deposit_token(SigningKey(seed))
    boxes = {n: net[n].address for n in ("box0", "box1", "box2")}
    bob.stop()

    async def flood() -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                for address in boxes.values():
                    info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                    junk = [
                        Request(Op.DEPOSIT, box, envelope=os.urandom(1 << 20), token=token)
                        for _ in range(5)
                    ]
                    replies = await call(host, info, junk)
                    assert all(r.ok for r in replies)
            finally:
                await close_host(host)

    trio.run(flood)
    alice.cli("send", "bob", "genuine, behind the junk")
    wait_for(lambda: outgoing(alice)[0]["status"] == "sent", timeout=60)
    bob.start()
    wait_for(lambda: incoming(bob) == ["genuine, behind the junk"], timeout=90)
    wait_for(
        lambda: all(
            box["messages"] == 0 for n in boxes for box in status(net[n])["mailbox_serving"]
        ),
        timeout=60,
    )


def test_long_messages_are_refused_clearly_or_sent_whole(two):
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    too_long = "é" * 40_000  # 80,000 bytes of UTF-8
    result = alice.cli("send", "bob", too_long, check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"pigeon: message too long: 80,000 bytes of UTF-8; the limit is {MAX_TEXT_BYTES:,}"
    ]
    result = alice.cli("send", "bob", "-", check=False, stdin=too_long.encode())
    assert result.returncode == 1 and "too long" in result.stderr
    result = alice.cli("send", "bob", check=False, stdin=b"\xff\xfe not utf-8")
    assert result.returncode == 1 and "not UTF-8" in result.stderr
    assert outgoing(alice) == []  # nothing was stored or sent

    longest = "é" * (MAX_TEXT_BYTES // 2)
    alice.cli("send", "bob", longest)
    alice.cli("send", "bob", "-", stdin=b"from a pipe\n")
    alice.cli("send", "bob", stdin=b"nul\x00inside\n")
    wait_for(lambda: len(incoming(bob)) == 3)
    received = incoming(bob)
    assert received == [longest, "from a pipe", "nul\x00inside"]


def test_text_from_outside_cannot_steer_the_terminal(two):
    alice, bob = two
    add(alice, bob)
    add(bob, alice)
    hostile = "\x1b[31mred\x1b]0;title\x07 \u202eevil\r fake\nsecond line"
    bob.cli("send", "alice", "-", stdin=hostile.encode())
    wait_for(lambda: incoming(alice) == [hostile])  # stored whole (--json keeps it exact)
    shown = alice.cli("inbox").stdout
    for char in ("\x1b", "\x07", "\u202e", "\r"):
        assert char not in shown
    assert "\\x1b[31mred" in shown and "\\u202eevil" in shown
    lines = shown.splitlines()
    assert lines[-1] == "    second line"  # a message's own lines are indented


def test_contacts_cli_says_what_it_did(two):
    alice, bob = two
    code = bob.id()["contact_code"]
    assert alice.cli("contacts", "add", code, "--as", "bob").stdout.startswith("added bob")
    again = alice.cli("contacts", "add", code)
    assert again.stdout.startswith("bob is already a contact")
    result = alice.cli("contacts", "add", code, "--as", "robert", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "pigeon: bob is already a contact; to rename: pigeon contacts rename bob robert"
    )
    assert alice.cli("contacts", "rename", "bob", "robert").stdout.strip() == "renamed to robert"
    listing = [
        json.loads(line)
        for line in alice.cli("contacts", "list", "--json").stdout.split("\n")
        if line
    ]
    assert [c["label"] for c in listing] == ["robert"]
    alice.cli("send", "robert", "unsent, bob has not added me")
    removed = alice.cli("contacts", "remove", "robert").stdout.strip()
    assert removed.startswith("removed robert and 1 messages")
    assert alice.cli("contacts", "list", "--json").stdout == ""
    bad = code.split("?")[0] + "?name=bob&addr=/ip4/127.0.0.1/tcp/1"
    result = alice.cli("contacts", "add", bad, check=False)
    assert result.returncode == 1 and "cannot be dialled" in result.stderr


def test_a_node_that_reaches_no_bootstrap_peer_says_so(tmp_path):
    lonely = Daemon(tmp_path, "lonely", ["/ip4/127.0.0.1/tcp/9/p2p/" + _some_peer_id()]).start()
    try:
        wait_for(lambda: "could not reach any bootstrap peer" in lonely.log.read_text(), timeout=30)
    finally:
        lonely.stop()


def _some_peer_id() -> str:
    from pigeon.node.host import peer_id_for

    return str(peer_id_for(os.urandom(32)))
