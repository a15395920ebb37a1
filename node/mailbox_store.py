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
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pigeon.protocol import OneTimePrekey, PigeonError
from pigeon.protocol.crypto import sha256
from pigeon.protocol.mailbox import ITEM_ID_SIZE, MAX_PAGE_BYTES, Item, mailbox_id

from .storage import Database

STRANGERS = b""  # the source of deposits paid for with work
_SECONDS = struct.Struct(">Q")
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


@dataclass(frozen=True)
class Deposit:
    """One deposit to store: the envelope, for the owner of ``box``,
    counted against ``source`` (a deposit token's ID, or STRANGERS)."""

    box: bytes
    envelope: bytes
    ttl: int
    now: int
    source: bytes


@dataclass
class _Counts:
    items: int
    bytes: int
    quota_items: int = 0
    quota_bytes: int = 0


class _Tally:
    """The counters a group of deposits is checked against, read from the
    database once each and kept up to date as the group is stored."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._owners: dict[bytes, _Counts | None] = {}
        self._usage: dict[tuple[bytes, bytes], _Counts] = {}
        self._total: int | None = None
        self._strangers: int | None = None
        self.added: dict[tuple[bytes, bytes], tuple[int, int]] = {}  # (box, source) -> items, bytes

    def owner(self, box: bytes) -> _Counts | None:
        if box not in self._owners:
            row = self.db.one(
                "SELECT items, bytes, quota_messages, quota_bytes FROM mailbox_owners"
                " WHERE mailbox_id = ?",
                (box,),
            )
            self._owners[box] = None if row is None else _Counts(*(int(v) for v in row))
        return self._owners[box]

    def usage(self, box: bytes, source: bytes) -> _Counts:
        counts = self._usage.get((box, source))
        if counts is None:
            row = self.db.one(
                "SELECT items, bytes FROM mailbox_usage WHERE mailbox_id = ? AND source = ?",
                (box, source),
            )
            counts = _Counts(0, 0) if row is None else _Counts(int(row[0]), int(row[1]))
            self._usage[box, source] = counts
        return counts

    def total(self) -> int:
        """Bytes the whole mailbox holds."""
        if self._total is None:
            self._total = int(self.db.one("SELECT coalesce(sum(bytes), 0) FROM mailbox_owners")[0])
        return self._total

    def strangers(self) -> int:
        """Bytes deposited without a token, for every owner together."""
        if self._strangers is None:
            self._strangers = int(
                self.db.one(
                    "SELECT coalesce(sum(bytes), 0) FROM mailbox_usage WHERE source = ?",
                    (STRANGERS,),
                )[0]
            )
        return self._strangers

    def add(self, box: bytes, source: bytes, size: int) -> None:
        owner = self.owner(box)
        assert owner is not None
        owner.items += 1
        owner.bytes += size
        usage = self.usage(box, source)
        usage.items += 1
        usage.bytes += size
        self._total = self.total() + size
        if source == STRANGERS:
            self._strangers = self.strangers() + size
        items, added = self.added.get((box, source), (0, 0))
        self.added[box, source] = (items + 1, added + size)


class MailboxStore:
    def __init__(self, db: Database, limits: MailboxLimits) -> None:
        self.db = db
        self.limits = limits
        self._owner_keys: dict[bytes, bytes] = {}  # mailbox ID -> the owner's key

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
        """The owner's public key, remembered once read (at most one per
        owner: ``max_owners``), so that checking a deposit needs no database
        read while a group of deposits is being committed."""
        key = self._owner_keys.get(box)
        if key is None:
            row = self.db.one("SELECT public_key FROM mailbox_owners WHERE mailbox_id = ?", (box,))
            if row is None:
                return None
            key = self._owner_keys[box] = bytes(row[0])
        return key

    def proven(self, box: bytes, now: int) -> None:
        """The owner proved its key just now: it is alive."""
        self.db.execute(
            "UPDATE mailbox_owners SET last_proof_at = ? WHERE mailbox_id = ?", (now, box)
        )

    # -- envelopes ------------------------------------------------------------------

    def deposit(self, box: bytes, envelope: bytes, ttl: int, now: int, source: bytes) -> bytes:
        """Store durably (the commit is fsynced) and return the item ID.  The
        same envelope deposited again is the same item."""
        (result,) = self.deposit_many([Deposit(box, envelope, ttl, now, source)])
        if isinstance(result, MailboxRefused):
            raise result
        return result

    def deposit_many(self, deposits: Sequence[Deposit]) -> list[bytes | MailboxRefused]:
        """Store deposits that arrived together in one transaction: one
        fsynced commit for all of them.  Each is checked against every limit
        as if it came alone, after those before it; a refused one stores
        nothing and changes nothing for the others.  Returns, in order, each
        deposit's item ID or its refusal.  Nothing is stored unless the whole
        transaction commits (inside another transaction: when that one does).

        Counters are read once per owner and source and written once at the
        end, and the mailbox-wide totals are summed once for the group, so a
        deposit costs the same however much the mailbox holds."""
        with self.db.transaction():
            return self._store(deposits)

    async def deposit_group(self, deposits: Sequence[Deposit]) -> list[bytes | MailboxRefused]:
        """``deposit_many`` with its COMMIT off the event loop
        (``Database.transaction_off_loop``): the loop goes on with the network
        meanwhile, and this returns once the group is durable."""
        async with self.db.transaction_off_loop():
            results = self._store(deposits)
        return results

    def _store(self, deposits: Sequence[Deposit]) -> list[bytes | MailboxRefused]:
        results: list[bytes | MailboxRefused] = []
        tally = _Tally(self.db)
        for deposit in deposits:
            try:
                results.append(self._deposit(deposit, tally))
            except MailboxRefused as refusal:
                results.append(refusal)
        for (box, source), (items, size) in tally.added.items():
            self._count(box, source, items, size)
        return results

    def _deposit(self, deposit: Deposit, tally: _Tally) -> bytes:
        box, envelope, source = deposit.box, deposit.envelope, deposit.source
        size = len(envelope)
        digest = sha256(envelope)
        limits = self.limits
        owner = tally.owner(box)
        if owner is None:
            raise MailboxRefused("no such mailbox here")
        row = self.db.one(
            "SELECT id FROM mailbox_items WHERE mailbox_id = ? AND digest = ?", (box, digest)
        )
        if row is not None:
            return bytes(row[0])
        if owner.items + 1 > owner.quota_items or owner.bytes + size > owner.quota_bytes:
            raise MailboxRefused("the recipient's mailbox is full; try again later")
        usage = tally.usage(box, source)
        share = (
            (limits.stranger_messages, limits.stranger_bytes)
            if source == STRANGERS
            else (limits.token_messages, limits.token_bytes)
        )
        if usage.items + 1 > share[0] or usage.bytes + size > share[1]:
            who = "deposits without a token" if source == STRANGERS else "this deposit token"
            raise MailboxRefused(f"the recipient's mailbox is full for {who}; try again later")
        if tally.total() + size > limits.max_bytes:
            raise MailboxRefused("this mailbox is full; try again later")
        if source == STRANGERS and tally.strangers() + size > limits.max_bytes // 2:
            raise MailboxRefused(
                "this mailbox is full for deposits without a token; try again later"
            )
        now = deposit.now
        # The time first, then random bytes: new IDs go to the end of their
        # index, as new items go to the end of the table, so a deposit writes
        # the same few index pages however many items the mailbox holds.  (The
        # time is no secret: every challenge carries it.)
        item_id = _SECONDS.pack(now) + os.urandom(ITEM_ID_SIZE - _SECONDS.size)
        ttl = min(deposit.ttl or limits.default_ttl, limits.max_ttl)
        self.db.execute(
            "INSERT INTO mailbox_items (id, mailbox_id, envelope, size, deposited_at,"
            " expires_at, digest, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (item_id, box, envelope, size, now, now + ttl, digest, source),
        )
        tally.add(box, source, size)
        return item_id

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
        if items < 0:
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
        if not chosen:
            return [], more
        found = {
            bytes(r[0]): Item(bytes(r[0]), bytes(r[1]), r[2])
            for r in self.db.all(
                "SELECT id, envelope, deposited_at FROM mailbox_items"
                f" WHERE id IN ({', '.join('?' * len(chosen))})",
                tuple(chosen),
            )
        }
        return [found[i] for i in chosen if i in found], more

    def delete(self, box: bytes, item_ids: tuple[bytes, ...]) -> None:
        """Delete the owner's items among ``item_ids`` (at most MAX_ITEMS, as
        a request carries); others' and unknown IDs are ignored."""
        if not item_ids:
            return
        # Found by their IDs: "+" keeps the planner from reading every item of
        # the owner's through an index on mailbox_id instead.
        where = f"id IN ({', '.join('?' * len(item_ids))}) AND +mailbox_id = ?"
        with self.db.transaction():
            gone = self.db.all(
                f"SELECT source, count(*), sum(size) FROM mailbox_items WHERE {where}"
                " GROUP BY source",
                (*item_ids, box),
            )
            self.db.execute(f"DELETE FROM mailbox_items WHERE {where}", (*item_ids, box))
            for source, count, size in gone:
                self._count(box, bytes(source), -int(count), -int(size))

    def expire(self, now: int) -> int:
        """Delete expired envelopes, and owners that stopped collecting long ago
        (with what they left); returns how many envelopes went."""
        with self.db.transaction():
            gone = 0
            # The expiry index, named: with no statistics the planner would
            # rather read the whole table in mailbox order for the GROUP BY.
            for box, source, count, size in self.db.all(
                "SELECT mailbox_id, source, count(*), sum(size) FROM mailbox_items"
                " INDEXED BY mailbox_items_by_expiry WHERE expires_at <= ?"
                " GROUP BY mailbox_id, source",
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
                self._owner_keys.pop(box, None)
                gone += int(
                    self.db.one("SELECT items FROM mailbox_owners WHERE mailbox_id = ?", (box,))[0]
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
