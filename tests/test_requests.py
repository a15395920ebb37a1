"""Message requests under a flood: whatever strangers send, what a node keeps
of them stays within its bounds (node/requests.py), over a real database,
and a contact's messages still arrive."""

from __future__ import annotations

import os
from pathlib import Path

from nacl.signing import SigningKey
from test_conversations import Clock, befriend, exchange, make, record_of, texts

from helpers import deposit_token
from pigeon.node import requests
from pigeon.node.conversations import Conversations
from pigeon.protocol import (
    AppMessage,
    DecryptError,
    IdentityKeyPair,
    Introduction,
    MailboxToken,
    Session,
    Text,
    seal,
)


class Stranger:
    """An identity that writes to someone who has not added it, as its node would."""

    def __init__(self, target: Conversations, name: str) -> None:
        self.identity = IdentityKeyPair.generate(os.urandom)
        self.key = target.identity.public_key
        self.session = Session.initiate(self.identity, record_of(target).bundle(None), os.urandom)
        self.lamport = 0
        self.first = [self.envelope(Introduction(name))]

    def envelope(self, content: Text | Introduction | MailboxToken) -> bytes:
        self.lamport += 1
        app = AppMessage.new(content, lamport=self.lamport, sent_at_ms=0, random=os.urandom)
        return seal(self.identity, self.key, self.session.encrypt(app.encode()), os.urandom)


def test_ten_thousand_stranger_envelopes_stay_within_bounds(tmp_path: Path) -> None:
    clock = Clock()
    bob = make(tmp_path, "bob", clock)
    alice = make(tmp_path, "alice", clock)
    befriend(alice, bob)
    befriend(bob, alice)
    strangers = [Stranger(bob, f"s{i}") for i in range(250)]
    envelopes = []
    for i, stranger in enumerate(strangers):
        envelopes += stranger.first
        envelopes += [stranger.envelope(Text(f"{i}: hello {n}")) for n in range(39)]
    assert len(envelopes) == 10_000
    refused = 0
    for start in range(0, len(envelopes), 200):
        clock.now += 1
        results = bob.accept_envelopes(envelopes[start : start + 200])
        refused += sum(isinstance(r, DecryptError) for r in results)

    kept = bob.requests.all()
    assert len(kept) == requests.MAX_REQUESTS
    # The newest strangers stay; the oldest made room for them.
    assert {r.name for r in kept} == {f"s{i}" for i in range(150, 250)}
    for request in kept:
        assert len(request.messages) <= requests.ENVELOPES_EACH - 1  # the introduction was one
        assert request.refused == 40 - requests.ENVELOPES_EACH
    assert refused == 250 * (40 - requests.ENVELOPES_EACH)
    db = bob.db
    cap = requests.MAX_REQUESTS * requests.ENVELOPES_EACH
    assert db.one("SELECT count(*) FROM request_messages")[0] <= cap
    assert db.one("SELECT count(*) FROM sessions")[0] <= requests.MAX_REQUESTS
    assert db.one("SELECT count(*) FROM received_envelopes WHERE stranger IS NOT NULL")[0] <= cap
    assert db.one("SELECT count(*) FROM pending_out")[0] == 0  # nothing said to any of them

    # Through it all, a contact's message arrives.
    alice.send_text(bob.identity.public_key, "still there?")
    exchange(alice, bob)
    assert texts(bob) == ["still there?"]


def test_a_stranger_s_texts_are_bounded_in_bytes_too(tmp_path: Path) -> None:
    clock = Clock()
    bob = make(tmp_path, "bob", clock)
    stranger = Stranger(bob, "big")
    big = "x" * 40_000
    results = bob.accept_envelopes(
        [*stranger.first, stranger.envelope(Text(big)), stranger.envelope(Text(big))]
    )
    assert not isinstance(results[1], DecryptError)
    assert isinstance(results[2], DecryptError)
    (request,) = bob.requests.all()
    assert len(request.messages) == 1 and request.refused == 1
    # The list shows the first lines, not the whole text.
    assert len(str(request.messages[0]["text"])) == requests.PREVIEW_CHARS


def test_a_stranger_that_cannot_be_read_leaves_nothing(tmp_path: Path) -> None:
    clock = Clock()
    bob = make(tmp_path, "bob", clock)
    stranger = Stranger(bob, "odd")
    good = stranger.envelope(Text("hi"))
    damaged = bytearray(good)
    damaged[-20] ^= 1
    assert isinstance(bob.accept_envelopes([bytes(damaged)])[0], DecryptError)
    assert bob.requests.all() == []
    assert bob.db.one("SELECT count(*) FROM sessions")[0] == 0


def test_a_stranger_s_deposit_token_is_kept_for_when_it_is_accepted(tmp_path: Path) -> None:
    """Its sender sends one a week: dropping it would make the new contact
    pay proof of work for every deposit until the next."""
    clock = Clock()
    bob = make(tmp_path, "bob", clock)
    stranger = Stranger(bob, "tokened")
    token = deposit_token(SigningKey.generate(), expires_at=clock.now + 3600)
    bob.accept_envelopes([*stranger.first, stranger.envelope(MailboxToken(token))])
    assert bob.db.one("SELECT count(*) FROM contacts")[0] == 0
    bob.accept_request(stranger.identity.public_key)
    assert bob.deposit_token(stranger.identity.public_key) == token
