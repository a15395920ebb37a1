"""Identity rotation: the statement both keys sign, records that carry it,
and what two nodes' conversations do with it (real databases, no network)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from test_conversations import (
    Clock,
    befriend,
    exchange,
    flush,
    friends,
    make,
    record_of,
    statuses,
    texts,
)

from pigeon.node.contacts import KEY_CHANGE_WAIT
from pigeon.node.conversations import Conversations
from pigeon.protocol import (
    ContactCode,
    DecryptError,
    DirectoryRecord,
    IdentityKeyPair,
    ProtocolError,
    RecordError,
    Rotation,
    SignedPrekey,
    dht_key,
)

NOW = 1_800_000_000


def keys() -> tuple[IdentityKeyPair, IdentityKeyPair, IdentityKeyPair]:
    return tuple(IdentityKeyPair.generate(os.urandom) for _ in range(3))  # type: ignore[return-value]


def signed_record(identity: IdentityKeyPair, rotation: Rotation | None, sequence: int = 5) -> bytes:
    record = DirectoryRecord(
        identity.public_key,
        "alice",
        sequence,
        NOW,
        NOW + 3600,
        SignedPrekey(1, os.urandom(32), NOW),
        rotation=rotation,
    )
    return record.sign(identity)


def test_a_rotation_is_signed_by_both_keys_and_round_trips() -> None:
    old, new, _ = keys()
    rotation = Rotation.create(old, new, NOW)
    assert Rotation.decode(rotation.encode()) == rotation
    rotation.verify()
    for forged in (
        dataclasses.replace(rotation, new_signature=rotation.old_signature),
        dataclasses.replace(rotation, old_signature=rotation.new_signature),
        dataclasses.replace(rotation, at=NOW + 1),
    ):
        with pytest.raises(DecryptError):
            forged.verify()
    with pytest.raises(ValueError):
        Rotation.create(old, old, NOW)


def test_records_carry_the_move_both_ways_and_refuse_a_forged_or_foreign_one() -> None:
    old, new, other = keys()
    rotation = Rotation.create(old, new, NOW)
    from_old = DirectoryRecord.verify(
        signed_record(old, rotation), now=NOW, identity_key=old.public_key
    )
    assert from_old.moved_to == new.public_key
    from_new = DirectoryRecord.verify(
        signed_record(new, rotation), now=NOW, identity_key=new.public_key
    )
    assert from_new.rotation == rotation and from_new.moved_to is None

    # Signed by the old key, but the new key never agreed: refused whole.
    forged = dataclasses.replace(rotation, new_signature=bytes(64))
    with pytest.raises(DecryptError):
        DirectoryRecord.verify(signed_record(old, forged), now=NOW)
    # A statement about two other identities, in Alice's own signed record.
    foreign = Rotation.create(new, other, NOW)
    with pytest.raises(RecordError):
        DirectoryRecord.verify(signed_record(old, foreign), now=NOW)
    # Every byte of the statement flipped: refused, never accepted as another move.
    data = signed_record(old, rotation)
    start = data.index(rotation.encode())
    for i in range(start, start + len(rotation.encode())):
        damaged = bytearray(data)
        damaged[i] ^= 0x01
        with pytest.raises(ProtocolError):
            DirectoryRecord.verify(bytes(damaged), now=NOW, identity_key=old.public_key)


def rotate(conv: Conversations, clock: Clock) -> Conversations:
    """`pigeon identity rotate` on a stopped node, then the node started again."""
    Conversations.rotate(conv.db, os.urandom, clock.now)
    return Conversations(conv.db, os.urandom, clock)


def record_with_move(conv: Conversations, identity: IdentityKeyPair, sequence: int) -> bytes:
    now = conv.now()
    return DirectoryRecord(
        identity.public_key,
        conv.name,
        sequence,
        now,
        now + 3600,
        conv.prekeys.current_signed(),
        rotation=conv.rotation,
    ).sign(identity)


def test_a_contact_that_moved_gets_nothing_until_accepted_then_the_conversation_goes_on(
    tmp_path: Path,
) -> None:
    clock = Clock()
    alice, bob = friends(tmp_path, clock)
    old_key = alice.identity.public_key
    alice.send_text(bob.identity.public_key, "before")
    exchange(alice, bob)
    bob.contacts.set_verified(bob.contacts.get(old_key), clock.now)

    alice = rotate(alice, clock)
    new_key = alice.identity.public_key
    assert new_key != old_key and alice.previous_identity is not None
    assert alice.previous_identity.public_key == old_key

    # Bob writes before he knows: Alice's node cannot read the old key's mail.
    bob.send_text(old_key, "are you there?")
    bob.encrypt_queued(old_key)
    pending = bob.pending_envelopes(old_key)
    assert all(isinstance(r, DecryptError) for r in alice.accept_envelopes([e for _, e in pending]))
    bob.refused([d for d, _ in pending], "refused")

    # Bob's node reads the old identity's record: signed by the old key, naming the new.
    bob.contacts.store_record(
        old_key, record_with_move(alice, alice.previous_identity, 9), clock.now
    )
    contact = bob.contacts.get(old_key)
    assert contact.moved_to == new_key and not contact.verified
    assert old_key not in bob.contacts_with_work()  # nothing goes to either identity
    bob.send_text(old_key, "still there?")
    assert old_key not in bob.contacts_with_work()
    reasons = {m["reason"] for m in bob.inbox() if m["direction"] == "out"}
    assert KEY_CHANGE_WAIT in reasons

    # Alice, from her new identity, writes: a request at Bob's, named alice.
    alice.send_text(bob.identity.public_key, "I moved")
    alice.encrypt_queued(bob.identity.public_key, record_of(bob))
    pending = alice.pending_envelopes(bob.identity.public_key)
    bob.accept_envelopes([e for _, e in pending])
    alice.stored([d for d, _ in pending])
    (request,) = bob.requests.all()
    assert request.identity_key == new_key and request.name == "alice"
    assert "I moved" not in texts(bob)

    # Bob accepts the move: the history stays, the request joins, the queue goes out.
    moved = bob.accept_key(old_key, new_key)
    assert moved.identity_key == new_key and moved.label == "alice" and moved.moved_to is None
    assert bob.requests.all() == [] and not bob.contacts.exists(old_key)
    assert texts(bob) == ["before", "I moved"]
    assert new_key in bob.contacts_with_work()
    exchange(bob, alice)
    assert texts(alice) == ["are you there?", "still there?"]
    assert statuses(bob) == ["delivered", "delivered"]
    assert statuses(alice)[-1] == "delivered"
    alice.send_text(bob.identity.public_key, "and on")
    flush(alice, bob)
    assert texts(bob)[-1] == "and on"


def test_rotation_keeps_what_was_not_yet_delivered(tmp_path: Path) -> None:
    clock = Clock()
    alice, bob = make(tmp_path, "alice", clock), make(tmp_path, "bob", clock)
    befriend(alice, bob)
    alice.send_text(bob.identity.public_key, "queued before the move")
    alice = rotate(alice, clock)
    assert alice.db.one("SELECT count(*) FROM sessions")[0] == 0
    assert statuses(alice) == ["pending"]
    befriend(bob, alice)  # Bob added her new identity (or accepted it)
    exchange(alice, bob)
    assert texts(bob) == ["queued before the move"]
    assert statuses(alice) == ["delivered"]


def test_after_a_lost_device_the_new_identity_is_a_claim_until_vouched_for(tmp_path: Path) -> None:
    """No old key, no signed move: Alice starts again with a new identity and
    writes to Bob, who sees a request that claims to be his contact alice."""
    clock = Clock()
    alice, bob = make(tmp_path, "alice", clock), make(tmp_path, "bob", clock)
    befriend(bob, alice)
    old_key = alice.identity.public_key
    bob.send_text(old_key, "unanswered")
    again = make(tmp_path, "alice-again", clock)
    again.name = "Alice"  # the name she gives, whatever its case
    befriend(again, bob)
    again.send_text(bob.identity.public_key, "lost my phone, new key")
    flush(again, bob)
    (request,) = bob.requests.all()
    assert request.claims("alice") and bob.requests.claiming("alice") == again.identity.public_key
    assert bob.contacts.get(old_key).moved_to is None  # a claim, not a signed move

    bob.accept_key(old_key, again.identity.public_key)
    assert texts(bob) == ["lost my phone, new key"]
    exchange(bob, again)
    assert texts(again) == ["unanswered"]


def test_a_forged_move_is_refused_by_the_node_and_by_the_dht_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pigeon.node.directory import RecordValidator

    clock = Clock()
    clock.now = NOW
    bob = make(tmp_path, "bob", clock)
    alice, mallory, carol = keys()
    bob.contacts.add(ContactCode(alice.public_key, "alice"), None, clock.now)
    validator = RecordValidator(clock)
    # Alice's key signed the record, but the "new key" never signed the move
    # (a stolen signature), and a statement about other identities.
    forged = dataclasses.replace(
        Rotation.create(alice, mallory, NOW),
        new_signature=Rotation.create(alice, carol, NOW).new_signature,
    )
    foreign = Rotation.create(carol, mallory, NOW)
    for rotation, error in ((forged, DecryptError), (foreign, RecordError)):
        record = signed_record(alice, rotation)
        with pytest.raises(error):
            bob.contacts.store_record(alice.public_key, record, clock.now)
        with caplog.at_level("INFO", logger="pigeon.directory"), pytest.raises(ValueError):
            validator.validate(dht_key(alice.public_key), record)
        assert "refused directory record" in caplog.text
        assert bob.contacts.get(alice.public_key).moved_to is None
        assert bob.contacts.get(alice.public_key).record is None
    # The genuine move, for contrast, is taken.
    bob.contacts.store_record(
        alice.public_key, signed_record(alice, Rotation.create(alice, mallory, NOW)), clock.now
    )
    assert bob.contacts.get(alice.public_key).moved_to == mallory.public_key
