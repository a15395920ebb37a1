"""Our own prekeys: the signed prekey we publish (rotated weekly, the retired
ones kept two more weeks for sessions started from an older record) and the
one-time prekeys we leave with our mailboxes.  Synchronous, database only.
"""

from __future__ import annotations

from collections.abc import Callable

from pigeon.protocol import IdentityKeyPair, OneTimePrekey, Random, SignedPrekey
from pigeon.protocol.crypto import x25519_keypair

from .storage import Database

SIGNED_PREKEY_LIFETIME = 7 * 24 * 3600
RETIRED_PREKEY_KEPT = 14 * 24 * 3600
# A one-time prekey's private half is kept this long: longer than a mailbox
# hands the public half out (30 days) plus an envelope's life (30 days), so a
# session started with one can always be answered, and no longer, so a drain
# cannot grow this table for ever.
ONE_TIME_PREKEY_LIFETIME = 60 * 24 * 3600


class Prekeys:
    def __init__(
        self, db: Database, identity: IdentityKeyPair, random: Random, clock: Callable[[], int]
    ) -> None:
        self.db = db
        self.identity = identity
        self.random = random
        self.clock = clock

    def current_signed(self) -> SignedPrekey:
        """The signed prekey to publish, rotated when it is a week old."""
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

    def signed_private(self, prekey_id: int) -> bytes | None:
        row = self.db.one("SELECT private FROM signed_prekeys WHERE id = ?", (prekey_id,))
        return None if row is None else bytes(row[0])

    def new_one_time(self, count: int, mailbox: bytes) -> list[OneTimePrekey]:
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

    def one_time_private(self, prekey_id: int) -> bytes | None:
        row = self.db.one("SELECT private FROM one_time_prekeys WHERE id = ?", (prekey_id,))
        return None if row is None else bytes(row[0])

    def outstanding(self, mailbox: bytes) -> int:
        """One-time prekeys left with ``mailbox`` whose private half we still hold."""
        return int(
            self.db.one("SELECT count(*) FROM one_time_prekeys WHERE mailbox = ?", (mailbox,))[0]
        )

    def expire_one_time(self) -> int:
        cursor = self.db.execute(
            "DELETE FROM one_time_prekeys WHERE created_at < ?",
            (self.clock() - ONE_TIME_PREKEY_LIFETIME,),
        )
        return int(cursor.rowcount)

    def used_one_time(self, prekey_id: int) -> None:
        """A session was set up with it: it must never work again."""
        self.db.execute("DELETE FROM one_time_prekeys WHERE id = ?", (prekey_id,))
