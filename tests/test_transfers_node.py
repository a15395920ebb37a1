"""The node's side of file transfers over real databases, without a network:
offers and byes are handed between two Conversations by hand (as in
test_conversations.py); the bytes themselves are in test_transfer_e2e.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from test_conversations import Clock, befriend, flush, make_two

from pigeon.node.conversations import Conversations
from pigeon.node.transfers import Transfers, place
from pigeon.protocol import FileOffer, PigeonError, WebRTCSignal
from pigeon.protocol.messages import AppMessage, ByeReason, SignalType
from pigeon.transfer.engine import Outcome, TransferError
from pigeon.transfer.wire import ErrorCode

Spawned = list[tuple[object, tuple[object, ...]]]


def transfers_of(conv: Conversations, root: Path, spawned: Spawned) -> Transfers:
    return Transfers(
        conv.db,
        conv,
        lambda key, content, shown: conv.send(key, content, shown=shown),
        lambda task, *args: spawned.append((task, args)),
        downloads=root / f"{conv.name}-downloads",
    )


@pytest.fixture
def two(tmp_path):
    clock = Clock()
    alice, bob = make_two(tmp_path, clock, "alice lower")
    befriend(alice, bob, "bob")
    befriend(bob, alice, "alice")
    spawned: Spawned = []
    return alice, bob, transfers_of(alice, tmp_path, []), transfers_of(bob, tmp_path, spawned)


def queued(conv: Conversations, to: Conversations) -> list[AppMessage]:
    rows = conv.db.all(
        "SELECT app FROM pending_out WHERE contact = ? ORDER BY lamport", (to.identity.public_key,)
    )
    return [AppMessage.decode(bytes(r[0])) for r in rows]


def test_an_offer_shows_on_both_sides_and_a_decline_comes_back(two, tmp_path):
    alice, bob, at_alice, at_bob = two
    source = tmp_path / "notes.txt"
    source.write_bytes(os.urandom(300_000))
    sent = trio.run(at_alice.offer, bob.identity.public_key, source)
    flush(alice, bob)
    [incoming] = at_bob.list()
    assert incoming["id"] == sent.id.hex() and incoming["state"] == "offered"
    assert (incoming["name"], incoming["size"], incoming["contact"]) == (
        "notes.txt",
        300_000,
        "alice",
    )
    assert [m["text"] for m in alice.inbox()] == ["[file] notes.txt (300.0 KB)"]
    assert [m["text"] for m in bob.inbox()] == ["[file] notes.txt (300.0 KB)"]
    at_bob.cancel(sent.id)
    assert at_bob.list()[0]["state"] == "refused"
    flush(bob, alice)
    [outgoing] = at_alice.list()
    assert (outgoing["state"], outgoing["error"]) == ("refused", "declined by bob")


@pytest.mark.parametrize(
    "uri",
    [
        "pigeon-file:?v=1&root=" + "ab" * 32 + "&size=10&chunk=131072&name=..%2Fevil",
        "pigeon-file:?v=1&root=" + "ab" * 32 + "&size=10&chunk=131072&name=a%2Fb",
        "pigeon-file:?v=1&root=" + "ab" * 32 + "&size=10&chunk=131073&name=x",
        "pigeon-file:?v=2&root=" + "ab" * 32 + "&size=10&chunk=131072&name=x",
        "pigeon-file:?v=1&root=" + "AB" * 32 + "&size=10&chunk=131072&name=x",
    ],
)
def test_an_offer_with_a_bad_reference_is_refused_and_the_sender_told(two, uri):
    alice, bob, _, at_bob = two
    transfer_id = os.urandom(16)
    alice.send(bob.identity.public_key, FileOffer(transfer_id, uri, os.urandom(32), bytes(32)))
    flush(alice, bob)
    assert at_bob.list() == []
    assert bob.db.one("SELECT count(*) FROM transfers")[0] == 0
    [bye] = [m.content for m in queued(bob, alice) if isinstance(m.content, WebRTCSignal)]
    assert bye.transfer_id == transfer_id and bye.signal_type == SignalType.BYE
    assert bye.reason == ByeReason.REFUSED and "not valid" in bye.text


def test_a_signal_for_a_transfer_of_another_contact_changes_nothing(two, tmp_path):
    """A contact cannot cancel (or answer) someone else's transfer by its ID."""
    alice, bob, at_alice, at_bob = two
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    sent = trio.run(at_alice.offer, bob.identity.public_key, source)
    flush(alice, bob)
    clock = Clock()
    mallory, _ = make_two(tmp_path / "m", clock, "alice lower")
    befriend(mallory, bob, "bob")
    befriend(bob, mallory, "mallory")
    mallory.send(
        bob.identity.public_key,
        WebRTCSignal(sent.id, SignalType.BYE, "", ByeReason.CANCELLED, "ha"),
    )
    flush(mallory, bob)
    assert at_bob.list()[0]["state"] == "offered"


def test_accept_refuses_a_folder_without_room_or_rights(two, tmp_path):
    alice, bob, at_alice, at_bob = two
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    sent = trio.run(at_alice.offer, bob.identity.public_key, source)
    flush(alice, bob)
    with pytest.raises(PigeonError, match="not an absolute path"):
        at_bob.accept(sent.id, Path("relative"))
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PigeonError, match="cannot write"):
            at_bob.accept(sent.id, locked)
    with pytest.raises(PigeonError, match="a file you are sending"):
        at_alice.accept(sent.id, tmp_path)
    with pytest.raises(PigeonError, match="no transfer"):
        at_bob.accept(bytes(16), tmp_path)


def test_find_by_prefix(two, tmp_path):
    _, bob, at_alice, _ = two
    source = tmp_path / "f.bin"
    source.write_bytes(b"x")
    sent = trio.run(at_alice.offer, bob.identity.public_key, source)
    assert at_alice.find(sent.id.hex()[:6].upper()) == sent.id
    for bad in ("abc", "zzzzzz", "-" * 8):
        with pytest.raises(PigeonError):
            at_alice.find(bad)


def test_a_finished_file_never_replaces_one_and_never_leaves_its_folder(tmp_path):
    folder = tmp_path / "dl"
    folder.mkdir()
    (folder / "photo.jpg").write_bytes(b"mine")
    (folder / "photo (1).jpg").write_bytes(b"mine too")
    part = folder / ".photo.jpg.part"
    part.write_bytes(b"new")
    placed = place(part, folder, "photo.jpg")
    assert placed == folder / "photo (2).jpg" and placed.read_bytes() == b"new"
    assert (folder / "photo.jpg").read_bytes() == b"mine" and not part.exists()
    part.write_bytes(b"x")
    with pytest.raises(PigeonError, match="would leave the download folder"):
        place(part, folder, "../escape")
    assert not (tmp_path / "escape").exists()


def test_a_sender_that_keeps_breaking_the_protocol_is_given_up(two, tmp_path):
    """Damaged chunks end an attempt and the receiver tries again, but not for
    ever: after three such attempts in a row the transfer fails, and the
    sender is told."""
    alice, bob, at_alice, at_bob = two
    source = tmp_path / "f.bin"
    source.write_bytes(b"x" * 1000)
    sent = trio.run(at_alice.offer, bob.identity.public_key, source)
    flush(alice, bob)
    at_bob.accept(sent.id, tmp_path / "dl")
    damaged = TransferError(
        "the sender sent 17 damaged chunks", ErrorCode.PROTOCOL, Outcome.RESUMABLE
    )
    lost = TransferError("no word from the sender for 5 s", ErrorCode.FAILED, Outcome.RESUMABLE)
    for error in (damaged, damaged, lost, damaged, damaged):  # a lost link breaks the run
        at_bob._ended(at_bob.get(sent.id), error)
        assert at_bob.list()[0]["state"] == "paused"
    at_bob._ended(at_bob.get(sent.id), damaged)
    incoming = at_bob.list()[0]
    assert incoming["state"] == "failed"
    assert incoming["error"] == "the sender sent 17 damaged chunks (3 attempts in a row)"
    flush(bob, alice)
    assert at_alice.list()[0]["state"] == "failed"
