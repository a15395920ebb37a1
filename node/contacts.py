"""The contact book: who we talk to, what we call them, the newest verified
directory record of each, and which libp2p peers are their devices.

Synchronous, database only.  Labels (an alias, or the contact's own name when
there is none) are unique, ignoring case, so a name always finds one contact.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass

import multiaddr
from libp2p.peer.peerinfo import info_from_p2p_addr

from pigeon.protocol import ContactCode, DirectoryRecord, PigeonError, ProtocolError
from pigeon.protocol.contact import validate_name
from pigeon.protocol.crypto import sha256
from pigeon.protocol.keys import identity_id

from .storage import Database

log = logging.getLogger("pigeon.contacts")

MIN_ID_PREFIX = 6  # hex characters of an identity ID that may name a contact
VERIFIED_CACHE = 4096  # verified records kept, so a lookup does not check a signature again
SEEN_EVERY = 30  # seconds between two writes of a contact's last_seen from `saw`


# A record older than the signed-prekey rotation is looked up again before a
# session starts from it: its signed prekey may have been replaced.
RECORD_REFRESH_AGE = 7 * 24 * 3600

# What a message to a contact that moved to a new identity waits for.
KEY_CHANGE_WAIT = (
    "the contact moved to a new identity: nothing is sent until you accept it"
    " (pigeon contacts accept-key) or verify it (pigeon verify)"
)


def is_current(record: DirectoryRecord | None, now: float) -> bool:
    """A record to start a session from without looking for a newer one."""
    return (
        record is not None
        and record.expires_at > now
        and now - record.issued_at <= RECORD_REFRESH_AGE
    )


def short_id(key: bytes) -> str:
    """How logs name an identity: the start of its identity ID, never a name."""
    return identity_id(key).hex()[:8]


class UnknownContact(PigeonError):
    pass


class ContactExists(PigeonError):
    pass


@dataclass(frozen=True)
class Contact:
    identity_key: bytes
    identity_id: str
    name: str
    alias: str | None
    last_seen: int | None
    record: DirectoryRecord | None
    verified_at: int | None = None  # when its safety number was last found to match
    blocked: bool = False
    # The identity its old key says it moved to, until the user accepts it
    # (pigeon contacts accept-key): nothing is sent to either meanwhile.
    moved_to: bytes | None = None

    @property
    def verified(self) -> bool:
        return self.verified_at is not None

    @property
    def label(self) -> str:
        return self.alias or self.name


def parse_dial_address(address: str) -> multiaddr.Multiaddr:
    """A contact code's address, checked as something we could dial:
    a multiaddr that ends in the device's /p2p/ peer ID."""
    try:
        parsed = multiaddr.Multiaddr(address)
        info_from_p2p_addr(parsed)
    except Exception:
        raise ProtocolError(
            f"contact code has an address that cannot be dialled: {address[:80]!r}"
        ) from None
    return parsed


class ContactBook:
    _COLUMNS = (
        "identity_key, identity_id, name, alias, last_seen, record, verified_at,"
        " EXISTS (SELECT 1 FROM blocked b WHERE b.identity_key = contacts.identity_key),"
        " moved_to"
    )

    def __init__(self, db: Database) -> None:
        self.db = db
        self._verified: OrderedDict[bytes, DirectoryRecord] = OrderedDict()
        self._seen: dict[bytes, int] = {}  # contact -> last_seen we last wrote
        # label (casefolded) -> identity key, so naming a contact costs the
        # same with a thousand contacts as with one.  Only a hint: every hit
        # is checked against the contact's row, and a miss reads the table.
        self._labels: dict[str, bytes] | None = None

    # -- reading ------------------------------------------------------------

    def _record(self, key: bytes, data: bytes | None) -> DirectoryRecord | None:
        if data is None:
            return None
        cache_key = sha256(data)
        record = self._verified.get(cache_key)
        if record is not None:
            self._verified.move_to_end(cache_key)
            return record
        try:
            # Checked against the clock when it was stored; expiry is the
            # caller's business (a session never starts from an expired one).
            record = DirectoryRecord.verify(data, now=None, identity_key=key)
        except ProtocolError:
            return None
        self._verified[cache_key] = record
        if len(self._verified) > VERIFIED_CACHE:
            self._verified.popitem(last=False)
        return record

    def _from_row(self, row: tuple[object, ...]) -> Contact:
        # The columns' types are the schema's (BLOB, INTEGER), which mypy cannot see.
        key = bytes(row[0])  # type: ignore[call-overload]
        data = None if row[5] is None else bytes(row[5])  # type: ignore[call-overload]
        return Contact(
            key,
            str(row[1]),
            str(row[2]),
            None if row[3] is None else str(row[3]),
            None if row[4] is None else int(row[4]),  # type: ignore[call-overload]
            self._record(key, data),
            None if row[6] is None else int(row[6]),  # type: ignore[call-overload]
            bool(row[7]),
            None if row[8] is None else bytes(row[8]),  # type: ignore[call-overload]
        )

    def get(self, key: bytes) -> Contact:
        row = self.db.one(f"SELECT {self._COLUMNS} FROM contacts WHERE identity_key = ?", (key,))
        if row is None:
            raise UnknownContact("unknown contact")
        return self._from_row(row)

    def exists(self, key: bytes) -> bool:
        return self.db.one("SELECT 1 FROM contacts WHERE identity_key = ?", (key,)) is not None

    def all(self) -> list[Contact]:
        rows = self.db.all(f"SELECT {self._COLUMNS} FROM contacts ORDER BY coalesce(alias, name)")
        return [self._from_row(r) for r in rows]

    def find(self, name: str) -> Contact:
        """By label (alias, or name when there is no alias), identity ID or a
        unique prefix of it (6 hex characters or more), name, or contact code."""
        if name.startswith("pigeon:"):
            key = ContactCode.parse(name).identity_key
            if not self.exists(key):
                raise UnknownContact("that contact code is not one of your contacts")
            return self.get(key)
        wanted = name.casefold()
        hinted = self._label_index().get(wanted)
        if hinted is not None:
            row = self.db.one(
                f"SELECT {self._COLUMNS} FROM contacts WHERE identity_key = ?", (hinted,)
            )
            if row is not None and str(row[3] or row[2]).casefold() == wanted:
                return self._from_row(row)
        # The index is stale (a contact was re-keyed, or changed by another
        # process), or the name is not a label: read the table itself, its
        # small columns only.
        self._labels = None
        rows = self.db.all("SELECT identity_key, identity_id, name, alias FROM contacts")
        for row in rows:
            if str(row[3] or row[2]).casefold() == wanted:
                return self.get(bytes(row[0]))
        lowered = name.lower()
        if len(lowered) >= MIN_ID_PREFIX and all(c in "0123456789abcdef" for c in lowered):
            matches = [r for r in rows if str(r[1]).startswith(lowered)]
            if len(matches) == 1:
                return self.get(bytes(matches[0][0]))
            if len(matches) > 1:
                raise UnknownContact(f"{name!r} starts several identity IDs; give more of it")
        matches = [r for r in rows if str(r[2]).casefold() == wanted]
        if len(matches) == 1:
            return self.get(bytes(matches[0][0]))
        if len(matches) > 1:
            labels = ", ".join(sorted(str(r[3] or r[2]) for r in matches))
            raise UnknownContact(f"{name!r} is the name of several contacts: use one of {labels}")
        raise UnknownContact(f"unknown contact {name!r} (see: pigeon contacts list)")

    def _label_index(self) -> dict[str, bytes]:
        if self._labels is None:
            self._labels = {
                str(label).casefold(): bytes(key)
                for key, label in self.db.all(
                    "SELECT identity_key, coalesce(alias, name) FROM contacts"
                )
            }
        return self._labels

    def for_peer(self, peer_id: bytes) -> bytes | None:
        """The contact whose record lists this libp2p peer as a device."""
        row = self.db.one(
            "SELECT identity_key FROM contact_devices WHERE peer_id = ? LIMIT 1", (peer_id,)
        )
        return None if row is None else bytes(row[0])

    def hint_addresses(self, key: bytes) -> list[str]:
        row = self.db.one("SELECT hint_addresses FROM contacts WHERE identity_key = ?", (key,))
        return [] if row is None else [str(a) for a in json.loads(row[0])]

    # -- changing -----------------------------------------------------------

    def _check_label(self, label: str, key: bytes) -> None:
        wanted = label.casefold()
        for other_key, other_label in self.db.all(
            "SELECT identity_key, coalesce(alias, name) FROM contacts WHERE identity_key != ?",
            (key,),
        ):
            if str(other_label).casefold() == wanted:
                other = self.get(bytes(other_key))
                raise ContactExists(
                    f"another contact is already called {other_label!r}"
                    f" ({other.identity_id[:16]}): choose another name with --as"
                )
        if label.startswith("pigeon:"):
            raise PigeonError("a contact's name cannot start with 'pigeon:'")

    def add(self, code: ContactCode, alias: str | None, now: int) -> tuple[Contact, bool]:
        """Add a contact; (the contact, False) if it was one already.  Re-adding
        never renames: a different alias for an existing contact is an error."""
        for address in code.addresses:
            parse_dial_address(address)
        if alias is not None:
            alias = validate_name(alias)
        key = code.identity_key
        with self.db.transaction():
            if self.exists(key):
                contact = self.get(key)
                if alias is not None and alias != contact.label:
                    raise ContactExists(
                        f"{contact.label} is already a contact; to rename:"
                        f" pigeon contacts rename {contact.label} {alias}"
                    )
                # A newer code may carry newer addresses; nothing else changes.
                self.db.execute(
                    "UPDATE contacts SET hint_addresses = ? WHERE identity_key = ?",
                    (json.dumps(list(code.addresses)), key),
                )
                return contact, False
            self._check_label(alias or code.name, key)
            self._labels = None
            self.db.execute(
                "INSERT INTO contacts (identity_key, identity_id, name, alias, hint_addresses,"
                " added_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    key,
                    identity_id(key).hex(),
                    code.name,
                    alias,
                    json.dumps(list(code.addresses)),
                    now,
                ),
            )
        return self.get(key), True

    def rename(self, contact: Contact, alias: str) -> Contact:
        alias = validate_name(alias)
        with self.db.transaction():
            self._check_label(alias, contact.identity_key)
            self._labels = None
            self.db.execute(
                "UPDATE contacts SET alias = ? WHERE identity_key = ?",
                (None if alias == contact.name else alias, contact.identity_key),
            )
        return self.get(contact.identity_key)

    def remove(self, contact: Contact) -> dict[str, int]:
        """Forget a contact and everything about it: sessions, queued and past messages."""
        key = contact.identity_key
        self._labels = None
        with self.db.transaction():
            counts = {
                "messages": self.db.one("SELECT count(*) FROM messages WHERE contact = ?", (key,))[
                    0
                ],
                "unsent": self.db.one(
                    "SELECT count(*) FROM messages WHERE contact = ? AND direction = 'out'"
                    " AND status IN ('pending', 'failed')",
                    (key,),
                )[0],
            }
            for table, column in (
                ("messages", "contact"),
                ("outbox", "contact"),
                ("pending_out", "contact"),
                ("sessions", "identity_key"),
                ("contact_devices", "identity_key"),
                ("transfers", "contact"),
                ("contacts", "identity_key"),
            ):
                self.db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
        return counts

    def store_record(self, key: bytes, data: bytes, now: int) -> DirectoryRecord | None:
        """Keep a verified record for a contact unless we hold a newer one."""
        record = DirectoryRecord.verify(data, now=now, identity_key=key)
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
            self.db.execute("DELETE FROM contact_devices WHERE identity_key = ?", (key,))
            for device in record.devices:
                self.db.execute(
                    "INSERT OR IGNORE INTO contact_devices (peer_id, identity_key) VALUES (?, ?)",
                    (device.certificate.peer_id, key),
                )
            moved_to = record.moved_to
            if (
                moved_to is not None
                and self.db.one(
                    "SELECT 1 FROM contacts WHERE identity_key = ? AND moved_to IS ?",
                    (key, moved_to),
                )
                is None
            ):
                # Signed by the key we hold, countersigned by the new one
                # (DirectoryRecord.verify checked both).  The verified mark
                # was for the old key: it goes.
                self.db.execute(
                    "UPDATE contacts SET moved_to = ?, moved_at = ?, verified_at = NULL"
                    " WHERE identity_key = ?",
                    (moved_to, now, key),
                )
                self.db.execute(
                    "UPDATE messages SET reason = ? WHERE contact = ? AND direction = 'out'"
                    " AND status IN ('pending', 'failed')",
                    (KEY_CHANGE_WAIT, key),
                )
                log.warning(
                    "KEY CHANGE: contact %s says it moved to identity %s; nothing is sent to"
                    " it until the user accepts the new key",
                    short_id(key),
                    short_id(moved_to),
                )
        return record

    def set_verified(self, contact: Contact, now: int | None) -> Contact:
        """Mark a contact verified (at ``now``), or not verified (None)."""
        self.db.execute(
            "UPDATE contacts SET verified_at = ? WHERE identity_key = ?",
            (now, contact.identity_key),
        )
        return self.get(contact.identity_key)

    def saw(self, key: bytes, now: int) -> None:
        """Note that the contact was in touch.  Written at most every
        ``SEEN_EVERY`` seconds per contact (shown to the minute): a write
        after every delivered batch would be a commit, with its fsync, per
        message."""
        if now - self._seen.get(key, -SEEN_EVERY) < SEEN_EVERY:
            return
        self.db.execute("UPDATE contacts SET last_seen = ? WHERE identity_key = ?", (now, key))
        self._seen[key] = now
