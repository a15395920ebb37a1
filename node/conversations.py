"""Conversations over the database: our identity, sessions, the outgoing
queue and what arrives.

Synchronous; it touches only the database and the protocol core, so it is
tested without a network.  The rules that keep messages safe:

- A ratchet step and what it produced (an outbox envelope, a received
  envelope, a message row) commit in one transaction; sessions are re-read
  from the database, never kept ahead of it.
- Every outgoing message waits in ``pending_out`` until it is encrypted in
  the contact's active session.  Durable kinds (texts) stay there until the
  contact confirms them with a delivery receipt, so when a new session
  replaces the one they were sent in (the contact lost theirs, or could not
  read ours, or started one of their own without answering ours) they are
  encrypted again in the new one.  The contact drops the copies it already
  has by message ID.
- A status is a promise: ``pending`` (queued; ``reason`` says for what when it
  waits), ``sent`` (a peer, the contact's node or a mailbox, stored it),
  ``delivered`` (the contact decrypted it), ``read``, ``failed`` (``reason``
  says why; a failed message is sent again when the contact is next in
  touch, at most :data:`MAX_AUTO_RESENDS` times).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pigeon.protocol import (
    MAX_TIMER,
    AppMessage,
    ContactCode,
    Content,
    DecryptError,
    DirectoryRecord,
    FileOffer,
    IdentityKeyPair,
    IncomingMessage,
    Introduction,
    LocalProtocolError,
    MailboxToken,
    OneTimePrekey,
    PigeonError,
    Random,
    Receipt,
    ReceiptType,
    ResetReason,
    Rotation,
    Session,
    SessionReset,
    Text,
    Timer,
    WebRTCSignal,
    check_text,
    identity_id,
    open_envelope,
    seal,
)
from pigeon.protocol.frames import digest
from pigeon.protocol.mailbox import DepositToken
from pigeon.protocol.messages import SignalType, disappears_at

from .contacts import Contact, ContactBook, ContactExists, UnknownContact, short_id
from .prekeys import Prekeys
from .requests import RequestRefused, Requests
from .storage import Database

log = logging.getLogger("pigeon.conversations")

Clock = Callable[[], float]


def is_durable(content: Content) -> bool:
    """Whether the contact must confirm it: durable messages are sent again in
    a new session until confirmed.  A WebRTC offer or answer is not: it is
    worth nothing once its connection attempt has timed out, and the
    receiver makes a new one."""
    if isinstance(content, WebRTCSignal):
        return content.signal_type == SignalType.BYE
    return isinstance(content, Text | MailboxToken | FileOffer)


MESSAGE_TTL = 30 * 24 * 3600  # as long as a mailbox keeps an envelope
MAX_AUTO_RESENDS = 3  # times a refused message is sent again automatically
RESET_INTERVAL = 60  # seconds between two session resets asked of one contact
TOKEN_EVERY = 7 * 24 * 3600  # a contact gets a fresh deposit token from us this often


class NoSession(PigeonError):
    """Messages wait for a contact we have no session with and no record to start one."""


class NotAContact(DecryptError):
    """An envelope from an identity we have not added.  Outside, it is the same
    opaque refusal as any envelope we cannot read: a stranger learns nothing."""


class Undecryptable(DecryptError):
    """An authentic envelope from a contact that no session of ours can read."""

    def __init__(self, sender: bytes) -> None:
        super().__init__()
        self.sender = sender


@dataclass(frozen=True)
class Incoming:
    """A decrypted message, as handlers see it."""

    sender: bytes
    app: AppMessage
    session: bytes  # the base key of the session it arrived in
    new_session: bool  # the sender started that session with this message
    via: str = "direct"  # how it came: "direct" or "mailbox"


@dataclass(frozen=True)
class Accepted:
    """What accepting one envelope gave."""

    sender: bytes
    app: AppMessage | None  # None: we had this very envelope already
    new: bool  # the message was new to us (False for a copy sent again)
    stranger: bool = False  # from an identity that is not a contact: kept as a request


# A handler stores what an incoming kind means, inside the transaction that
# stores the envelope, and says whether the message was new to us.
Handler = Callable[[Incoming], bool]


def _shown_text(content: Content) -> str | None:
    """What a message we send shows in the conversation (file offers are
    shown by the transfers, which know the file)."""
    return content.text if isinstance(content, Text) else None


class Conversations:
    def __init__(self, db: Database, random: Random, clock: Clock = time.time) -> None:
        self.db = db
        self.random = random
        self.clock = clock
        seed = db.get_meta("identity_seed")
        if seed is None:
            raise PigeonError("this database holds no identity (run: pigeon init)")
        self.identity = IdentityKeyPair(seed)
        # After `pigeon identity rotate`: the identity we moved from (its record
        # goes on saying so) and the statement both keys signed.
        previous = db.get_meta("previous_identity_seed")
        self.previous_identity = None if previous is None else IdentityKeyPair(previous)
        rotation = db.get_meta("rotation")
        self.rotation = None if rotation is None else Rotation.decode(rotation)
        self.name = (db.get_meta("name") or b"").decode()
        self.contacts = ContactBook(db)
        self.requests = Requests(db)
        self.prekeys = Prekeys(db, self.identity, random, self.now)
        self._handlers: dict[type, Handler] = {
            Text: self._on_text,
            Receipt: self._on_receipt,
            SessionReset: self._on_reset,
            MailboxToken: self._on_token,
            Introduction: lambda item: False,  # a contact's: we know them already
            Timer: self._on_timer,
        }
        # Sessions as read and written during one batch of envelopes (base key
        # -> session), so that a page from a mailbox deserialises each once;
        # None outside a batch.  Every write goes through ``_save_session``,
        # which keeps it current; a step rolled back empties it.
        self._sessions: dict[bytes, Session] | None = None
        # Gives a deposit token for our mailboxes (the node's mailbox owner);
        # each contact gets one, inside the conversation, as messages flow.
        self.issue_token: Callable[[], bytes] | None = None

    def now(self) -> int:
        return int(self.clock())

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def handle(self, kind: type, handler: Handler) -> None:
        """Route incoming messages of ``kind`` to ``handler`` (the seam for new kinds)."""
        self._handlers[kind] = handler

    # -- setup ----------------------------------------------------------------

    @staticmethod
    def initialise(db: Database, name: str, random: Random) -> None:
        with db.transaction():
            db.set_meta("identity_seed", random(32))
            db.set_meta("device_seed", random(32))
            db.set_meta("name", name.encode())
            db.set_meta("record_sequence", b"0")

    @staticmethod
    def rotate(db: Database, random: Random, now: int) -> Rotation:
        """Move to a new identity (the daemon is not running).  The old key
        signs the move and is kept to say so in its record; sessions started
        under it end, and everything not yet confirmed goes out again from
        the new identity, introduced by name, as the contacts' nodes will
        hold it as a message request until their users accept the new key."""
        with db.transaction():
            seed = db.get_meta("identity_seed")
            if seed is None:
                raise PigeonError("this database holds no identity (run: pigeon init)")
            old, new = IdentityKeyPair(seed), IdentityKeyPair.generate(random)
            rotation = Rotation.create(old, new, now)
            db.set_meta("previous_identity_seed", old.seed)
            db.set_meta("identity_seed", new.seed)
            db.set_meta("rotation", rotation.encode())
            db.execute("DELETE FROM sessions")
            db.execute("DELETE FROM outbox")
            db.execute("UPDATE pending_out SET session = NULL")
            # One-time prekeys are signed by the identity: the old ones are
            # no use to anyone now.
            db.execute("DELETE FROM one_time_prekeys")
            # Safety numbers change with the key; every contact must hear
            # our name again, from the new identity.
            db.execute("UPDATE contacts SET verified_at = NULL, last_seen = NULL")
        return rotation

    @property
    def device_seed(self) -> bytes:
        seed = self.db.get_meta("device_seed")
        assert seed is not None
        return seed

    def next_record_sequence(self) -> int:
        """Higher than every record published before, even by a copy of this
        node restored from an older backup: the clock's seconds, or one more
        than the last when several come within a second."""
        with self.db.transaction():
            sequence = max(int(self.db.get_meta("record_sequence") or b"0") + 1, self.now())
            self.db.set_meta("record_sequence", str(sequence).encode())
        return sequence

    # -- sessions ---------------------------------------------------------------

    def _active_session(self, key: bytes) -> Session | None:
        row = self.db.one(
            "SELECT base_key, state FROM sessions WHERE identity_key = ? AND active = 1", (key,)
        )
        return None if row is None else self._session(bytes(row[0]), row[1])

    def _session(self, base_key: bytes, state: bytes) -> Session:
        """The session stored as ``state``; within a batch, the one already read."""
        cache = self._sessions
        if cache is None:
            return Session.deserialize(bytes(state), self.random)
        session = cache.get(base_key)
        if session is None:
            session = cache[base_key] = Session.deserialize(bytes(state), self.random)
        return session

    def _save_session(self, session: Session, *, active: bool | None = None) -> None:
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
            (
                session.base_key,
                session.remote_key,
                session.serialize(),
                int(bool(active)),
                self.now(),
            ),
        )
        if self._sessions is not None:
            self._sessions[session.base_key] = session

    def _resend_undelivered(self, key: bytes) -> None:
        """Encrypt every unconfirmed durable message again, in whatever session
        is active when they go out next."""
        self.db.execute(
            "UPDATE pending_out SET session = NULL WHERE contact = ? AND durable = 1", (key,)
        )

    # -- sending --------------------------------------------------------------------

    def _next_lamport(self, key: bytes) -> int:
        row = self.db.one("SELECT lamport FROM contacts WHERE identity_key = ?", (key,))
        if row is None:
            raise UnknownContact("unknown contact")
        lamport = int(row[0]) + 1
        self.db.execute("UPDATE contacts SET lamport = ? WHERE identity_key = ?", (lamport, key))
        return lamport

    def send(self, key: bytes, content: Content, *, shown: str | None = None) -> AppMessage:
        """The one way to send anything: queue ``content`` for the contact.

        Nothing is encrypted here; the node's courier encrypts the queue in the
        contact's session (starting one when needed) and delivers it.  A text,
        or any durable message given ``shown``, appears in the conversation
        with its delivery status.
        """
        durable = is_durable(content)
        with self.db.transaction():
            app = AppMessage.new(
                content,
                lamport=self._next_lamport(key),
                sent_at_ms=self.now_ms(),
                random=self.random,
            )
            self.db.execute(
                "INSERT INTO pending_out (message_id, contact, app, lamport, durable, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (app.message_id, key, app.encode(), app.lamport, int(durable), self.now()),
            )
            shown = shown if shown is not None else _shown_text(content)
            if shown is not None:
                self.db.execute(
                    "INSERT INTO messages (id, contact, direction, text, lamport, sent_at, status)"
                    " VALUES (?, ?, 'out', ?, ?, ?, 'pending')",
                    (app.message_id, key, shown, app.lamport, app.sent_at_ms),
                )
        return app

    def send_text(self, key: bytes, text: str) -> AppMessage:
        check_text(text)
        with self.db.transaction():
            timer = self.timer(key)
            app = self.send(key, Text(text, timer))
            if timer:
                self.db.execute(
                    "UPDATE messages SET expires_at = ? WHERE id = ?",
                    (app.sent_at_ms // 1000 + timer, app.message_id),
                )
        return app

    # -- disappearing messages --------------------------------------------------------------

    def timer(self, key: bytes) -> int:
        """The conversation's disappearing-messages timer in seconds (0: off)."""
        row = self.db.one("SELECT timer_s FROM contacts WHERE identity_key = ?", (key,))
        if row is None:
            raise UnknownContact("unknown contact")
        return int(row[0] or 0)

    def set_timer(self, key: bytes, seconds: int) -> None:
        """Set the timer for both sides: ours now, the contact's when it reads
        the announcement.  Texts sent from now on carry it."""
        if not 0 <= seconds <= MAX_TIMER:
            raise LocalProtocolError("a timer is 0 (off) to one year")
        with self.db.transaction():
            self._set_timer(key, seconds)
            self.send(key, Timer(seconds))

    def _set_timer(self, key: bytes, seconds: int) -> None:
        self.db.execute(
            "UPDATE contacts SET timer_s = ? WHERE identity_key = ?", (seconds or None, key)
        )

    def expire(self) -> int:
        """Delete every message whose time is up, with what is left of it to
        send; how many messages went.  (Secure delete overwrites them.)"""
        now = self.now()
        with self.db.transaction():
            ids = [
                bytes(r[0])
                for r in self.db.all(
                    "SELECT id FROM messages WHERE expires_at IS NOT NULL AND expires_at <= ?",
                    (now,),
                )
            ]
            for message_id in ids:
                for table, column in (
                    ("messages", "id"),
                    ("pending_out", "message_id"),
                    ("outbox", "message_id"),
                ):
                    self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (message_id,))
            self.db.execute(
                "DELETE FROM request_messages WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (now,),
            )
        return len(ids)

    def expiries(self, digests: list[bytes]) -> dict[bytes, int]:
        """When each of these encrypted envelopes expires (those that do)."""
        out = {}
        for envelope_digest in digests:
            row = self.db.one("SELECT expires_at FROM outbox WHERE digest = ?", (envelope_digest,))
            if row is not None and row[0] is not None:
                out[envelope_digest] = int(row[0])
        return out

    def _unencrypted(self, key: bytes) -> list[tuple[bytes, bytes, bool]]:
        """(message ID, encoded message, durable) for what is not yet encrypted in
        the active session, in conversation order."""
        row = self.db.one(
            "SELECT base_key FROM sessions WHERE identity_key = ? AND active = 1", (key,)
        )
        active = None if row is None else bytes(row[0])
        return [
            (bytes(r[0]), bytes(r[1]), bool(r[2]))
            for r in self.db.all(
                "SELECT message_id, app, durable FROM pending_out WHERE contact = ?"
                " AND (session IS NULL OR session IS NOT ?) ORDER BY lamport, message_id",
                (key, active),
            )
        ]

    def needs_session(self, key: bytes) -> bool:
        """Messages wait to be encrypted and there is no session to do it in."""
        return bool(self._unencrypted(key)) and self._active_session(key) is None

    def encrypt_if_ready(self, key: bytes) -> int:
        """Encrypt what is queued for the contact now, in the same transaction
        as the caller's, when there is a session to do it in and the contact
        has not moved to a new identity (the courier would, one commit
        later).  How many messages were encrypted."""
        row = self.db.one(
            "SELECT moved_to, EXISTS (SELECT 1 FROM sessions s WHERE s.identity_key ="
            " contacts.identity_key AND s.active = 1) FROM contacts WHERE identity_key = ?",
            (key,),
        )
        if row is None or row[0] is not None or not row[1]:
            return 0
        return self.encrypt_queued(key)  # reads the session once

    def encrypt_queued(
        self,
        key: bytes,
        record: DirectoryRecord | None = None,
        one_time_prekey: OneTimePrekey | None = None,
    ) -> int:
        """Encrypt into the outbox everything not yet encrypted in the active
        session; with no session, start one from ``record`` (the caller made
        sure it is current).  Returns how many messages were encrypted."""
        with self.db.transaction():
            rows = self._unencrypted(key)
            if not rows:
                return 0
            if self._token_due(key):
                rows = self._unencrypted(key)
            session = self._active_session(key)
            new = session is None
            if session is None:
                if record is None:
                    raise NoSession("no session with this contact and no record to start one")
                session = Session.initiate(
                    self.identity, record.bundle(one_time_prekey), self.random
                )
                self._introduce(key, session)
            for message_id, app, durable in rows:
                envelope = seal(self.identity, key, session.encrypt(app), self.random)
                # a copy encrypted in a session that was replaced will never be read
                self.db.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))
                self.db.execute(
                    "INSERT INTO outbox (digest, contact, message_id, envelope, expires_at)"
                    " VALUES (?, ?, ?, ?,"
                    " (SELECT expires_at FROM messages WHERE id = ? AND direction = 'out'))",
                    (digest(envelope), key, message_id, envelope, message_id),
                )
                if durable:
                    self.db.execute(
                        "UPDATE pending_out SET session = ? WHERE message_id = ?",
                        (session.base_key, message_id),
                    )
                    # whatever it waited for (a record, a session) it has now
                    self.db.execute(
                        "UPDATE messages SET status = 'pending', reason = NULL"
                        " WHERE id = ? AND status IN ('pending', 'failed')",
                        (message_id,),
                    )
                else:
                    self.db.execute("DELETE FROM pending_out WHERE message_id = ?", (message_id,))
            self._save_session(session, active=True if new else None)
        return len(rows)

    def _introduce(self, key: bytes, session: Session) -> None:
        """First in a session we start with a contact we share no session
        with (we write first, or we moved to a new identity), our name: we
        may be a stranger to them (a message request)."""
        if not self.name or self.db.one("SELECT 1 FROM sessions WHERE identity_key = ?", (key,)):
            return
        app = AppMessage.new(
            Introduction(self.name),
            lamport=self._next_lamport(key),
            sent_at_ms=self.now_ms(),
            random=self.random,
        )
        envelope = seal(self.identity, key, session.encrypt(app.encode()), self.random)
        self.db.execute(
            "INSERT INTO outbox (digest, contact, message_id, envelope) VALUES (?, ?, ?, ?)",
            (digest(envelope), key, app.message_id, envelope),
        )

    def _token_due(self, key: bytes) -> bool:
        """Queue a fresh deposit token for the contact when it is time (we are
        sending it something anyway); True if one was queued."""
        if self.issue_token is None:
            return False
        row = self.db.one("SELECT token_sent_at FROM contacts WHERE identity_key = ?", (key,))
        now = self.now()
        if row is None or (row[0] is not None and now - int(row[0]) < TOKEN_EVERY):
            return False
        self.send(key, MailboxToken(self.issue_token()))
        self.db.execute("UPDATE contacts SET token_sent_at = ? WHERE identity_key = ?", (now, key))
        return True

    def note_waiting(self, key: bytes, reason: str | None) -> None:
        """Say what this contact's pending messages wait for (None: nothing)."""
        self.db.execute(
            "UPDATE messages SET reason = ? WHERE contact = ? AND direction = 'out'"
            " AND status = 'pending'",
            (reason, key),
        )

    def pending_envelopes(self, key: bytes, limit: int = 1000) -> list[tuple[bytes, bytes]]:
        return [
            (bytes(r[0]), bytes(r[1]))
            for r in self.db.all(
                "SELECT digest, envelope FROM outbox WHERE contact = ? ORDER BY seq LIMIT ?",
                (key, limit),
            )
        ]

    def contacts_with_work(self) -> list[bytes]:
        """Contacts with envelopes to deliver or messages to encrypt."""
        return [
            bytes(r[0])
            for r in self.db.all(
                "SELECT * FROM (SELECT contact FROM outbox UNION SELECT p.contact"
                " FROM pending_out p WHERE p.session IS NULL OR NOT EXISTS"
                " (SELECT 1 FROM sessions s WHERE s.base_key = p.session AND s.active = 1))"
                # nothing goes to a contact that moved until its user accepts the
                # move (looked up by key: no scan of the contacts)
                " WHERE NOT EXISTS (SELECT 1 FROM contacts c WHERE c.identity_key = contact"
                " AND c.moved_to IS NOT NULL)"
            )
        ]

    def has_work(self, key: bytes) -> bool:
        """Envelopes to deliver or messages to encrypt for this contact."""
        return bool(self.pending_envelopes(key, limit=1) or self._unencrypted(key))

    def stored(self, digests: list[bytes]) -> None:
        """A peer (the contact's node or a mailbox) holds these envelopes."""
        with self.db.transaction():
            for message_id in self._take_from_outbox(digests):
                self.db.execute(
                    "UPDATE messages SET status = 'sent', reason = NULL"
                    " WHERE id = ? AND status = 'pending'",
                    (message_id,),
                )

    def refused(self, digests: list[bytes], reason: str) -> None:
        """The contact's node will never accept these envelopes."""
        with self.db.transaction():
            for message_id in self._take_from_outbox(digests):
                self.db.execute(
                    "UPDATE messages SET status = 'failed', reason = ?"
                    " WHERE id = ? AND status IN ('pending', 'sent')",
                    (reason, message_id),
                )

    def _take_from_outbox(self, digests: list[bytes]) -> list[bytes]:
        taken = []
        for envelope_digest in digests:
            row = self.db.one("SELECT message_id FROM outbox WHERE digest = ?", (envelope_digest,))
            if row is None:
                continue  # settled already, or replaced by a copy in a newer session
            self.db.execute("DELETE FROM outbox WHERE digest = ?", (envelope_digest,))
            taken.append(bytes(row[0]))
        return taken

    def retry_failed(self, key: bytes) -> int:
        """The contact is in touch: send failed messages again (a few times at most)."""
        cursor = self.db.execute(
            "UPDATE pending_out SET session = NULL, resends = resends + 1"
            " WHERE contact = ? AND resends < ? AND message_id IN"
            " (SELECT id FROM messages WHERE contact = ? AND status = 'failed')",
            (key, MAX_AUTO_RESENDS, key),
        )
        return int(cursor.rowcount)

    def expire_undelivered(self) -> int:
        """Give up on messages the contact has not confirmed in 30 days."""
        cutoff = self.now() - MESSAGE_TTL
        with self.db.transaction():
            ids = [
                bytes(r[0])
                for r in self.db.all(
                    "SELECT message_id FROM pending_out WHERE created_at < ?", (cutoff,)
                )
            ]
            for message_id in ids:
                self.db.execute("DELETE FROM pending_out WHERE message_id = ?", (message_id,))
                self.db.execute("DELETE FROM outbox WHERE message_id = ?", (message_id,))
                self.db.execute(
                    "UPDATE messages SET status = 'failed', reason = ?"
                    " WHERE id = ? AND status IN ('pending', 'sent', 'failed')",
                    ("not delivered within 30 days", message_id),
                )
        return len(ids)

    # -- receiving ------------------------------------------------------------------------

    def accept_envelopes(
        self, envelopes: list[bytes], via: str = "direct"
    ) -> list[Accepted | PigeonError]:
        """Open, decrypt and store a batch of envelopes in one transaction.

        Each envelope is all-or-nothing on its own (a savepoint): one that is
        not valid for us is returned as its error and leaves no trace.  In the
        same transaction: one delivery receipt per sender for the durable
        messages of the batch (copies sent again included, so a lost receipt
        is made good), a session reset for a contact whose envelopes no
        session can read, and another try for failed messages to a contact
        who is evidently in touch.
        """
        receipts: dict[bytes, list[bytes]] = {}
        unreadable: dict[bytes, int] = {}
        with self.db.transaction():
            self._sessions = {}
            try:
                results = self._accept_each(envelopes, receipts, unreadable, via)
            finally:
                self._sessions = None
            for sender, ids in receipts.items():
                self.send(sender, Receipt(ReceiptType.DELIVERED, tuple(ids)))
                self.encrypt_if_ready(sender)
            for sender in {
                r.sender for r in results if isinstance(r, Accepted) and r.new and not r.stranger
            }:
                self.retry_failed(sender)
            for sender, count in unreadable.items():
                self._ask_for_reset(sender, count)
        return results

    def _accept_each(
        self,
        envelopes: list[bytes],
        receipts: dict[bytes, list[bytes]],
        unreadable: dict[bytes, int],
        via: str,
    ) -> list[Accepted | PigeonError]:
        results: list[Accepted | PigeonError] = []
        seen: dict[bytes, int] = {}  # contact -> the highest lamport it sent
        for envelope in envelopes:
            try:
                try:
                    with self.db.savepoint():
                        result = self._accept(envelope, via)
                except BaseException:
                    # Rolled back: a session read or advanced in the step may
                    # now be ahead of the database.
                    self._sessions = {}
                    raise
            except Undecryptable as error:
                unreadable[error.sender] = unreadable.get(error.sender, 0) + 1
                results.append(error)
                continue
            except RequestRefused as error:
                self.requests.count_refused(error.sender)
                results.append(error)
                continue
            except PigeonError as error:
                results.append(error)
                continue
            results.append(result)
            if result.stranger:
                continue  # nothing goes back before the request is accepted
            if result.app is None:
                continue
            # The contact was in touch, and our clock passes theirs: once per
            # contact and batch (before the receipts take a lamport).
            seen[result.sender] = max(seen.get(result.sender, 0), result.app.lamport)
            if is_durable(result.app.content):
                receipts.setdefault(result.sender, []).append(result.app.message_id)
        for sender, lamport in seen.items():
            self.db.execute(
                "UPDATE contacts SET last_seen = ?, lamport = max(lamport, ?)"
                " WHERE identity_key = ?",
                (self.now(), lamport, sender),
            )
        return results

    def _accept(self, envelope: bytes, via: str) -> Accepted:
        envelope_digest = digest(envelope)
        if self.db.one("SELECT 1 FROM received_envelopes WHERE digest = ?", (envelope_digest,)):
            return Accepted(b"", None, new=False)
        opened = open_envelope(self.identity, envelope)
        sender = opened.sender_key
        if self.requests.is_blocked(sender):
            raise NotAContact()
        stranger = not self.contacts.exists(sender)
        if stranger and not self.requests.has_room(sender):
            raise RequestRefused(sender)  # before any decryption: a share costs no more
        incoming = IncomingMessage.decode(opened.payload)
        try:
            plaintext, session, new_session = self._decrypt(sender, incoming)
        except DecryptError:
            if stranger:
                raise NotAContact() from None  # no reset for a stranger
            raise Undecryptable(sender) from None
        self.db.execute(
            "INSERT INTO received_envelopes (digest, received_at, stranger) VALUES (?, ?, ?)",
            (envelope_digest, self.now(), sender if stranger else None),
        )
        app = AppMessage.decode(plaintext)
        if stranger:
            return Accepted(sender, app, self.requests.store(sender, app, self.now()), True)
        handler = self._handlers.get(type(app.content))
        if handler is None:
            log.info("ignored a message of kind %s", type(app.content).__name__)
            new = True
        else:
            new = handler(Incoming(sender, app, session, new_session, via))
        return Accepted(sender, app, new)

    def _decrypt(self, sender: bytes, incoming: IncomingMessage) -> tuple[bytes, bytes, bool]:
        """(plaintext, base key of its session, whether it started that session)."""
        header = incoming.prekey
        if header is not None:
            if header.identity_key != sender:
                raise DecryptError()
            row = self.db.one(
                "SELECT state FROM sessions WHERE base_key = ? AND identity_key = ?",
                (header.base_key, sender),
            )
            if row is not None:
                session = self._session(header.base_key, row[0])
                plaintext = session.decrypt(incoming)
                self._save_session(session)
                return plaintext, session.base_key, False
            session, plaintext = Session.respond(
                self.identity,
                incoming,
                self.prekeys.signed_private,
                self.prekeys.one_time_private,
                self.random,
            )
            if header.one_time_prekey_id:
                self.prekeys.used_one_time(header.one_time_prekey_id)
            ours = self._active_session(sender)
            if ours is not None and ours.pending is not None:
                # The contact started a session instead of answering ours: it may
                # never have read what we sent in ours.
                self._resend_undelivered(sender)
            # Both started at once: the session started by the lower identity key
            # wins on both sides, so they converge on one.
            we_win = (
                ours is not None and ours.pending is not None and self.identity.public_key < sender
            )
            self._save_session(session, active=not we_win)
            return plaintext, session.base_key, True
        rows = self.db.all(
            "SELECT base_key, state FROM sessions WHERE identity_key = ?"
            " ORDER BY active DESC, updated_at DESC",
            (sender,),
        )
        for base_key, state in rows:
            session = self._session(bytes(base_key), state)
            try:
                plaintext = session.decrypt(incoming)
            except DecryptError:
                continue
            self._save_session(session)
            return plaintext, session.base_key, False
        raise DecryptError()

    def _ask_for_reset(self, sender: bytes, count: int) -> None:
        """A contact sent envelopes no session of ours can read: start a fresh
        session and say so in it; they use it and send again what we have not
        confirmed.  At most one reset a minute per contact."""
        row = self.db.one("SELECT reset_at FROM contacts WHERE identity_key = ?", (sender,))
        now = self.now()
        if row is None or (row[0] is not None and now - int(row[0]) < RESET_INTERVAL):
            return
        log.warning(
            "could not read %d envelope(s) from contact %s: starting a new session",
            count,
            short_id(sender),
        )
        self.db.execute("UPDATE contacts SET reset_at = ? WHERE identity_key = ?", (now, sender))
        self.db.execute("UPDATE sessions SET active = 0 WHERE identity_key = ?", (sender,))
        self._resend_undelivered(sender)
        self.send(sender, SessionReset(ResetReason.UNDECRYPTABLE, count))

    # -- message requests -------------------------------------------------------------------

    def add_contact(self, code: ContactCode, alias: str | None) -> tuple[Contact, bool]:
        """Add a contact (or find it there already); what it sent while a
        stranger joins the conversation."""
        with self.db.transaction():
            _, added = self.contacts.add(code, alias, self.now())
            if added and self.requests.pending(code.identity_key):
                self._adopt(code.identity_key)
        return self.contacts.get(code.identity_key), added

    def accept_request(self, key: bytes) -> Contact:
        """A stranger becomes a contact, under the name it introduced itself by."""
        with self.db.transaction():
            name = self.requests.name(key) or f"stranger {identity_id(key).hex()[:8]}"
            code = ContactCode(key, name)
            try:
                self.contacts.add(code, None, self.now())
            except ContactExists:  # someone of that name already: tell them apart
                self.contacts.add(code, f"{name[:50]} {identity_id(key).hex()[:6]}", self.now())
            self._adopt(key)
        return self.contacts.get(key)

    def _adopt(self, key: bytes) -> None:
        """What a new contact sent as a stranger joins the conversation and is
        confirmed to it now; the session it started goes on."""
        texts = self.requests.take(key)
        lamport = 0
        for message_id, text, msg_lamport, sent_at, received_at, expires_at in texts:
            self.db.execute(
                "INSERT OR IGNORE INTO messages (id, contact, direction, text, lamport,"
                " sent_at, received_at, status, via, expires_at)"
                " VALUES (?, ?, 'in', ?, ?, ?, ?, 'received', 'request', ?)",
                (message_id, key, text, msg_lamport, sent_at, received_at, expires_at),
            )
            lamport = max(lamport, msg_lamport)
        self.db.execute(
            "UPDATE contacts SET lamport = max(lamport, ?), last_seen = ? WHERE identity_key = ?",
            (lamport, self.now(), key),
        )
        if texts:
            self.send(key, Receipt(ReceiptType.DELIVERED, tuple(t[0] for t in texts)))

    def accept_key(self, old: bytes, new: bytes) -> Contact:
        """The contact with key ``old`` is ``new`` from now on: the move its
        old key signed (``moved_to``), or, after a lost device, the identity
        of a message request its user vouches for.  Its history, unsent and
        failed messages and files go with it; they go out again in a session
        with the new identity, and what the new identity sent as a request
        joins the conversation."""
        with self.db.transaction():
            self.contacts.get(old)  # raises for a contact that is not (any more)
            if self.contacts.exists(new):
                raise ContactExists(
                    f"{identity_id(new).hex()[:16]} is already one of your contacts;"
                    " remove it first to move this contact to it"
                )
            self.db.execute(
                "UPDATE contacts SET identity_key = ?, identity_id = ?, record = NULL,"
                " record_sequence = -1, moved_to = NULL, moved_at = NULL, verified_at = NULL,"
                " reset_at = NULL WHERE identity_key = ?",
                (new, identity_id(new).hex(), old),
            )
            for table in ("messages", "transfers"):
                self.db.execute(f"UPDATE {table} SET contact = ? WHERE contact = ?", (new, old))
            self.db.execute(
                "UPDATE pending_out SET contact = ?, session = NULL WHERE contact = ?", (new, old)
            )
            self.db.execute(
                "UPDATE messages SET reason = NULL WHERE contact = ? AND status = 'pending'",
                (new,),
            )
            for table, column in (
                ("outbox", "contact"),
                ("sessions", "identity_key"),
                ("contact_devices", "identity_key"),
            ):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (old,))
            self.requests.unblock(new)
            if self.requests.pending(new):
                self._adopt(new)
            log.warning(
                "contact %s moved to identity %s, accepted by the user",
                short_id(old),
                short_id(new),
            )
        return self.contacts.get(new)

    # -- what incoming kinds mean -----------------------------------------------------------

    def _on_text(self, item: Incoming) -> bool:
        content = item.app.content
        assert isinstance(content, Text)
        if self.db.one("SELECT 1 FROM messages WHERE id = ?", (item.app.message_id,)):
            return False
        expires_at = disappears_at(item.app, self.now())
        if expires_at is not None and expires_at <= self.now():
            return False  # its time was up on the way (in a mailbox, say): never shown
        self.db.execute(
            "INSERT INTO messages (id, contact, direction, text, lamport, sent_at,"
            " received_at, status, expires_at, via)"
            " VALUES (?, ?, 'in', ?, ?, ?, ?, 'received', ?, ?)",
            (
                item.app.message_id,
                item.sender,
                content.text,
                item.app.lamport,
                item.app.sent_at_ms,
                self.now_ms(),
                expires_at,
                item.via,
            ),
        )
        return True

    def _on_timer(self, item: Incoming) -> bool:
        content = item.app.content
        assert isinstance(content, Timer)
        self._set_timer(item.sender, content.seconds)
        return True

    def _on_receipt(self, item: Incoming) -> bool:
        content = item.app.content
        assert isinstance(content, Receipt)
        earlier: tuple[str, ...]
        if content.receipt_type == ReceiptType.DELIVERED:
            status, earlier = "delivered", ("pending", "sent", "failed")
        else:
            status, earlier = "read", ("pending", "sent", "failed", "delivered")
        marks = ", ".join("?" * len(earlier))
        for message_id in content.message_ids:
            self.db.execute(
                f"UPDATE messages SET status = ?, reason = NULL WHERE id = ? AND contact = ?"
                f" AND direction = 'out' AND status IN ({marks})",
                (status, message_id, item.sender, *earlier),
            )
            self.db.execute(
                "DELETE FROM pending_out WHERE message_id = ? AND contact = ?",
                (message_id, item.sender),
            )
            self.db.execute(
                "DELETE FROM outbox WHERE message_id = ? AND contact = ?",
                (message_id, item.sender),
            )
        return True

    def _on_reset(self, item: Incoming) -> bool:
        content = item.app.content
        assert isinstance(content, SessionReset)
        log.warning(
            "contact %s could not read %d of our envelope(s): sending again in a new session",
            short_id(item.sender),
            content.failed,
        )
        self.db.execute(
            "UPDATE sessions SET active = (base_key = ?) WHERE identity_key = ?",
            (item.session, item.sender),
        )
        self._resend_undelivered(item.sender)
        return True

    def _on_token(self, item: Incoming) -> bool:
        content = item.app.content
        assert isinstance(content, MailboxToken)
        token = DepositToken.decode(content.token)
        row = self.db.one(
            "SELECT mailbox_token FROM contacts WHERE identity_key = ?", (item.sender,)
        )
        held = None if row is None or row[0] is None else DepositToken.decode(bytes(row[0]))
        if held is None or token.expires_at >= held.expires_at:
            self.db.execute(
                "UPDATE contacts SET mailbox_token = ? WHERE identity_key = ?",
                (content.token, item.sender),
            )
        return True

    def deposit_token(self, key: bytes) -> bytes:
        """The contact's deposit token for its mailboxes, while it is valid (else b"")."""
        row = self.db.one("SELECT mailbox_token FROM contacts WHERE identity_key = ?", (key,))
        if row is None or row[0] is None:
            return b""
        token = bytes(row[0])
        return token if DepositToken.decode(token).expires_at > self.now() else b""

    # -- reading --------------------------------------------------------------------------------

    _MESSAGE_COLUMNS = (
        "SELECT m.rowid, m.id, m.contact, c.identity_id, coalesce(c.alias, c.name), m.text,"
        " m.sent_at, m.received_at, m.direction, m.status, m.lamport, m.reason, m.via"
        " FROM messages m JOIN contacts c ON c.identity_key = m.contact"
    )

    def inbox(self, key: bytes | None = None, after: int = 0) -> list[dict[str, object]]:
        sql = self._MESSAGE_COLUMNS + " WHERE m.rowid > ?"
        params: tuple[object, ...] = (after,)
        if key is not None:
            sql += " AND m.contact = ?"
            params += (key,)
        return self._messages(sql + " ORDER BY m.contact, m.lamport, m.id", params)

    def history(
        self, key: bytes, limit: int, before: bytes | None = None
    ) -> list[dict[str, object]]:
        """The last ``limit`` messages of a conversation, in its order; with
        ``before`` (a message ID), the ``limit`` that come before that one."""
        sql = self._MESSAGE_COLUMNS + " WHERE m.contact = ?"
        params: tuple[object, ...] = (key,)
        if before is not None:
            row = self.db.one(
                "SELECT lamport FROM messages WHERE id = ? AND contact = ?", (before, key)
            )
            if row is None:
                raise UnknownContact("no message with that ID in this conversation")
            sql += " AND (m.lamport, m.id) < (?, ?)"
            params += (int(row[0]), before)
        sql += " ORDER BY m.lamport DESC, m.id DESC LIMIT ?"
        return self._messages(sql, (*params, limit))[::-1]

    def search(self, text: str, limit: int) -> list[dict[str, object]]:
        """Messages whose text holds every word of ``text`` (full-text, any
        case), newest first.  The words are matched as words, never read as
        the index's query language."""
        words = [w for w in text.replace("\x00", " ").split() if w.strip('"')]
        if not words:
            raise LocalProtocolError("search for at least one word")
        query = " ".join('"' + word.replace('"', '""') + '"' for word in words)
        return self._messages(
            self._MESSAGE_COLUMNS
            + " WHERE m.rowid IN (SELECT rowid FROM messages_fts WHERE messages_fts MATCH ?)"
            " ORDER BY m.sent_at DESC, m.id DESC LIMIT ?",
            (query, limit),
        )

    def _messages(self, sql: str, params: tuple[object, ...]) -> list[dict[str, object]]:
        me = self.identity.identity_id.hex()
        out = []
        for row in self.db.all(sql, params):
            outgoing = row[8] == "out"
            out.append(
                {
                    "seq": row[0],
                    "id": bytes(row[1]).hex(),
                    "from": me if outgoing else row[3],
                    "from_name": self.name if outgoing else row[4],
                    "to": row[3] if outgoing else me,
                    "contact_name": row[4],
                    "text": row[5],
                    "sent_at": row[6] / 1000,
                    "received_at": None if row[7] is None else row[7] / 1000,
                    "direction": row[8],
                    "status": row[9],
                    "reason": row[11],
                    "lamport": row[10],
                    "via": row[12],
                }
            )
        return out

    def statuses(self, ids: list[str]) -> dict[str, tuple[str, str | None]]:
        """(status, reason) of the given message IDs (hex)."""
        out = {}
        for message_id in ids:
            row = self.db.one(
                "SELECT status, reason FROM messages WHERE id = ?", (bytes.fromhex(message_id),)
            )
            if row is not None:
                out[message_id] = (str(row[0]), None if row[1] is None else str(row[1]))
        return out

    def mark_read(self, key: bytes) -> int:
        """Mark a conversation read and queue one read receipt for it."""
        with self.db.transaction():
            ids = [
                bytes(r[0])
                for r in self.db.all(
                    "SELECT id FROM messages WHERE contact = ? AND direction = 'in'"
                    " AND status = 'received'",
                    (key,),
                )
            ]
            for message_id in ids:
                self.db.execute("UPDATE messages SET status = 'read' WHERE id = ?", (message_id,))
            if ids:
                self.send(key, Receipt(ReceiptType.READ, tuple(ids)))
        return len(ids)
