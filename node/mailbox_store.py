"""What a mailbox peer keeps: its owners, their sealed envelopes and one-time
prekeys, in the node's own encrypted database; every limit a deposit must
pass, checked in the transaction that stores it (fsynced before the deposit
is acknowledged).

Deposits are counted by *source*: each deposit token (a contact of the
owner's) has its own share, and deposits paid for with work (strangers)
share one smaller share, so strangers cannot crowd out an owner's contacts,
nor fill more than half of the mailbox.  Counters are kept per owner and per
source, so no check scans what a mailbox holds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pigeon.protocol import OneTimePrekey, PigeonError
from pigeon.protocol.crypto import sha256
from pigeon.protocol.mailbox import ITEM_ID_SIZE, MAX_PAGE_BYTES, Item, mailbox_id

from .storage import Database

STRANGERS = b""  # the source of deposits paid for with work
DAY = 24 * 3600


@dataclass(frozen=True)
class MailboxLimits:
    """A mailbox's limits; every number is documented in docs/protocol/mailbox.md."""

    default_ttl: int = 30 * DAY  # how long an envelope is kept
    max_ttl: int = 30 * DAY
    quota_messages: int = 10_000  # per owner, all sources together
    quota_bytes: int = 256 * 1024 * 1024
    token_messages: int = 2_000  # per owner, per deposit token
    token_bytes: int = 64 * 1024 * 1024
    stranger_messages: int = 1_000  # per owner, all deposits paid for with work
    stranger_bytes: int = 32 * 1024 * 1024
    max_bytes: int = 1024 * 1024 * 1024  # the whole mailbox; work-paid deposits get half
    max_owners: int = 1_000
    owner_idle: int = 30 * DAY  # an owner that never collects is dropped with its envelopes
    deposits_per_minute: int = 60  # per depositing peer, and per deposit token
    challenge_ttl: float = 60.0
    prekey_stock: int = 200  # one-time prekeys kept per owner
    prekey_age: int = 30 * DAY  # an older one-time prekey is never handed out
    # Bits of proof of work forgiven on every request that needs some (a
    # private network's mailbox, or a test, may ask for less; never more).
    work_discount: int = 0

    def work_bits(self, bits: int) -> int:
        return max(0, bits - self.work_discount)


class MailboxRefused(PigeonError):
    """A mailbox said no; the message says why, for the sender to act on."""


class MailboxStore:
    def __init__(self, db: Database, limits: MailboxLimits) -> None:
        self.db = db
        self.limits = limits

    # -- owners -------------------------------------------------------------------

    def register(self, public_key: bytes, now: int) -> bytes:
        box = mailbox_id(public_key)
        with self.db.transaction():
            if self.owner_key(box) is not None:
                return box
            owners = int(self.db.one("SELECT count(*) FROM mailbox_owners")[0])
            if owners >= self.limits.max_owners:
                raise MailboxRefused("this mailbox takes no new owners; choose another")
            self.db.execute(
                "INSERT INTO mailbox_owners (mailbox_id, public_key, registered_at,"
                " quota_messages, quota_bytes, last_proof_at) VALUES (?, ?, ?, ?, ?, ?)",
                (
                    box,
                    public_key,
                    now,
                    self.limits.quota_messages,
                    self.limits.quota_bytes,
                    now,
                ),
            )
        return box

    def owner_key(self, box: bytes) -> bytes | None:
        row = self.db.one("SELECT public_key FROM mailbox_owners WHERE mailbox_id = ?", (box,))
        return None if row is None else bytes(row[0])

    def proven(self, box: bytes, now: int) -> None:
        """The owner proved its key just now: it is alive."""
        self.db.execute(
            "UPDATE mailbox_owners SET last_proof_at = ? WHERE mailbox_id = ?", (now, box)
        )

    # -- envelopes ------------------------------------------------------------------

    def deposit(self, box: bytes, envelope: bytes, ttl: int, now: int, source: bytes) -> bytes:
        """Store durably (the commit is fsynced) and return the item ID.  The
        same envelope deposited again is the same item."""
        size = len(envelope)
        digest = sha256(envelope)
        limits = self.limits
        with self.db.transaction():
            owner = self.db.one(
                "SELECT quota_messages, quota_bytes, items, bytes FROM mailbox_owners"
                " WHERE mailbox_id = ?",
                (box,),
            )
            if owner is None:
                raise MailboxRefused("no such mailbox here")
            row = self.db.one(
                "SELECT id FROM mailbox_items WHERE mailbox_id = ? AND digest = ?", (box, digest)
            )
            if row is not None:
                return bytes(row[0])
            if owner[2] + 1 > owner[0] or owner[3] + size > owner[1]:
                raise MailboxRefused("the recipient's mailbox is full; try again later")
            items, used = self._usage(box, source)
            share = (
                (limits.stranger_messages, limits.stranger_bytes)
                if source == STRANGERS
                else (limits.token_messages, limits.token_bytes)
            )
            if items + 1 > share[0] or used + size > share[1]:
                who = "deposits without a token" if source == STRANGERS else "this deposit token"
                raise MailboxRefused(f"the recipient's mailbox is full for {who}; try again later")
            total = int(self.db.one("SELECT coalesce(sum(bytes), 0) FROM mailbox_owners")[0])
            if total + size > limits.max_bytes:
                raise MailboxRefused("this mailbox is full; try again later")
            if source == STRANGERS:
                strangers = int(
                    self.db.one(
                        "SELECT coalesce(sum(bytes), 0) FROM mailbox_usage WHERE source = ?",
                        (STRANGERS,),
                    )[0]
                )
                if strangers + size > limits.max_bytes // 2:
                    raise MailboxRefused(
                        "this mailbox is full for deposits without a token; try again later"
                    )
            item_id = os.urandom(ITEM_ID_SIZE)
            ttl = min(ttl or limits.default_ttl, limits.max_ttl)
            self.db.execute(
                "INSERT INTO mailbox_items (id, mailbox_id, envelope, size, deposited_at,"
                " expires_at, digest, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, box, envelope, size, now, now + ttl, digest, source),
            )
            self._count(box, source, 1, size)
        return item_id

    def _usage(self, box: bytes, source: bytes) -> tuple[int, int]:
        row = self.db.one(
            "SELECT items, bytes FROM mailbox_usage WHERE mailbox_id = ? AND source = ?",
            (box, source),
        )
        return (0, 0) if row is None else (int(row[0]), int(row[1]))

    def _count(self, box: bytes, source: bytes, items: int, size: int) -> None:
        self.db.execute(
            "UPDATE mailbox_owners SET items = items + ?, bytes = bytes + ? WHERE mailbox_id = ?",
            (items, size, box),
        )
        self.db.execute(
            "INSERT INTO mailbox_usage (mailbox_id, source, items, bytes) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (mailbox_id, source) DO UPDATE SET items = items + excluded.items,"
            " bytes = bytes + excluded.bytes",
            (box, source, items, size),
        )
        self.db.execute(
            "DELETE FROM mailbox_usage WHERE mailbox_id = ? AND source = ? AND items <= 0",
            (box, source),
        )

    def fetch(self, box: bytes, limit: int) -> tuple[list[Item], bool]:
        """The oldest items, up to ``limit`` of them and MAX_PAGE_BYTES of
        envelopes (at least one), and whether more wait.  Sizes are read
        first, so no more than one page of envelopes is ever in memory."""
        chosen: list[bytes] = []
        total = 0
        more = False
        for item_id, size in self.db.all(
            "SELECT id, size FROM mailbox_items WHERE mailbox_id = ?"
            " ORDER BY deposited_at, rowid LIMIT ?",
            (box, limit + 1),
        ):
            if len(chosen) == limit or (chosen and total + size > MAX_PAGE_BYTES):
                more = True
                break
            chosen.append(bytes(item_id))
            total += size
        items = []
        for item_id in chosen:
            row = self.db.one(
                "SELECT envelope, deposited_at FROM mailbox_items WHERE id = ?", (item_id,)
            )
            if row is not None:
                items.append(Item(item_id, bytes(row[0]), row[1]))
        return items, more

    def delete(self, box: bytes, item_ids: tuple[bytes, ...]) -> None:
        with self.db.transaction():
            for item_id in item_ids:
                row = self.db.one(
                    "SELECT size, source FROM mailbox_items WHERE id = ? AND mailbox_id = ?",
                    (item_id, box),
                )
                if row is None:
                    continue
                self.db.execute("DELETE FROM mailbox_items WHERE id = ?", (item_id,))
                self._count(box, bytes(row[1]), -1, -int(row[0]))

    def expire(self, now: int) -> int:
        """Delete expired envelopes, and owners that stopped collecting long ago
        (with what they left); returns how many envelopes went."""
        with self.db.transaction():
            gone = 0
            for box, source, count, size in self.db.all(
                "SELECT mailbox_id, source, count(*), sum(size) FROM mailbox_items"
                " WHERE expires_at <= ? GROUP BY mailbox_id, source",
                (now,),
            ):
                self._count(bytes(box), bytes(source), -int(count), -int(size))
                gone += int(count)
            self.db.execute("DELETE FROM mailbox_items WHERE expires_at <= ?", (now,))
            idle = [
                bytes(r[0])
                for r in self.db.all(
                    "SELECT mailbox_id FROM mailbox_owners"
                    " WHERE coalesce(last_proof_at, registered_at) < ?",
                    (now - self.limits.owner_idle,),
                )
            ]
            for box in idle:
                gone += int(
                    self.db.one("SELECT count(*) FROM mailbox_items WHERE mailbox_id = ?", (box,))[
                        0
                    ]
                )
                for table in (
                    "mailbox_items",
                    "mailbox_usage",
                    "mailbox_prekeys",
                    "mailbox_owners",
                ):
                    self.db.execute(f"DELETE FROM {table} WHERE mailbox_id = ?", (box,))
            self.db.execute(
                "DELETE FROM mailbox_prekeys WHERE added_at < ?", (now - self.limits.prekey_age,)
            )
        return gone

    # -- one-time prekeys ------------------------------------------------------------

    def add_prekeys(self, box: bytes, prekeys: tuple[bytes, ...], now: int) -> int:
        with self.db.transaction():
            room = self.limits.prekey_stock - self.prekeys_left(box)
            for raw in prekeys[: max(room, 0)]:
                prekey = OneTimePrekey.decode(raw)
                self.db.execute(
                    "INSERT OR IGNORE INTO mailbox_prekeys"
                    " (mailbox_id, prekey_id, prekey, added_at) VALUES (?, ?, ?, ?)",
                    (box, prekey.prekey_id, raw, now),
                )
        return self.prekeys_left(box)

    def take_prekey(self, box: bytes, now: int) -> bytes:
        """Hand out one prekey and forget it in the same transaction: never twice."""
        with self.db.transaction():
            row = self.db.one(
                "SELECT prekey_id, prekey FROM mailbox_prekeys WHERE mailbox_id = ?"
                " AND added_at >= ? ORDER BY prekey_id LIMIT 1",
                (box, now - self.limits.prekey_age),
            )
            if row is None:
                return b""
            self.db.execute(
                "DELETE FROM mailbox_prekeys WHERE mailbox_id = ? AND prekey_id = ?", (box, row[0])
            )
            return bytes(row[1])

    def prekeys_left(self, box: bytes) -> int:
        return int(
            self.db.one("SELECT count(*) FROM mailbox_prekeys WHERE mailbox_id = ?", (box,))[0]
        )

    # -- what the mailbox's own user sees ----------------------------------------------

    def usage(self) -> list[dict[str, object]]:
        return [
            {"mailbox": bytes(r[0]).hex(), "messages": r[1], "bytes": r[2]}
            for r in self.db.all("SELECT mailbox_id, items, bytes FROM mailbox_owners")
        ]
