"""The node's encrypted database: SQLite in SQLCipher form.

The key is derived from the user's passphrase with Argon2id (pynacl); the
salt and cost parameters live beside the database in ``key.json``.  WAL mode
with ``synchronous=FULL``: a committed transaction survives kill -9 and power
loss.  The schema is versioned and migrated forward on open.  Every state
change that must not be half-done (a ratchet step and the message it
produced) happens inside one ``transaction()``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlcipher3
from nacl import pwhash

from pigeon.protocol import PigeonError

KEY_FILE = "key.json"
DB_FILE = "pigeon.db"


class StorageError(PigeonError):
    """The database cannot be opened or used."""


class WrongPassphrase(StorageError):
    pass


MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE signed_prekeys (
        id INTEGER PRIMARY KEY, private BLOB NOT NULL, public BLOB NOT NULL,
        created_at INTEGER NOT NULL, retired_at INTEGER);
    CREATE TABLE one_time_prekeys (
        id INTEGER PRIMARY KEY, private BLOB NOT NULL, public BLOB NOT NULL,
        signature BLOB NOT NULL, created_at INTEGER NOT NULL);
    CREATE TABLE contacts (
        identity_key BLOB PRIMARY KEY, identity_id TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL, alias TEXT UNIQUE, hint_addresses TEXT NOT NULL DEFAULT '[]',
        record BLOB, record_sequence INTEGER NOT NULL DEFAULT -1,
        lamport INTEGER NOT NULL DEFAULT 0, added_at INTEGER NOT NULL,
        last_seen INTEGER);
    CREATE TABLE sessions (
        base_key BLOB PRIMARY KEY, identity_key BLOB NOT NULL, state BLOB NOT NULL,
        active INTEGER NOT NULL, updated_at INTEGER NOT NULL);
    CREATE INDEX sessions_by_contact ON sessions (identity_key, active);
    CREATE TABLE messages (
        id BLOB PRIMARY KEY, contact BLOB NOT NULL, direction TEXT NOT NULL,
        text TEXT NOT NULL, lamport INTEGER NOT NULL, sent_at INTEGER NOT NULL,
        received_at INTEGER, status TEXT NOT NULL);
    CREATE INDEX messages_by_contact ON messages (contact, lamport, id);
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, digest BLOB NOT NULL UNIQUE,
        contact BLOB NOT NULL, message_id BLOB, envelope BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE received_envelopes (digest BLOB PRIMARY KEY, received_at INTEGER NOT NULL);
    """,
    # version 2: mailboxes, both roles
    """
    CREATE TABLE mailbox_owners (
        mailbox_id BLOB PRIMARY KEY, public_key BLOB NOT NULL, registered_at INTEGER NOT NULL,
        quota_messages INTEGER NOT NULL, quota_bytes INTEGER NOT NULL);
    CREATE TABLE mailbox_items (
        id BLOB PRIMARY KEY, mailbox_id BLOB NOT NULL, envelope BLOB NOT NULL,
        size INTEGER NOT NULL, deposited_at INTEGER NOT NULL, expires_at INTEGER NOT NULL);
    CREATE INDEX mailbox_items_by_box ON mailbox_items (mailbox_id, deposited_at);
    CREATE INDEX mailbox_items_by_expiry ON mailbox_items (expires_at);
    CREATE TABLE my_mailboxes (
        peer_id BLOB PRIMARY KEY, addresses TEXT NOT NULL, registered_at INTEGER NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0);
    """,
    # version 3: one-time prekeys left with mailboxes
    """
    CREATE TABLE mailbox_prekeys (
        mailbox_id BLOB NOT NULL, prekey_id INTEGER NOT NULL, prekey BLOB NOT NULL,
        PRIMARY KEY (mailbox_id, prekey_id));
    ALTER TABLE one_time_prekeys ADD COLUMN mailbox BLOB;
    """,
]


def derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), salt, opslimit, memlimit)


class Database:
    """One node's database.  Not thread-safe: the node uses it from one thread."""

    def __init__(self, connection: Any, path: Path) -> None:
        self._db = connection
        self.path = path
        self._depth = 0

    @classmethod
    def create(cls, home: Path, passphrase: str, *, fast_kdf: bool = False) -> Database:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        if (home / DB_FILE).exists():
            raise StorageError(f"{home} already holds a Pigeon identity")
        params = {
            "kdf": "argon2id",
            "salt": os.urandom(pwhash.argon2id.SALTBYTES).hex(),
            "opslimit": pwhash.argon2id.OPSLIMIT_INTERACTIVE
            if fast_kdf
            else pwhash.argon2id.OPSLIMIT_MODERATE,
            "memlimit": pwhash.argon2id.MEMLIMIT_INTERACTIVE
            if fast_kdf
            else pwhash.argon2id.MEMLIMIT_MODERATE,
        }
        key_file = home / KEY_FILE
        key_file.write_text(json.dumps(params))
        key_file.chmod(0o600)
        return cls.open(home, passphrase)

    @classmethod
    def open(cls, home: Path, passphrase: str) -> Database:
        key_file, db_file = home / KEY_FILE, home / DB_FILE
        try:
            params = json.loads(key_file.read_text())
            salt = bytes.fromhex(params["salt"])
            key = derive_key(passphrase, salt, int(params["opslimit"]), int(params["memlimit"]))
        except FileNotFoundError:
            raise StorageError(f"no Pigeon identity in {home} (run: pigeon init)") from None
        except (ValueError, KeyError, TypeError):
            raise StorageError(f"{key_file} is damaged") from None
        connection = sqlcipher3.connect(str(db_file), isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA cipher_log_level = NONE")
        connection.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlcipher3.DatabaseError:
            connection.close()
            raise WrongPassphrase(f"wrong passphrase for {home}") from None
        db_file.chmod(0o600)
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA secure_delete = ON")  # deleted rows are overwritten
        connection.execute("PRAGMA foreign_keys = ON")
        db = cls(connection, db_file)
        db._migrate()
        return db

    def close(self) -> None:
        self._db.close()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StorageError(
                f"{self.path} was written by a newer Pigeon (schema {version}); upgrade Pigeon"
            )
        for number in range(version, len(MIGRATIONS)):
            with self.transaction():
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number + 1}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing; nested uses join the outer transaction."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self._db.execute("ROLLBACK")
            raise
        self._depth = 0
        self._db.execute("COMMIT")

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested all-or-nothing step inside ``transaction()``."""
        if not self._depth:
            raise StorageError("a savepoint needs an open transaction")
        self._db.execute("SAVEPOINT step")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK TO step")
            self._db.execute("RELEASE step")
            raise
        self._db.execute("RELEASE step")

    def execute(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        return self._db.execute(sql, params)

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        return self._db.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Any]:
        return self._db.execute(sql, params).fetchall()

    # -- meta --------------------------------------------------------------

    def get_meta(self, key: str) -> bytes | None:
        row = self.one("SELECT value FROM meta WHERE key = ?", (key,))
        return None if row is None else bytes(row[0])

    def set_meta(self, key: str, value: bytes) -> None:
        self.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )
