"""Conversations over real databases, without a network: envelopes are handed
from one node's outbox to the other's accept_envelopes by hand."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pigeon.node.conversations import RETIRED_PREKEY_KEPT, Conversations, UnknownContact
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode, DecryptError, DirectoryRecord


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000

    def __call__(self) -> int:
        return self.now


def make(root: Path, name: str, clock: Clock) -> Conversations:
    db = Database.create(root / name, "pw", fast_kdf=True)
    Conversations.initialise(db, name, os.urandom)
    return Conversations(db, os.urandom, clock)


def record_of(conv: Conversations) -> DirectoryRecord:
    now = conv.clock()
    return DirectoryRecord(
        conv.identity.public_key, conv.name, 1, now, now + 3600, conv.current_signed_prekey()
    )


def flush(sender: Conversations, receiver: Conversations) -> list[object]:
    key = receiver.identity.public_key
    pending = sender.pending_envelopes(key)
    results = receiver.accept_envelopes([e for _, e in pending])
    sender.acknowledged([d for d, _ in pending])
    return results


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Conversations, Conversations, Clock]:
    clock = Clock()
    alice, bob = make(tmp_path, "alice", clock), make(tmp_path, "bob", clock)
    alice.add_contact(ContactCode(bob.identity.public_key, "bob"), "bobby")
    bob.add_contact(ContactCode(alice.identity.public_key, "alice"))
    return alice, bob, clock


def test_messages_receipts_and_statuses(pair):
    alice, bob, _ = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "one", record_of(bob))
    alice.send_text(b_key, "two")
    assert [m["status"] for m in alice.inbox()] == ["pending", "pending"]
    flush(alice, bob)
    assert [m["text"] for m in bob.inbox()] == ["one", "two"]
    assert [m["status"] for m in alice.inbox()] == ["sent", "sent"]
    flush(bob, alice)  # the delivery receipt
    assert [m["status"] for m in alice.inbox()] == ["delivered", "delivered"]
    assert bob.mark_read(a_key) == 2
    flush(bob, alice)  # the read receipt
    assert [m["status"] for m in alice.inbox()] == ["read", "read"]


def test_a_redelivered_envelope_is_a_duplicate_not_an_error(pair):
    alice, bob, _ = pair
    alice.send_text(bob.identity.public_key, "once", record_of(bob))
    ((_, envelope),) = alice.pending_envelopes(bob.identity.public_key)
    first, again = bob.accept_envelopes([envelope, envelope])
    assert not first.duplicate and again.duplicate
    assert [m["text"] for m in bob.inbox()] == ["once"]


def test_a_bad_envelope_in_a_batch_leaves_no_trace_and_spares_the_rest(pair):
    alice, bob, _ = pair
    alice.send_text(bob.identity.public_key, "good", record_of(bob))
    ((_, good),) = alice.pending_envelopes(bob.identity.public_key)
    bad = bytearray(good)
    bad[-20] ^= 1
    results = bob.accept_envelopes([bytes(bad), good])
    assert isinstance(results[0], DecryptError)
    assert [m["text"] for m in bob.inbox()] == ["good"]


def test_simultaneous_start_converges_on_one_session(pair):
    alice, bob, _ = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "from alice", record_of(bob))
    bob.send_text(a_key, "from bob", record_of(alice))
    flush(alice, bob)
    flush(bob, alice)
    for i in range(3):
        alice.send_text(b_key, f"a{i}")
        bob.send_text(a_key, f"b{i}")
        flush(alice, bob)
        flush(bob, alice)
    assert [m["text"] for m in bob.inbox() if m["direction"] == "in"] == [
        "from alice",
        "a0",
        "a1",
        "a2",
    ]
    assert [m["text"] for m in alice.inbox() if m["direction"] == "in"] == [
        "from bob",
        "b0",
        "b1",
        "b2",
    ]
    for conv, other in ((alice, b_key), (bob, a_key)):
        active = conv.db.all(
            "SELECT base_key FROM sessions WHERE identity_key = ? AND active = 1", (other,)
        )
        assert len(active) == 1
    a_active = alice.db.one("SELECT base_key FROM sessions WHERE active = 1")[0]
    b_active = bob.db.one("SELECT base_key FROM sessions WHERE active = 1")[0]
    assert a_active == b_active


def test_a_replayed_first_message_creates_nothing(pair):
    alice, bob, _ = pair
    alice.send_text(bob.identity.public_key, "hello", record_of(bob))
    ((_, envelope),) = alice.pending_envelopes(bob.identity.public_key)
    bob.accept_envelopes([envelope])
    bob.db.execute("DELETE FROM received_envelopes")  # defeat the cheap check
    result = bob.accept_envelopes([envelope])[0]
    assert isinstance(result, DecryptError)
    assert bob.db.one("SELECT count(*) FROM sessions")[0] == 1
    assert len(bob.inbox()) == 1


def test_signed_prekey_rotates_and_the_previous_one_stays_usable(pair):
    alice, bob, clock = pair
    old_record = record_of(bob)
    clock.now += 8 * 24 * 3600
    new = bob.current_signed_prekey()
    assert new.prekey_id == old_record.signed_prekey.prekey_id + 1
    # Alice still holds the old record: her first message must still work
    alice.send_text(bob.identity.public_key, "in flight", old_record)
    flush(alice, bob)
    assert [m["text"] for m in bob.inbox()] == ["in flight"]
    clock.now += RETIRED_PREKEY_KEPT + 8 * 24 * 3600
    bob.current_signed_prekey()
    assert bob._signed_prekey_private(old_record.signed_prekey.prekey_id) is None


def test_contacts_are_found_by_alias_name_or_id(pair):
    alice, bob, _ = pair
    bob_id = bob.identity.identity_id.hex()
    assert alice.find_contact("bobby").identity_id == bob_id
    assert alice.find_contact("bob").identity_id == bob_id
    assert alice.find_contact(bob_id[:10]).identity_id == bob_id
    with pytest.raises(UnknownContact, match="unknown contact 'carol'"):
        alice.find_contact("carol")
