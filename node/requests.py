"""Message requests and blocking: what becomes of envelopes from identities
that are not contacts.

A sealed envelope names its sender's identity key only to us, and proves
it.  When that key is not a contact's, the first few messages are kept as a
*request*, shown with the name the sender introduced itself by, until the
user accepts (the sender becomes a contact and the conversation goes on) or
blocks (everything from that key is refused from then on).  Nothing goes
back to a stranger before acceptance: no receipt, no reset, no presence.

Everything a stranger can make us keep is bounded, because identities cost
nothing: at most :data:`MAX_REQUESTS` strangers (the one heard from longest
ago is dropped for a new one), each with at most :data:`ENVELOPES_EACH`
envelopes of any kind and :data:`BYTES_EACH` bytes of text.  An envelope beyond a stranger's share
is refused, so its sender sees it failed and sends it again once accepted.
Each envelope costs one X3DH or ratchet step at most, like a contact's.

Synchronous, database only, inside the caller's transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pigeon.protocol import AppMessage, DecryptError, FileOffer, Introduction, MailboxToken, Text
from pigeon.protocol.keys import identity_id
from pigeon.protocol.messages import disappears_at

from .contacts import MIN_ID_PREFIX, UnknownContact, short_id
from .storage import Database

log = logging.getLogger("pigeon.requests")

MAX_REQUESTS = 100  # strangers kept at once
ENVELOPES_EACH = 10  # envelopes taken from one stranger, of any kind
BYTES_EACH = 64 * 1024  # bytes of UTF-8 of its texts
PREVIEW_CHARS = 200  # of each text shown in the list


class RequestRefused(DecryptError):
    """A stranger's envelope beyond its share.  Outside, the same opaque
    refusal as any envelope we cannot read."""

    def __init__(self, sender: bytes) -> None:
        super().__init__()
        self.sender = sender


@dataclass(frozen=True)
class Request:
    identity_key: bytes
    identity_id: str
    name: str | None
    first_at: int
    last_at: int
    messages: list[dict[str, object]]
    refused: int

    def claims(self, *names: str) -> bool:
        """Whether it introduced itself by one of these names."""
        return self.name is not None and self.name.casefold() in {n.casefold() for n in names}


class Requests:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- blocking ---------------------------------------------------------------------

    def is_blocked(self, key: bytes) -> bool:
        return self.db.one("SELECT 1 FROM blocked WHERE identity_key = ?", (key,)) is not None

    def block(self, key: bytes, now: int) -> None:
        """Refuse everything from ``key`` from now on; its request goes."""
        with self.db.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO blocked (identity_key, identity_id, blocked_at)"
                " VALUES (?, ?, ?)",
                (key, identity_id(key).hex(), now),
            )
            self._drop(key)

    def unblock(self, key: bytes) -> bool:
        return bool(self.db.execute("DELETE FROM blocked WHERE identity_key = ?", (key,)).rowcount)

    def blocked(self) -> list[dict[str, object]]:
        return [
            {"identity_id": str(r[0]), "blocked_at": int(r[1])}
            for r in self.db.all("SELECT identity_id, blocked_at FROM blocked ORDER BY blocked_at")
        ]

    def find_blocked(self, name: str) -> bytes:
        return self._by_id("blocked", name, "blocked identity")

    # -- requests ---------------------------------------------------------------------

    def has_room(self, key: bytes) -> bool:
        """Whether another envelope from this stranger would be kept (checked
        before any decryption, so a stranger over its share costs no X3DH)."""
        row = self.db.one("SELECT messages FROM requests WHERE identity_key = ?", (key,))
        return row is None or int(row[0]) < ENVELOPES_EACH

    def store(self, key: bytes, app: AppMessage, now: int) -> bool:
        """Keep what a stranger sent (a text, or its introduction); False for a
        copy we have.  Raises RequestRefused beyond the stranger's share."""
        row = self.db.one(
            "SELECT messages, (SELECT coalesce(sum(length(CAST(text AS BLOB))), 0)"
            " FROM request_messages WHERE identity_key = ?) FROM requests WHERE identity_key = ?",
            (key, key),
        )
        if row is None:
            self._make_room()
            self.db.execute(
                "INSERT INTO requests (identity_key, identity_id, first_at, last_at)"
                " VALUES (?, ?, ?, ?)",
                (key, identity_id(key).hex(), now, now),
            )
            count, size = 0, 0
        else:
            count, size = int(row[0]), int(row[1])
        if count >= ENVELOPES_EACH:
            self._refuse(key)
        self.db.execute(
            "UPDATE requests SET last_at = ?, messages = messages + 1 WHERE identity_key = ?",
            (now, key),
        )
        content = app.content
        if isinstance(content, Introduction):
            self.db.execute(
                "UPDATE requests SET name = ? WHERE identity_key = ?", (content.name, key)
            )
            return True
        if isinstance(content, FileOffer):
            # Not kept for later: its sender should see it refused (its file
            # waits on its side), not offered for ever.
            self._refuse(key)
        if isinstance(content, MailboxToken):
            # Its sender will not send another for days: kept for when it is accepted.
            self.db.execute(
                "UPDATE requests SET mailbox_token = ? WHERE identity_key = ?", (content.token, key)
            )
            return True
        if not isinstance(content, Text):
            return True  # receipts, signalling: nothing to keep before acceptance
        if self.db.one("SELECT 1 FROM request_messages WHERE id = ?", (app.message_id,)):
            return False
        if size + len(content.text.encode("utf-8")) > BYTES_EACH:
            self._refuse(key)
        expires_at = disappears_at(app, now)
        if expires_at is not None and expires_at <= now:
            return True  # its time was up on the way
        self.db.execute(
            "INSERT INTO request_messages (id, identity_key, text, lamport, sent_at, received_at,"
            " expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                app.message_id,
                key,
                content.text,
                app.lamport,
                app.sent_at_ms,
                now * 1000,
                expires_at,
            ),
        )
        return True

    def _refuse(self, key: bytes) -> None:
        raise RequestRefused(key)

    def count_refused(self, key: bytes) -> None:
        """Count an envelope refused beyond the stranger's share (outside the
        savepoint that undid the envelope)."""
        self.db.execute("UPDATE requests SET refused = refused + 1 WHERE identity_key = ?", (key,))

    def _make_room(self) -> None:
        count = self.db.one("SELECT count(*) FROM requests")[0]
        if count < MAX_REQUESTS:
            return
        for (key,) in self.db.all(
            "SELECT identity_key FROM requests ORDER BY last_at, first_at LIMIT ?",
            (count - MAX_REQUESTS + 1,),
        ):
            log.info("dropped the oldest message request, from %s", short_id(bytes(key)))
            self._drop(bytes(key))

    def _drop(self, key: bytes) -> None:
        """Forget a stranger: its request, its texts and its session."""
        for table in ("requests", "request_messages", "sessions"):
            self.db.execute(f"DELETE FROM {table} WHERE identity_key = ?", (key,))
        self.db.execute("DELETE FROM received_envelopes WHERE stranger = ?", (key,))

    def all(self) -> list[Request]:
        out = []
        for row in self.db.all(
            "SELECT identity_key, identity_id, name, first_at, last_at, refused FROM requests"
            " ORDER BY last_at DESC"
        ):
            key = bytes(row[0])
            texts = [
                {
                    "id": bytes(m[0]).hex(),
                    "text": str(m[1])[:PREVIEW_CHARS],
                    "sent_at": int(m[2]) / 1000,
                }
                for m in self.db.all(
                    "SELECT id, text, sent_at FROM request_messages WHERE identity_key = ?"
                    " ORDER BY lamport, id",
                    (key,),
                )
            ]
            out.append(
                Request(
                    key,
                    str(row[1]),
                    None if row[2] is None else str(row[2]),
                    int(row[3]),
                    int(row[4]),
                    texts,
                    int(row[5]),
                )
            )
        return out

    def find(self, name: str) -> bytes:
        """A request by its sender's identity ID, or a unique prefix of it."""
        return self._by_id("requests", name, "message request")

    def _by_id(self, table: str, name: str, what: str) -> bytes:
        wanted = name.strip().lower()
        if len(wanted) < MIN_ID_PREFIX or wanted.strip("0123456789abcdef"):
            raise UnknownContact(
                f"give a {what}'s identity ID (at least {MIN_ID_PREFIX} hex characters)"
            )
        rows = self.db.all(
            f"SELECT identity_key FROM {table} WHERE identity_id LIKE ? || '%'", (wanted,)
        )
        if not rows:
            raise UnknownContact(f"no {what} from {name!r}")
        if len(rows) > 1:
            raise UnknownContact(f"{name!r} starts several identity IDs; give more of it")
        return bytes(rows[0][0])

    def claiming(self, *names: str) -> bytes | None:
        """A stranger that introduced itself by one of these names (a
        contact's), if any: the newest."""
        wanted = {n.casefold() for n in names}
        for key, name in self.db.all(
            "SELECT identity_key, name FROM requests WHERE name IS NOT NULL ORDER BY last_at DESC"
        ):
            if str(name).casefold() in wanted:
                return bytes(key)
        return None

    def pending(self, key: bytes) -> bool:
        return self.db.one("SELECT 1 FROM requests WHERE identity_key = ?", (key,)) is not None

    def name(self, key: bytes) -> str | None:
        """The name a stranger introduced itself by (raises when there is no request)."""
        row = self.db.one("SELECT name FROM requests WHERE identity_key = ?", (key,))
        if row is None:
            raise UnknownContact("no message request from that identity")
        return None if row[0] is None else str(row[0])

    def take(self, key: bytes) -> list[tuple[bytes, str, int, int, int, int | None]]:
        """Remove a request as its sender becomes a contact: the texts (id,
        text, lamport, sent_at ms, received_at ms, expires_at or None).  The
        session stays."""
        texts = [
            (bytes(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5])
            for r in self.db.all(
                "SELECT id, text, lamport, sent_at, received_at, expires_at FROM request_messages"
                " WHERE identity_key = ? ORDER BY lamport, id",
                (key,),
            )
        ]
        token = self.db.one("SELECT mailbox_token FROM requests WHERE identity_key = ?", (key,))
        if token is not None and token[0] is not None:  # the contact is there by now
            self.db.execute(
                "UPDATE contacts SET mailbox_token = ? WHERE identity_key = ?", (token[0], key)
            )
        self.db.execute("DELETE FROM request_messages WHERE identity_key = ?", (key,))
        self.db.execute("DELETE FROM requests WHERE identity_key = ?", (key,))
        self.db.execute("UPDATE received_envelopes SET stranger = NULL WHERE stranger = ?", (key,))
        return texts
