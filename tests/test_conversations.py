"""Conversations over real databases, without a network: envelopes are handed
from one node's outbox to the other's accept_envelopes by hand, as the
courier would (encrypt the queue, deliver, settle each envelope by its ack)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pigeon.node.contacts import ContactBook, ContactExists, UnknownContact
from pigeon.node.conversations import MAX_AUTO_RESENDS, MESSAGE_TTL, Conversations, NoSession
from pigeon.node.prekeys import RETIRED_PREKEY_KEPT
from pigeon.node.storage import Database
from pigeon.protocol import (
    MAX_TEXT_BYTES,
    ContactCode,
    DecryptError,
    DirectoryRecord,
    IdentityKeyPair,
    LocalProtocolError,
    PigeonError,
    Text,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000

    def __call__(self) -> int:
        return self.now


def make(root: Path, name: str, clock: Clock, seed: bytes | None = None) -> Conversations:
    db = Database.create(root / name, "pw", fast_kdf=True)
    seeds = [seed] if seed is not None else []

    def random(n: int) -> bytes:
        return seeds.pop() if seeds and n == 32 else os.urandom(n)

    Conversations.initialise(db, name, random)
    return Conversations(db, os.urandom, clock)


def make_two(root: Path, clock: Clock, order: str) -> tuple[Conversations, Conversations]:
    """Alice and Bob, with Alice's identity key the lower one or the higher one:
    when both start a session, the lower key's wins, so outcomes that depend
    on it are tested both ways."""
    seeds = sorted((os.urandom(32) for _ in range(2)), key=lambda s: IdentityKeyPair(s).public_key)
    if order == "alice higher":
        seeds.reverse()
    alice, bob = make(root, "alice", clock, seeds[0]), make(root, "bob", clock, seeds[1])
    lower = alice.identity.public_key < bob.identity.public_key
    assert lower == (order == "alice lower")
    return alice, bob


ORDERS = pytest.mark.parametrize("order", ["alice lower", "alice higher"])


def record_of(conv: Conversations) -> DirectoryRecord:
    now = conv.now()
    return DirectoryRecord(
        conv.identity.public_key, conv.name, 1, now, now + 3600, conv.prekeys.current_signed()
    )


def befriend(a: Conversations, b: Conversations, alias: str | None = None) -> None:
    a.contacts.add(ContactCode(b.identity.public_key, b.name), alias, a.now())


def friends(root: Path, clock: Clock) -> tuple[Conversations, Conversations]:
    """Alice and Bob, each the other's contact."""
    alice, bob = make(root, "alice", clock), make(root, "bob", clock)
    befriend(alice, bob)
    befriend(bob, alice)
    return alice, bob


def flush(sender: Conversations, receiver: Conversations) -> list[object]:
    """Encrypt the sender's queue for the receiver (starting a session from the
    receiver's record when needed) and deliver the outbox directly."""
    key = receiver.identity.public_key
    if sender.needs_session(key):
        sender.encrypt_queued(key, record_of(receiver))
    else:
        sender.encrypt_queued(key)
    pending = sender.pending_envelopes(key)
    results = receiver.accept_envelopes([e for _, e in pending])
    stored = [
        d for (d, _), r in zip(pending, results, strict=True) if not isinstance(r, PigeonError)
    ]
    refused = [d for (d, _), r in zip(pending, results, strict=True) if isinstance(r, PigeonError)]
    sender.stored(stored)
    sender.refused(refused, "refused")
    return results


def exchange(a: Conversations, b: Conversations, rounds: int = 4) -> None:
    for _ in range(rounds):
        flush(a, b)
        flush(b, a)


def texts(conv: Conversations, direction: str = "in") -> list[str]:
    return [str(m["text"]) for m in conv.inbox() if m["direction"] == direction]


def statuses(conv: Conversations) -> list[str]:
    return [str(m["status"]) for m in conv.inbox() if m["direction"] == "out"]


@pytest.fixture(params=["alice lower", "alice higher"])
def pair(
    tmp_path: Path, request: pytest.FixtureRequest
) -> tuple[Conversations, Conversations, Clock]:
    clock = Clock()
    alice, bob = make_two(tmp_path, clock, request.param)
    befriend(alice, bob, "bobby")
    befriend(bob, alice)
    return alice, bob, clock


def test_messages_receipts_and_statuses(pair):
    alice, bob, _ = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "one")
    alice.send_text(b_key, "two")
    assert statuses(alice) == ["pending", "pending"]
    flush(alice, bob)
    assert texts(bob) == ["one", "two"]
    assert statuses(alice) == ["sent", "sent"]
    flush(bob, alice)  # the delivery receipt
    assert statuses(alice) == ["delivered", "delivered"]
    assert alice.db.one("SELECT count(*) FROM pending_out")[0] == 0  # confirmed: forgotten
    assert bob.mark_read(a_key) == 2
    flush(bob, alice)  # the read receipt
    assert statuses(alice) == ["read", "read"]


def test_nothing_is_encrypted_without_a_session_or_a_record(pair):
    alice, bob, _ = pair
    b_key = bob.identity.public_key
    alice.send_text(b_key, "waits")
    assert alice.needs_session(b_key)
    with pytest.raises(NoSession):
        alice.encrypt_queued(b_key)
    assert alice.pending_envelopes(b_key) == []
    alice.note_waiting(b_key, "waiting for the record")
    assert [m["reason"] for m in alice.inbox()] == ["waiting for the record"]
    alice.encrypt_queued(b_key, record_of(bob))  # the record came: no longer waiting for it
    assert [(m["status"], m["reason"]) for m in alice.inbox()] == [("pending", None)]
    flush(alice, bob)
    assert texts(bob) == ["waits"]
    assert [m["reason"] for m in alice.inbox()] == [None]


def test_a_redelivered_envelope_is_a_duplicate_not_an_error(pair):
    alice, bob, _ = pair
    alice.send_text(bob.identity.public_key, "once")
    alice.encrypt_queued(bob.identity.public_key, record_of(bob))
    *_, (_, envelope) = alice.pending_envelopes(bob.identity.public_key)  # after the introduction
    first, again = bob.accept_envelopes([envelope, envelope])
    assert first.app is not None and first.new
    assert again.app is None and not again.new
    assert texts(bob) == ["once"]


def test_a_bad_envelope_in_a_batch_leaves_no_trace_and_spares_the_rest(pair):
    alice, bob, _ = pair
    alice.send_text(bob.identity.public_key, "good")
    alice.encrypt_queued(bob.identity.public_key, record_of(bob))
    *_, (_, good) = alice.pending_envelopes(bob.identity.public_key)
    bad = bytearray(good)
    bad[-20] ^= 1
    results = bob.accept_envelopes([bytes(bad), good])
    assert isinstance(results[0], DecryptError)
    assert texts(bob) == ["good"]


def test_a_step_rolled_back_in_a_batch_leaves_its_message_readable_later(pair):
    """A batch reads each session once and keeps it across the envelopes;
    when one envelope's step is rolled back after its decryption (here its
    handler fails once), the session goes back with it, so the same
    envelope, delivered again, is read."""
    alice, bob, _ = pair
    b_key = bob.identity.public_key
    for text in ("one", "two", "three"):
        alice.send_text(b_key, text)
    alice.encrypt_queued(b_key, record_of(bob))
    envelopes = [e for _, e in alice.pending_envelopes(b_key)]
    store_text = bob._handlers[Text]
    failures = ["two"]

    def fails_once(item):
        if item.app.content.text in failures:
            failures.remove(item.app.content.text)
            raise PigeonError("the disk is full")
        return store_text(item)

    bob._handlers[Text] = fails_once
    results = bob.accept_envelopes(envelopes)
    assert [isinstance(r, PigeonError) for r in results][-3:] == [False, True, False]
    assert texts(bob) == ["one", "three"]
    (again,) = bob.accept_envelopes([envelopes[-2]])
    assert not isinstance(again, PigeonError), again
    assert sorted(texts(bob)) == ["one", "three", "two"]


def test_simultaneous_start_converges_on_one_session(pair):
    alice, bob, _ = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "from alice")
    bob.send_text(a_key, "from bob")
    alice.encrypt_queued(b_key, record_of(bob))
    bob.encrypt_queued(a_key, record_of(alice))
    exchange(alice, bob)
    for i in range(3):
        alice.send_text(b_key, f"a{i}")
        bob.send_text(a_key, f"b{i}")
        exchange(alice, bob)
    assert texts(bob) == ["from alice", "a0", "a1", "a2"]
    assert texts(alice) == ["from bob", "b0", "b1", "b2"]
    assert statuses(alice) == statuses(bob) == ["delivered"] * 4
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
    alice.send_text(bob.identity.public_key, "hello")
    alice.encrypt_queued(bob.identity.public_key, record_of(bob))
    *_, (_, envelope) = alice.pending_envelopes(bob.identity.public_key)
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
    new = bob.prekeys.current_signed()
    assert new.prekey_id == old_record.signed_prekey.prekey_id + 1
    # Alice still holds the old record: her first message must still work
    alice.send_text(bob.identity.public_key, "in flight")
    alice.encrypt_queued(bob.identity.public_key, old_record)
    flush(alice, bob)
    assert texts(bob) == ["in flight"]
    clock.now += RETIRED_PREKEY_KEPT + 8 * 24 * 3600
    bob.prekeys.current_signed()
    assert bob.prekeys.signed_private(old_record.signed_prekey.prekey_id) is None


# -- no silent loss ------------------------------------------------------------------


@ORDERS
def test_a_message_to_someone_who_has_not_added_us_waits_as_a_request_until_they_do(
    tmp_path, order
):
    """Alice adds Bob; Bob has not added Alice.  Her message is read and kept
    as a request, with the name she introduced herself by: she sees sent
    (true: his node stored it), never delivered, and his node says nothing
    to her.  Once Bob adds her, it joins the conversation, is confirmed, and
    the session she started goes on."""
    clock = Clock()
    alice, bob = make_two(tmp_path, clock, order)
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    befriend(alice, bob)
    alice.send_text(b_key, "hello bob")
    results = flush(alice, bob)
    assert all(getattr(r, "stranger", False) for r in results)
    assert texts(bob) == []
    (request,) = bob.requests.all()
    assert request.name == "alice" and request.identity_id == alice.identity.identity_id.hex()
    assert [m["text"] for m in request.messages] == ["hello bob"]
    assert statuses(alice) == ["sent"]
    assert bob.db.one("SELECT count(*) FROM pending_out")[0] == 0  # nothing said to a stranger

    _, added = bob.add_contact(ContactCode(a_key, "alice"), None)
    assert added and bob.requests.all() == []
    assert texts(bob) == ["hello bob"]
    bob.send_text(a_key, "hi alice, added you")
    exchange(bob, alice)
    assert texts(alice) == ["hi alice, added you"]
    assert statuses(alice) == ["delivered"] and statuses(bob) == ["delivered"]
    assert bob.db.one("SELECT count(*) FROM sessions")[0] == 1  # hers, carried on


@ORDERS
def test_a_request_collected_from_a_mailbox_is_accepted_by_its_sender_s_name(tmp_path, order):
    clock = Clock()
    alice, bob = make_two(tmp_path, clock, order)
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    befriend(alice, bob)
    alice.send_text(b_key, "left with a mailbox")
    alice.encrypt_queued(b_key, record_of(bob))
    pending = alice.pending_envelopes(b_key)
    alice.stored([d for d, _ in pending])  # a mailbox stored it
    assert statuses(alice) == ["sent"]
    bob.accept_envelopes([e for _, e in pending], via="mailbox")
    contact = bob.accept_request(bob.requests.find(alice.identity.identity_id.hex()[:8]))
    assert contact.label == "alice" and contact.identity_key == a_key
    assert texts(bob) == ["left with a mailbox"]
    exchange(bob, alice)
    assert statuses(alice) == ["delivered"]
    alice.send_text(b_key, "and now?")
    exchange(alice, bob)
    assert texts(bob) == ["left with a mailbox", "and now?"]


def test_a_blocked_stranger_is_refused_and_its_request_forgotten(tmp_path):
    clock = Clock()
    alice, bob = make_two(tmp_path, clock, "alice lower")
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    befriend(alice, bob)
    alice.send_text(b_key, "one")
    flush(alice, bob)
    bob.requests.block(a_key, bob.now())
    assert bob.requests.all() == []
    assert bob.db.one("SELECT count(*) FROM sessions")[0] == 0
    alice.send_text(b_key, "two")
    results = flush(alice, bob)
    assert results and all(isinstance(r, DecryptError) for r in results)  # opaque, as garbage
    assert bob.requests.all() == []
    # A blocked contact is refused too; unblocking lets the next ones in.
    bob.add_contact(ContactCode(a_key, "alice"), None)
    alice.send_text(b_key, "three")
    assert all(isinstance(r, DecryptError) for r in flush(alice, bob))
    assert bob.requests.unblock(a_key)
    alice.db.execute("DELETE FROM sessions")  # start afresh, as after her retry
    alice.send_text(b_key, "four")
    flush(alice, bob)
    assert "four" in texts(bob)


def test_a_contact_who_lost_our_session_asks_for_a_new_one_and_everything_arrives(pair):
    """Bob loses his sessions (a restored backup, a reset database).  Alice's
    next messages cannot be read: Bob refuses them and, in a fresh session,
    says so; Alice moves to that session and sends again whatever Bob has not
    confirmed.  Every message arrives exactly once."""
    alice, bob, clock = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "before")
    exchange(alice, bob)
    assert texts(bob) == ["before"]
    bob.db.execute("DELETE FROM sessions")

    alice.send_text(b_key, "after 1")
    alice.send_text(b_key, "after 2")
    results = flush(alice, bob)
    assert all(isinstance(r, DecryptError) for r in results)
    assert statuses(alice) == ["delivered", "failed", "failed"]
    assert bob.db.one("SELECT count(*) FROM pending_out")[0] == 1  # the reset waits to go
    clock.now += 1
    exchange(bob, alice)
    assert texts(bob) == ["before", "after 1", "after 2"]
    assert statuses(alice) == ["delivered"] * 3
    a_active = alice.db.one("SELECT base_key FROM sessions WHERE active = 1")[0]
    b_active = bob.db.one("SELECT base_key FROM sessions WHERE active = 1")[0]
    assert a_active == b_active
    # the conversation goes on in the new session
    bob.send_text(a_key, "and on")
    alice.send_text(b_key, "and on too")
    exchange(alice, bob)
    assert texts(alice) == ["and on"] and texts(bob)[-1] == "and on too"


def test_a_session_against_a_prekey_the_contact_deleted_heals(pair):
    """Alice starts a session from a record whose signed prekey Bob has since
    deleted: every message in it is refused, Bob asks for a new session, and
    the messages arrive in it."""
    alice, bob, clock = pair
    b_key = bob.identity.public_key
    stale = record_of(bob)
    clock.now += 8 * 24 * 3600
    bob.prekeys.current_signed()
    clock.now += RETIRED_PREKEY_KEPT + 8 * 24 * 3600
    bob.prekeys.current_signed()
    assert bob.prekeys.signed_private(stale.signed_prekey.prekey_id) is None
    alice.send_text(b_key, "from a stale record")
    alice.encrypt_queued(b_key, stale)
    flush(alice, bob)
    assert statuses(alice) == ["failed"]
    exchange(bob, alice)
    assert texts(bob) == ["from a stale record"]
    assert statuses(alice) == ["delivered"]


def test_resets_are_rate_limited(pair):
    alice, bob, clock = pair
    b_key = bob.identity.public_key
    alice.send_text(b_key, "x")
    exchange(alice, bob)
    bob.db.execute("DELETE FROM sessions")
    for i in range(5):
        alice.send_text(b_key, f"unreadable {i}")
        flush(alice, bob)
    resets = bob.db.one("SELECT count(*) FROM pending_out")[0]
    assert resets == 1
    clock.now += 61
    alice.send_text(b_key, "later")
    flush(alice, bob)
    assert bob.db.one("SELECT count(*) FROM pending_out")[0] == 2


def test_failed_messages_are_sent_again_a_few_times_when_the_contact_is_in_touch(pair):
    alice, bob, _ = pair
    b_key = bob.identity.public_key
    alice.send_text(b_key, "refused")
    alice.encrypt_queued(b_key, record_of(bob))
    alice.refused([d for d, _ in alice.pending_envelopes(b_key)], "refused")
    for _ in range(MAX_AUTO_RESENDS):
        assert alice.retry_failed(b_key) == 1
        alice.encrypt_queued(b_key)
        assert statuses(alice) == ["pending"]
        alice.refused([d for d, _ in alice.pending_envelopes(b_key)], "refused again")
        assert statuses(alice) == ["failed"]
    assert alice.retry_failed(b_key) == 0  # given up: it stays failed, with its reason
    assert [m["reason"] for m in alice.inbox()] == ["refused again"]


def test_a_message_from_the_contact_sends_failed_ones_again(pair):
    """A refusal that was not about the session (the contact had not added us
    yet, say): the next message from the contact shows they accept us now."""
    alice, bob, _ = pair
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "hello")
    exchange(alice, bob)
    alice.send_text(b_key, "refused once")
    alice.encrypt_queued(b_key)
    alice.refused([d for d, _ in alice.pending_envelopes(b_key)], "refused")
    assert statuses(alice) == ["delivered", "failed"]
    bob.send_text(a_key, "I am here")
    exchange(bob, alice)
    assert texts(bob) == ["hello", "refused once"]
    assert statuses(alice) == ["delivered", "delivered"]


def test_messages_not_delivered_in_30_days_fail_and_say_so(pair):
    alice, bob, clock = pair
    b_key = bob.identity.public_key
    alice.send_text(b_key, "to a contact gone for good")
    alice.encrypt_queued(b_key, record_of(bob))
    alice.stored([d for d, _ in alice.pending_envelopes(b_key)])  # a mailbox has it
    clock.now += MESSAGE_TTL - 10
    assert alice.expire_undelivered() == 0
    clock.now += 20
    assert alice.expire_undelivered() == 1
    (message,) = alice.inbox()
    assert message["status"] == "failed"
    assert message["reason"] == "not delivered within 30 days"
    assert alice.pending_envelopes(b_key) == []


def test_text_limits_are_one_documented_limit(pair):
    alice, bob, _ = pair
    b_key = bob.identity.public_key
    with pytest.raises(LocalProtocolError, match="too long"):
        alice.send_text(b_key, "é" * (MAX_TEXT_BYTES // 2 + 1))
    with pytest.raises(LocalProtocolError, match="empty"):
        alice.send_text(b_key, "")
    longest = "é" * (MAX_TEXT_BYTES // 2)
    with_nul = "before\x00after"
    alice.send_text(b_key, longest)
    alice.send_text(b_key, with_nul)
    alice.encrypt_queued(b_key, record_of(bob))
    sizes = [len(e) for _, e in alice.pending_envelopes(b_key)]
    assert max(sizes) <= 65536 + 97  # the longest text still pads to the 64 KiB bucket
    flush(alice, bob)
    assert texts(bob) == [longest, with_nul]  # whole, NUL and all


# -- contacts ------------------------------------------------------------------------


def test_contacts_are_found_by_label_name_or_id(pair):
    alice, bob, _ = pair
    bob_id = bob.identity.identity_id.hex()
    assert alice.contacts.find("bobby").identity_id == bob_id
    assert alice.contacts.find("BOBBY").identity_id == bob_id
    assert alice.contacts.find("bob").identity_id == bob_id  # the name, when unique
    assert alice.contacts.find(bob_id[:10]).identity_id == bob_id
    with pytest.raises(UnknownContact, match="unknown contact 'carol'"):
        alice.contacts.find("carol")


def test_labels_are_unique_and_re_adding_never_renames(tmp_path):
    clock = Clock()
    alice, bob, bob2 = (make(tmp_path, n, clock) for n in ("alice", "bob", "bob2"))
    code = ContactCode(bob.identity.public_key, "bob")
    contact, added = alice.contacts.add(code, None, clock())
    assert added and contact.label == "bob"
    again, added = alice.contacts.add(code, None, clock())
    assert not added and again.label == "bob"
    with pytest.raises(ContactExists, match="already a contact; to rename"):
        alice.contacts.add(code, "robert", clock())
    assert alice.contacts.find("bob").label == "bob"
    # a second contact may not take the first one's label, as a name or an alias
    other = ContactCode(bob2.identity.public_key, "Bob")
    with pytest.raises(ContactExists, match="already called 'bob'"):
        alice.contacts.add(other, None, clock())
    with pytest.raises(ContactExists, match="already called 'bob'"):
        alice.contacts.add(ContactCode(bob2.identity.public_key, "x"), "bob", clock())
    second, _ = alice.contacts.add(other, "bob at work", clock())
    assert alice.contacts.find("bob").identity_key == bob.identity.public_key
    assert alice.contacts.find("bob at work").identity_key == bob2.identity.public_key
    # renaming checks the same
    with pytest.raises(ContactExists):
        alice.contacts.rename(second, "BOB")
    renamed = alice.contacts.rename(second, "robert")
    assert alice.contacts.find("robert").identity_key == renamed.identity_key


def test_a_stale_label_index_never_finds_the_wrong_contact(tmp_path):
    """Labels are looked up through an index kept in memory.  Another book on
    the same database (another process, or a re-key that bypasses the index)
    changes the contacts under it: every answer must still be the table's."""
    clock = Clock()
    alice, bob, carol = (make(tmp_path, n, clock) for n in ("alice", "bob", "carol"))
    other = ContactBook(alice.db)  # changes the contacts behind alice.contacts' back
    bob_code = ContactCode(bob.identity.public_key, "bob")
    other.add(bob_code, "bobby", clock())
    assert alice.contacts.find("bobby").identity_key == bob.identity.public_key  # index built
    other.rename(other.get(bob.identity.public_key), "robert")
    with pytest.raises(UnknownContact):
        alice.contacts.find("bobby")
    assert alice.contacts.find("robert").identity_key == bob.identity.public_key
    other.remove(other.get(bob.identity.public_key))
    other.add(ContactCode(carol.identity.public_key, "carol"), "robert", clock())
    assert alice.contacts.find("robert").identity_key == carol.identity.public_key
    # the index is rebuilt from a read of the table, and then serves again
    assert alice.contacts.find("ROBERT").identity_key == carol.identity.public_key


def test_an_address_in_a_code_must_be_dialable(pair):
    alice, _, clock = pair
    carol = make(Path(alice.db.path).parent.parent, "carol", clock)
    for address in ("/ip4/999.0.0.1/tcp/1/p2p/x", "/garbage", "/ip4/127.0.0.1/tcp/4001"):
        code = ContactCode(carol.identity.public_key, "carol", (address,))
        with pytest.raises(PigeonError, match="cannot be dialled"):
            alice.contacts.add(code, None, clock())
    with pytest.raises(UnknownContact):
        alice.contacts.find("carol")


def test_removing_a_contact_forgets_everything_about_it(pair):
    alice, bob, _ = pair
    b_key = bob.identity.public_key
    alice.send_text(b_key, "one")
    exchange(alice, bob)
    alice.send_text(b_key, "unsent")
    removed = alice.contacts.remove(alice.contacts.find("bobby"))
    assert removed == {"messages": 2, "unsent": 1}
    for table, column in (
        ("messages", "contact"),
        ("sessions", "identity_key"),
        ("pending_out", "contact"),
        ("outbox", "contact"),
    ):
        assert alice.db.one(f"SELECT count(*) FROM {table} WHERE {column} = ?", (b_key,))[0] == 0
    with pytest.raises(UnknownContact):
        alice.contacts.find("bobby")
