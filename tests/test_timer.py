"""Disappearing messages over real databases: the timer travels inside the
ratchet, both nodes delete on time, and a text whose time ran out on the
way (in a mailbox) is never shown; a mailbox keeps it no longer either."""

from __future__ import annotations

from pathlib import Path

import pytest
from nacl.signing import SigningKey
from test_conversations import Clock, exchange, flush, friends, record_of, texts

from pigeon.node.mailbox_store import MailboxLimits, MailboxStore
from pigeon.node.storage import Database
from pigeon.protocol import MAX_TIMER, LocalProtocolError


def talk(tmp_path: Path):
    clock = Clock()
    return (*friends(tmp_path, clock), clock)


def test_a_timer_set_by_one_side_deletes_on_both_sides_when_it_runs_out(tmp_path):
    alice, bob, clock = talk(tmp_path)
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.send_text(b_key, "kept")
    alice.set_timer(b_key, 60)
    alice.send_text(b_key, "gone in a minute")
    exchange(alice, bob)
    assert bob.timer(a_key) == 60  # announced inside the ratchet
    bob.send_text(a_key, "mine too")  # his texts carry it as well
    exchange(bob, alice)
    assert texts(bob) == ["kept", "gone in a minute"] and texts(alice) == ["mine too"]
    assert bob.search("minute", 10)

    clock.now += 59
    assert alice.expire() == 0 and bob.expire() == 0
    clock.now += 2
    assert alice.expire() == 2 and bob.expire() == 2
    assert texts(bob) == ["kept"] and texts(bob, "out") == []
    assert texts(alice) == [] and texts(alice, "out") == ["kept"]
    assert bob.search("minute", 10) == []  # the index forgets it too
    for conv in (alice, bob):
        assert conv.db.one("SELECT count(*) FROM pending_out WHERE durable = 1")[0] == 0

    bob.set_timer(a_key, 0)  # off, for both
    exchange(bob, alice)
    assert alice.timer(b_key) == 0
    alice.send_text(b_key, "kept again")
    exchange(alice, bob)
    clock.now += MAX_TIMER
    assert bob.expire() == 0 and "kept again" in texts(bob)
    with pytest.raises(LocalProtocolError):
        alice.set_timer(b_key, MAX_TIMER + 1)


def test_a_text_whose_time_ran_out_on_the_way_is_never_shown(tmp_path):
    alice, bob, clock = talk(tmp_path)
    b_key = bob.identity.public_key
    alice.set_timer(b_key, 30)
    exchange(alice, bob)
    alice.send_text(b_key, "short-lived")
    alice.encrypt_queued(b_key, record_of(bob))
    pending = alice.pending_envelopes(b_key)
    # Its encrypted copy carries the expiry: what a mailbox deposit's TTL comes from.
    (expiry,) = alice.expiries([d for d, _ in pending]).values()
    assert expiry == clock.now + 30
    clock.now += 31  # it waited in a mailbox
    bob.accept_envelopes([e for _, e in pending])
    assert texts(bob) == []
    assert bob.search("short", 10) == []
    # A sender's clock set ahead gains nothing: counted from arrival at the latest.
    clock.now += 1000
    alice.clock = lambda: clock.now + 10_000
    alice.send_text(b_key, "from the future")
    flush(alice, bob)
    clock.now += 31
    bob.expire()
    assert "from the future" not in texts(bob)


def test_a_mailbox_keeps_an_envelope_no_longer_than_its_ttl(tmp_path):
    limits = MailboxLimits()
    store = MailboxStore(Database.create(tmp_path / "box", "pw", fast_kdf=True), limits)
    box = store.register(bytes(SigningKey.generate().verify_key), 1000)
    store.deposit(box, b"\x01" * 200, 30, 1000, b"source")
    store.deposit(box, b"\x02" * 200, 0, 1000, b"source")  # no TTL: the default
    assert len(store.fetch(box, 10)[0]) == 2
    store.expire(1031)
    (left,) = store.fetch(box, 10)[0]
    assert left.envelope == b"\x02" * 200
