"""``pigeon demo``: a conversation between two identities, end to end through
the protocol core, printed step by step.

Bob publishes a signed record and goes offline; Alice starts a session from
his bundle and sends sealed envelopes that arrive out of order; they talk in
both directions; both compute the same safety number.  (When the node lands,
this grows into real local nodes.)
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable

from pigeon.protocol import (
    AppMessage,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    Session,
    SignedPrekey,
    Text,
    format_safety_number,
    identity_id,
    open_envelope,
    safety_number,
    seal,
)
from pigeon.protocol.crypto import x25519_keypair


def _text(payload: bytes) -> str:
    content = AppMessage.decode(payload).content
    return content.text if isinstance(content, Text) else repr(content)


def run_demo(out: Callable[[str], None] = print) -> int:
    now = int(time.time())
    alice = IdentityKeyPair.generate(os.urandom)
    bob = IdentityKeyPair.generate(os.urandom)
    out(f"alice  identity {alice.identity_id.hex()}")
    out(f"bob    identity {bob.identity_id.hex()}")

    # Bob publishes his record and one one-time prekey, then goes offline.
    spk_private, spk_public = x25519_keypair(os.urandom)
    otk, otk_private = OneTimePrekey.create(bob, 1, os.urandom)
    record = DirectoryRecord(
        bob.public_key, "bob", 1, now, now + 7 * 86400, SignedPrekey(1, spk_public, now)
    ).sign(bob)
    out(f"bob    published a signed record ({len(record)} bytes) and went offline")

    # Alice verifies it against the key from Bob's contact code and starts a session.
    bundle = DirectoryRecord.verify(record, now=now, identity_key=bob.public_key).bundle(otk)
    to_bob = Session.initiate(alice, bundle, os.urandom)
    lamport = 0
    queued = []
    for text in ("Hi Bob, it's Alice.", "Are you there?", "Call me when you're back."):
        lamport += 1
        message = AppMessage.new(Text(text), lamport=lamport, sent_at_ms=now, random=os.urandom)
        queued.append(seal(alice, bob.public_key, to_bob.encrypt(message.encode()), os.urandom))
        out(f"alice  -> sealed {len(queued[-1])}-byte envelope: {text!r}")

    # Bob comes back; the envelopes arrive in a scrambled order.
    random.shuffle(queued)
    out("bob    is back online; envelopes arrive out of order")
    to_alice: Session | None = None
    for envelope in queued:
        opened = open_envelope(bob, envelope)
        incoming = IncomingMessage.decode(opened.payload)
        if to_alice is None:
            to_alice, payload = Session.respond(
                bob,
                incoming,
                {1: spk_private}.get,
                {1: otk_private}.get,
                os.urandom,
            )
        else:
            payload = to_alice.decrypt(incoming)
        out(f"bob    <- from {identity_id(opened.sender_key).hex()[:8]}: {_text(payload)!r}")
    assert to_alice is not None

    # Replies cross in both directions.
    for sender, receiver, session, peer_session, text in (
        ("bob", "alice", to_alice, to_bob, "Back now. Safety number check?"),
        ("alice", "bob", to_bob, to_alice, "Sure, reading mine out."),
        ("bob", "alice", to_alice, to_bob, "Matches. Talk soon!"),
    ):
        lamport += 1
        message = AppMessage.new(Text(text), lamport=lamport, sent_at_ms=now, random=os.urandom)
        receiver_key = alice.public_key if receiver == "alice" else bob.public_key
        sender_key = bob if sender == "bob" else alice
        envelope = seal(sender_key, receiver_key, session.encrypt(message.encode()), os.urandom)
        me = alice if receiver == "alice" else bob
        payload = peer_session.decrypt(IncomingMessage.decode(open_envelope(me, envelope).payload))
        out(f"{receiver:6} <- {sender}: {_text(payload)!r}")

    ours = safety_number(alice.public_key, alice.identity_id, bob.public_key, bob.identity_id)
    theirs = safety_number(bob.public_key, bob.identity_id, alice.public_key, alice.identity_id)
    out(f"alice  safety number {format_safety_number(ours)}")
    out(f"bob    safety number {format_safety_number(theirs)}")
    if ours != theirs:
        out("safety numbers differ: something is wrong")
        return 1
    out("safety numbers match: no one sits in between")
    return 0
