"""Conversations over the database: identities, contacts, sessions, messages.

Everything here is synchronous and touches only the database and the
protocol core, so it can be tested without a network.  The rule that keeps
messages safe: a ratchet step and what it produced (a message row, an outbox
entry, a received-envelope mark) are committed in one transaction, and
sessions are always re-read from the database, never kept ahead of it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pigeon.protocol import (
    AppMessage,
    ContactCode,
    DecryptError,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    PigeonError,
    ProtocolError,
    Receipt,
    ReceiptType,
    Session,
    SignedPrekey,
    Text,
    open_envelope,
    seal,
)
from pigeon.protocol.crypto import Random, sha256, x25519_keypair
from pigeon.protocol.keys import identity_id

from .storage import Database

log = logging.getLogger("pigeon.conversations")

SIGNED_PREKEY_LIFETIME = 7 * 24 * 3600
RETIRED_PREKEY_KEPT = 14 * 24 * 3600


class UnknownContact(PigeonError):
    pass


class NoRoute(PigeonError):
    """We do not (yet) know how to reach this contact."""


@dataclass(frozen=True)
class Contact:
    identity_key: bytes
    identity_id: str
    name: str
    alias: str | None
    last_seen: int | None
    record: DirectoryRecord | None

    @property
    def label(self) -> str:
        return self.alias or self.name


@dataclass(frozen=True)
class Delivered:
    """What accepting an envelope produced."""

    sender: bytes
    message: AppMessage | None  # None for a duplicate or an ignorable kind
    duplicate: bool = False


def now_s() -> int:
    return int(time.time())


def now_ms() -> int:
    return int(time.time() * 1000)


class Conversations:
    def __init__(self, db: Database, random: Random, clock: Callable[[], int] = now_s) -> None:
        self.db = db
        self.random = random
        self.clock = clock
        seed = db.get_meta("identity_seed")
        if seed is None:
            raise PigeonError("this database holds no identity (run: pigeon init)")
        self.identity = IdentityKeyPair(seed)
        self.name = (db.get_meta("name") or b"").decode()

    # -- setup ----------------------------------------------------------------

    @staticmethod
    def initialise(db: Database, name: str, random: Random) -> None:
        with db.transaction():
            db.set_meta("identity_seed", random(32))
            db.set_meta("device_seed", random(32))
            db.set_meta("name", name.encode())
            db.set_meta("record_sequence", b"0")

    @property
    def device_seed(self) -> bytes:
        seed = self.db.get_meta("device_seed")
        assert seed is not None
        return seed

    def next_record_sequence(self) -> int:
        with self.db.transaction():
            sequence = int(self.db.get_meta("record_sequence") or b"0") + 1
            self.db.set_meta("record_sequence", str(sequence).encode())
        return sequence

    # -- signed prekeys -----------------------------------------------------------

    def current_signed_prekey(self) -> SignedPrekey:
        """The signed prekey to publish, rotated when older than 7 days."""
        now = self.clock()
        with self.db.transaction():
            row = self.db.one(
                "SELECT id, public, created_at FROM signed_prekeys "
                "WHERE retired_at IS NULL ORDER BY id DESC LIMIT 1"
            )
            if row is not None and now - row[2] < SIGNED_PREKEY_LIFETIME:
                return SignedPrekey(row[0], bytes(row[1]), row[2])
            if row is not None:
                self.db.execute(
                    "UPDATE signed_prekeys SET retired_at = ? WHERE id = ?", (now, row[0])
                )
            self.db.execute(
                "DELETE FROM signed_prekeys WHERE retired_at IS NOT NULL AND retired_at < ?",
                (now - RETIRED_PREKEY_KEPT,),
            )
            private, public = x25519_keypair(self.random)
            prekey_id = (row[0] if row else 0) + 1
            self.db.execute(
                "INSERT INTO signed_prekeys (id, private, public, created_at) VALUES (?, ?, ?, ?)",
                (prekey_id, private, public, now),
            )
            return SignedPrekey(prekey_id, public, now)

    def _signed_prekey_private(self, prekey_id: int) -> bytes | None:
        row = self.db.one("SELECT private FROM signed_prekeys WHERE id = ?", (prekey_id,))
        return None if row is None else bytes(row[0])

    def new_one_time_prekeys(self, count: int, mailbox: bytes) -> list[OneTimePrekey]:
        """Make ``count`` one-time prekeys to leave with ``mailbox``; keep their private keys."""
        with self.db.transaction():
            first = int(self.db.one("SELECT coalesce(max(id), 0) FROM one_time_prekeys")[0]) + 1
            prekeys = []
            for prekey_id in range(first, first + count):
                prekey, private = OneTimePrekey.create(self.identity, prekey_id, self.random)
                self.db.execute(
                    "INSERT INTO one_time_prekeys (id, private, public, signature, created_at,"
                    " mailbox) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        prekey_id,
                        private,
                        prekey.public_key,
                        prekey.signature,
                        self.clock(),
                        mailbox,
                    ),
                )
                prekeys.append(prekey)
        return prekeys

    def _one_time_prekey_private(self, prekey_id: int) -> bytes | None:
        row = self.db.one("SELECT private FROM one_time_prekeys WHERE id = ?", (prekey_id,))
        return None if row is None else bytes(row[0])

    # -- contacts --------------------------------------------------------------------

    def add_contact(self, code: ContactCode, alias: str | None = None) -> Contact:
        if code.identity_key == self.identity.public_key:
            raise PigeonError("that is your own contact code")
        key = code.identity_key
        existing = self.db.one("SELECT alias FROM contacts WHERE identity_key = ?", (key,))
        with self.db.transaction():
            if alias is not None:
                clash = self.db.one(
                    "SELECT 1 FROM contacts WHERE alias = ? AND identity_key != ?", (alias, key)
                )
                if clash:
                    raise PigeonError(f"another contact is already called {alias!r}")
            if existing is None:
                self.db.execute(
                    "INSERT INTO contacts (identity_key, identity_id, name, alias, hint_addresses,"
                    " added_at) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        key,
                        identity_id(key).hex(),
                        code.name,
                        alias,
                        json.dumps(list(code.addresses)),
                        self.clock(),
                    ),
                )
            else:
                self.db.execute(
                    "UPDATE contacts SET name = ?, alias = coalesce(?, alias), hint_addresses = ?"
                    " WHERE identity_key = ?",
                    (code.name, alias, json.dumps(list(code.addresses)), key),
                )
        return self.contact(key)

    def _contact_from_row(self, row: tuple) -> Contact:  # type: ignore[type-arg]
        record = None
        if row[5] is not None:
            try:
                record = DirectoryRecord.verify(bytes(row[5]), now=None, identity_key=bytes(row[0]))
            except ProtocolError:
                record = None
        return Contact(bytes(row[0]), row[1], row[2], row[3], row[4], record)

    _CONTACT_COLUMNS = "identity_key, identity_id, name, alias, last_seen, record"

    def contact(self, key: bytes) -> Contact:
        row = self.db.one(
            f"SELECT {self._CONTACT_COLUMNS} FROM contacts WHERE identity_key = ?", (key,)
        )
        if row is None:
            raise UnknownContact("unknown contact")
        return self._contact_from_row(row)

    def find_contact(self, name: str) -> Contact:
        """By alias, name, identity ID (or a unique prefix of it) or contact code."""
        if name.startswith("pigeon:"):
            return self.contact(ContactCode.parse(name).identity_key)
        rows = self.db.all(
            f"SELECT {self._CONTACT_COLUMNS} FROM contacts WHERE alias = ? OR name = ? "
            "OR identity_id = ?",
            (name, name, name.lower()),
        )
        if not rows and len(name) >= 6:
            rows = self.db.all(
                f"SELECT {self._CONTACT_COLUMNS} FROM contacts WHERE identity_id LIKE ?",
                (name.lower() + "%",),
            )
        if len(rows) > 1:
            exact = [r for r in rows if r[3] == name]
            if len(exact) == 1:
                rows = exact
            else:
                raise UnknownContact(f"{name!r} matches several contacts; use an alias or ID")
        if not rows:
            raise UnknownContact(f"unknown contact {name!r} (see: pigeon contacts list)")
        return self._contact_from_row(rows[0])

    def contacts(self) -> list[Contact]:
        return [
            self._contact_from_row(r)
            for r in self.db.all(f"SELECT {self._CONTACT_COLUMNS} FROM contacts ORDER BY name")
        ]

    def hint_addresses(self, key: bytes) -> list[str]:
        row = self.db.one("SELECT hint_addresses FROM contacts WHERE identity_key = ?", (key,))
        return [] if row is None else list(json.loads(row[0]))

    def store_record(self, key: bytes, data: bytes) -> DirectoryRecord | None:
        """Keep a verified record for a contact unless we hold a newer one."""
        record = DirectoryRecord.verify(data, now=self.clock(), identity_key=key)
        with self.db.transaction():
            row = self.db.one("SELECT record_sequence FROM contacts WHERE identity_key = ?", (key,))
            if row is None:
                raise UnknownContact("unknown contact")
            if record.sequence < row[0]:
                return None
            self.db.execute(
                "UPDATE contacts SET record = ?, record_sequence = ? WHERE identity_key = ?",
                (data, record.sequence, key),
            )
        return record

    def saw(self, key: bytes) -> None:
        self.db.execute(
            "UPDATE contacts SET last_seen = ? WHERE identity_key = ?", (self.clock(), key)
        )

    # -- sending --------------------------------------------------------------------------

    def _active_session(self, key: bytes) -> Session | None:
        row = self.db.one(
            "SELECT state FROM sessions WHERE identity_key = ? AND active = 1", (key,)
        )
        return None if row is None else Session.deserialize(bytes(row[0]), self.random)

    def _save_session(self, session: Session, *, active: bool | None = None) -> None:
        now = self.clock()
        if active:
            self.db.execute(
                "UPDATE sessions SET active = 0 WHERE identity_key = ? AND base_key != ?",
                (session.remote_key, session.base_key),
            )
        self.db.execute(
            "INSERT INTO sessions (base_key, identity_key, state, active, updated_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (base_key) DO UPDATE SET state = excluded.state,"
            " updated_at = excluded.updated_at"
            + (", active = excluded.active" if active is not None else ""),
            (session.base_key, session.remote_key, session.serialize(), int(bool(active)), now),
        )

    def needs_bundle(self, key: bytes) -> bool:
        return self._active_session(key) is None

    def _next_lamport(self, key: bytes) -> int:
        row = self.db.one("SELECT lamport FROM contacts WHERE identity_key = ?", (key,))
        lamport = int(row[0]) + 1
        self.db.execute("UPDATE contacts SET lamport = ? WHERE identity_key = ?", (lamport, key))
        return lamport

    def _enqueue(
        self,
        key: bytes,
        app: AppMessage,
        record: DirectoryRecord | None,
        one_time_prekey: OneTimePrekey | None = None,
    ) -> bytes:
        """Encrypt ``app`` for ``key`` and queue the envelope (inside a transaction)."""
        session = self._active_session(key)
        if session is None:
            if record is None:
                raise NoRoute("no session and no directory record for this contact yet")
            session = Session.initiate(self.identity, record.bundle(one_time_prekey), self.random)
            new = True
        else:
            new = False
        envelope = seal(self.identity, key, session.encrypt(app.encode()), self.random)
        self._save_session(session, active=True if new else None)
        digest = sha256(envelope)
        self.db.execute(
            "INSERT INTO outbox (digest, contact, message_id, envelope) VALUES (?, ?, ?, ?)",
            (digest, key, app.message_id, envelope),
        )
        return digest

    def send_text(
        self,
        key: bytes,
        text: str,
        record: DirectoryRecord | None = None,
        one_time_prekey: OneTimePrekey | None = None,
    ) -> AppMessage:
        """Queue a text: the message row, ratchet step and envelope commit together."""
        with self.db.transaction():
            app = AppMessage.new(
                Text(text), lamport=self._next_lamport(key), sent_at_ms=now_ms(), random=self.random
            )
            self._enqueue(key, app, record, one_time_prekey)
            self.db.execute(
                "INSERT INTO messages (id, contact, direction, text, lamport, sent_at, status)"
                " VALUES (?, ?, 'out', ?, ?, ?, 'pending')",
                (app.message_id, key, text, app.lamport, app.sent_at_ms),
            )
        return app

    def _enqueue_receipt(self, key: bytes, kind: ReceiptType, ids: list[bytes]) -> None:
        app = AppMessage.new(
            Receipt(kind, tuple(ids)),
            lamport=self._next_lamport(key),
            sent_at_ms=now_ms(),
            random=self.random,
        )
        self._enqueue(key, app, None)

    def pending_envelopes(self, key: bytes, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        return [
            (bytes(r[0]), bytes(r[1]))
            for r in self.db.all(
                "SELECT digest, envelope FROM outbox WHERE contact = ? ORDER BY seq LIMIT ?",
                (key, limit),
            )
        ]

    def contacts_with_pending(self) -> list[bytes]:
        return [bytes(r[0]) for r in self.db.all("SELECT DISTINCT contact FROM outbox")]

    def acknowledged(self, digests: list[bytes]) -> None:
        """The recipient (or a mailbox) holds these envelopes: forget them."""
        with self.db.transaction():
            for digest in digests:
                row = self.db.one("SELECT message_id FROM outbox WHERE digest = ?", (digest,))
                if row is None:
                    continue
                self.db.execute("DELETE FROM outbox WHERE digest = ?", (digest,))
                if row[0] is not None:
                    self.db.execute(
                        "UPDATE messages SET status = 'sent' WHERE id = ? AND status = 'pending'",
                        (row[0],),
                    )

    # -- receiving ------------------------------------------------------------------------

    def accept_envelopes(self, envelopes: list[bytes]) -> list[Delivered | PigeonError]:
        """Open, decrypt and store a batch of envelopes in one transaction.

        Each envelope is all-or-nothing on its own (a savepoint): one that is
        not valid for us is returned as its error and leaves no trace.  Texts
        are answered with one delivery receipt per sender, queued in the same
        transaction, so a crash never leaves a stored message unreceipted.
        """
        results: list[Delivered | PigeonError] = []
        texts: dict[bytes, list[bytes]] = {}
        with self.db.transaction():
            for envelope in envelopes:
                try:
                    with self.db.savepoint():
                        result = self._accept(envelope)
                except PigeonError as error:
                    results.append(error)
                    continue
                results.append(result)
                if result.message is not None and isinstance(result.message.content, Text):
                    texts.setdefault(result.sender, []).append(result.message.message_id)
            for sender, ids in texts.items():
                self._enqueue_receipt(sender, ReceiptType.DELIVERED, ids)
        return results

    def _accept(self, envelope: bytes) -> Delivered:
        digest = sha256(envelope)
        if self.db.one("SELECT 1 FROM received_envelopes WHERE digest = ?", (digest,)):
            return Delivered(b"", None, duplicate=True)
        opened = open_envelope(self.identity, envelope)
        sender = opened.sender_key
        if self.db.one("SELECT 1 FROM contacts WHERE identity_key = ?", (sender,)) is None:
            raise DecryptError("envelope from an identity that is not a contact")
        plaintext = self._decrypt(sender, IncomingMessage.decode(opened.payload))
        self.db.execute(
            "INSERT INTO received_envelopes (digest, received_at) VALUES (?, ?)",
            (digest, self.clock()),
        )
        app = AppMessage.decode(plaintext)
        stored = self._store_incoming(sender, app)
        self.db.execute(
            "UPDATE contacts SET last_seen = ?, lamport = max(lamport, ?) WHERE identity_key = ?",
            (self.clock(), app.lamport, sender),
        )
        return Delivered(sender, app if stored else None, duplicate=not stored)

    def _decrypt(self, sender: bytes, incoming: IncomingMessage) -> bytes:
        header = incoming.prekey
        if header is not None:
            if header.identity_key != sender:
                raise DecryptError()
            row = self.db.one(
                "SELECT state FROM sessions WHERE base_key = ? AND identity_key = ?",
                (header.base_key, sender),
            )
            if row is not None:
                session = Session.deserialize(bytes(row[0]), self.random)
                plaintext = session.decrypt(incoming)
                self._save_session(session)
                return plaintext
            session, plaintext = Session.respond(
                self.identity,
                incoming,
                self._signed_prekey_private,
                self._one_time_prekey_private,
                self.random,
            )
            if header.one_time_prekey_id:
                self.db.execute(
                    "DELETE FROM one_time_prekeys WHERE id = ?", (header.one_time_prekey_id,)
                )
            self._save_session(session, active=not self._we_win_simultaneous_start(sender))
            return plaintext
        rows = self.db.all(
            "SELECT state FROM sessions WHERE identity_key = ?"
            " ORDER BY active DESC, updated_at DESC",
            (sender,),
        )
        for (state,) in rows:
            session = Session.deserialize(bytes(state), self.random)
            try:
                plaintext = session.decrypt(incoming)
            except DecryptError:
                continue
            self._save_session(session)
            return plaintext
        raise DecryptError()

    def _we_win_simultaneous_start(self, sender: bytes) -> bool:
        """Both sides started a session at once: the one started by the lower
        identity key wins on both sides, so they converge on one session."""
        ours = self._active_session(sender)
        return ours is not None and ours.pending is not None and self.identity.public_key < sender

    def _store_incoming(self, sender: bytes, app: AppMessage) -> bool:
        content = app.content
        if isinstance(content, Text):
            exists = self.db.one("SELECT 1 FROM messages WHERE id = ?", (app.message_id,))
            if exists:
                return False
            self.db.execute(
                "INSERT INTO messages (id, contact, direction, text, lamport, sent_at,"
                " received_at, status) VALUES (?, ?, 'in', ?, ?, ?, ?, 'received')",
                (app.message_id, sender, content.text, app.lamport, app.sent_at_ms, now_ms()),
            )
            return True
        if isinstance(content, Receipt):
            status = "delivered" if content.receipt_type == ReceiptType.DELIVERED else "read"
            earlier = (
                ("pending", "sent") if status == "delivered" else ("pending", "sent", "delivered")
            )
            for message_id in content.message_ids:
                self.db.execute(
                    "UPDATE messages SET status = ? WHERE id = ? AND contact = ?"
                    f" AND direction = 'out' AND status IN ({', '.join('?' * len(earlier))})",
                    (status, message_id, sender, *earlier),
                )
            return True
        log.info("ignored a message of kind %s from %s", type(content).__name__, sender.hex()[:8])
        return True

    # -- reading --------------------------------------------------------------------------------

    def inbox(self, key: bytes | None = None, after: int = 0) -> list[dict[str, object]]:
        sql = (
            "SELECT m.rowid, m.id, m.contact, c.identity_id, coalesce(c.alias, c.name), m.text,"
            " m.sent_at, m.received_at, m.direction, m.status, m.lamport"
            " FROM messages m JOIN contacts c ON c.identity_key = m.contact WHERE m.rowid > ?"
        )
        params: tuple[object, ...] = (after,)
        if key is not None:
            sql += " AND m.contact = ?"
            params += (key,)
        sql += " ORDER BY m.contact, m.lamport, m.id"
        out = []
        for row in self.db.all(sql, params):
            out.append(
                {
                    "seq": row[0],
                    "id": bytes(row[1]).hex(),
                    "from": self.identity.identity_id.hex() if row[8] == "out" else row[3],
                    "from_name": self.name if row[8] == "out" else row[4],
                    "to": row[3] if row[8] == "out" else self.identity.identity_id.hex(),
                    "contact_name": row[4],
                    "text": row[5],
                    "sent_at": row[6] / 1000,
                    "received_at": None if row[7] is None else row[7] / 1000,
                    "direction": row[8],
                    "status": row[9],
                    "lamport": row[10],
                }
            )
        return out

    def statuses(self, ids: list[str]) -> dict[str, str]:
        """Current status of the given message IDs (hex)."""
        out = {}
        for message_id in ids:
            row = self.db.one(
                "SELECT status FROM messages WHERE id = ?", (bytes.fromhex(message_id),)
            )
            if row is not None:
                out[message_id] = str(row[0])
        return out

    def unread_incoming(self, key: bytes) -> list[bytes]:
        return [
            bytes(r[0])
            for r in self.db.all(
                "SELECT id FROM messages WHERE contact = ? AND direction = 'in'"
                " AND status = 'received'",
                (key,),
            )
        ]

    def mark_read(self, key: bytes) -> int:
        """Mark a conversation read and queue one read receipt for it."""
        with self.db.transaction():
            ids = self.unread_incoming(key)
            for message_id in ids:
                self.db.execute("UPDATE messages SET status = 'read' WHERE id = ?", (message_id,))
            if ids:
                self._enqueue_receipt(key, ReceiptType.READ, ids)
        return len(ids)
