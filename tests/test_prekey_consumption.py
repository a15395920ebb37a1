"""A first message that is refused uses up nothing, checked where prekeys are
deleted: through ``Conversations`` on real SQLCipher databases, without a
network.  (``Session.respond`` only reads prekeys through a lookup, so a
test at that level cannot see one being used up.)

Bob has one-time prekeys; Alice's first message uses one of them.  Every
one-bit change of her session message (session kind, X3DH header, ratchet
message) is sealed by Alice for Bob, as her node seals what it sends, so
that each change reaches Bob's session layer instead of failing the
envelope's own check.  Bob's ``accept_envelopes`` must refuse every one and
leave his prekeys, sessions and messages exactly as they were.  Then the
genuine envelope is accepted, and only the one-time prekey it used is gone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pigeon.node.conversations import Accepted, Conversations
from pigeon.node.storage import Database
from pigeon.protocol import (
    ContactCode,
    DirectoryRecord,
    IncomingMessage,
    ProtocolError,
    Text,
    open_envelope,
    seal,
)

NOW = 1_800_000_000


def make(root: Path, name: str) -> Conversations:
    db = Database.create(root / name, "pw", fast_kdf=True)
    Conversations.initialise(db, name, os.urandom)
    return Conversations(db, os.urandom, lambda: NOW)


def record_of(conv: Conversations) -> DirectoryRecord:
    return DirectoryRecord(
        conv.identity.public_key, conv.name, 1, NOW, NOW + 3600, conv.prekeys.current_signed()
    )


def state(conv: Conversations) -> dict[str, list[Any]]:
    """Every row a first message could use up or create.  (Not the contact's row
    or the queue of messages to send: an unreadable envelope from a contact
    rightly queues a request for a new session.)"""
    return {
        "one_time_prekeys": conv.db.all("SELECT * FROM one_time_prekeys ORDER BY id"),
        "signed_prekeys": conv.db.all("SELECT * FROM signed_prekeys ORDER BY id"),
        "sessions": conv.db.all("SELECT * FROM sessions ORDER BY base_key"),
        "messages": conv.db.all("SELECT * FROM messages ORDER BY id"),
        "received_envelopes": conv.db.all("SELECT * FROM received_envelopes ORDER BY digest"),
        "outbox": conv.db.all("SELECT * FROM outbox ORDER BY seq"),
    }


def test_a_refused_first_message_uses_up_no_one_time_prekey(tmp_path: Path):
    alice, bob = make(tmp_path, "alice"), make(tmp_path, "bob")
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    alice.contacts.add(ContactCode(b_key, "bob"), None, NOW)
    bob.contacts.add(ContactCode(a_key, "alice"), None, NOW)
    # eight prekeys, so that a changed prekey ID often names another real one
    offered = bob.prekeys.new_one_time(8, b"\x01" * 16)
    used = offered[2]
    alice.send_text(b_key, "first")
    assert alice.encrypt_queued(b_key, record_of(bob), used) == 1
    *_, (_, genuine) = alice.pending_envelopes(b_key)  # after her introduction

    message = open_envelope(bob.identity, genuine).payload  # Alice's session message
    incoming = IncomingMessage.decode(message)
    assert incoming.prekey is not None and incoming.prekey.one_time_prekey_id == used.prekey_id

    before = state(bob)
    assert [row[0] for row in before["one_time_prekeys"]] == [p.prekey_id for p in offered]
    assert before["sessions"] == [] and before["messages"] == []
    changes = [(index, bit) for index in range(len(message)) for bit in range(8)]
    failures = []
    for index, bit in changes:
        changed = bytearray(message)
        changed[index] ^= 1 << bit
        envelope = seal(alice.identity, b_key, bytes(changed), os.urandom)
        (result,) = bob.accept_envelopes([envelope])
        where = f"byte {index} bit {bit}"
        if not isinstance(result, ProtocolError):
            failures.append(f"{where}: not refused: {result!r}")
        after = state(bob)
        if after != before:
            changed_tables = sorted(name for name in after if after[name] != before[name])
            failures.append(f"{where}: changed {', '.join(changed_tables)}")
            break  # every later check would start from the wrong state
    assert not failures, f"{len(failures)} of {len(changes)} changes:\n" + "\n".join(failures)

    (result,) = bob.accept_envelopes([genuine])
    assert isinstance(result, Accepted) and result.app is not None and result.new
    assert isinstance(result.app.content, Text) and result.app.content.text == "first"
    remaining = [row[0] for row in bob.db.all("SELECT id FROM one_time_prekeys ORDER BY id")]
    assert remaining == [p.prekey_id for p in offered if p is not used]
    assert bob.db.one("SELECT count(*) FROM sessions WHERE identity_key = ?", (a_key,))[0] == 1
