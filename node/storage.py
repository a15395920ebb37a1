"""The node's encrypted database: SQLite in SQLCipher form.

The key is derived from the user's passphrase with Argon2id (pynacl); the
salt and cost parameters live beside the database in ``key.json`` (written
atomically: it holds the only copy of the salt), with a check value of the
key that tells a wrong passphrase from a damaged database.  Opening never
creates a database and checks every page (``PRAGMA quick_check``).  WAL mode
with ``synchronous=FULL``: a committed transaction survives kill -9 and power
loss.  The schema is versioned and migrated forward on open.  Every state
change that must not be half-done (a ratchet step and the message it
produced) happens inside one ``transaction()``.

The event loop's busiest transactions (storing what arrived, a ratchet step,
settling what a peer acknowledged, queueing a message) use
``transaction_off_loop()``: the same all-or-nothing transaction, whose COMMIT
(fsync, page encryption, and any WAL checkpoint) runs in a worker thread
while the loop goes on with the network.  Until that commit is done, every
other use of the connection waits for it, so nothing is read, written or
acknowledged past a commit that has not happened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import queue
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import sqlcipher3
from nacl import pwhash

from pigeon.protocol import PigeonError

KEY_FILE = "key.json"
DB_FILE = "pigeon.db"


class StorageError(PigeonError):
    """The database cannot be opened or used."""


class WrongPassphrase(StorageError):
    pass


class DatabaseDamaged(StorageError):
    """The key is right but the file cannot be read."""


KEY_CHECK_LABEL = b"pigeon key check v1"
# Bounds for key.json's cost parameters: pynacl's own minimums, and maximums
# well above what Pigeon writes (MODERATE: 3 passes, 256 MiB) that still
# finish in seconds without exhausting memory: a damaged or hostile key.json
# must not hang the command or crash it.
MIN_OPSLIMIT = pwhash.argon2id.OPSLIMIT_MIN
MAX_OPSLIMIT = 10
MIN_MEMLIMIT = pwhash.argon2id.MEMLIMIT_MIN
MAX_MEMLIMIT = pwhash.argon2id.MEMLIMIT_SENSITIVE  # 1 GiB
SQLITE_CORRUPT, SQLITE_NOTADB = 11, 26


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
    # version 4: no silent loss.  Every outgoing message waits in pending_out,
    # in the clear, until the contact confirms it (durable kinds) or until it is
    # encrypted (receipts, resets), so it can be encrypted again in a new
    # session; messages say why they failed or what they wait for; devices of
    # contacts are indexed for cheap lookups by peer.
    """
    CREATE TABLE pending_out (
        message_id BLOB PRIMARY KEY, contact BLOB NOT NULL, app BLOB NOT NULL,
        lamport INTEGER NOT NULL, durable INTEGER NOT NULL, session BLOB,
        resends INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
    CREATE INDEX pending_out_by_contact ON pending_out (contact, lamport);
    CREATE INDEX outbox_by_message ON outbox (message_id);
    ALTER TABLE messages ADD COLUMN reason TEXT;
    ALTER TABLE contacts ADD COLUMN reset_at INTEGER;
    CREATE TABLE contact_devices (
        peer_id BLOB NOT NULL, identity_key BLOB NOT NULL, PRIMARY KEY (peer_id, identity_key));
    """,
    # version 5: hostile peers.  As a mailbox: counters per owner and per
    # source (a deposit token, or strangers' work), so quotas never scan;
    # envelopes deduplicated by digest; owners that stop collecting expire;
    # one-time prekeys age out.  As a contact: the deposit token a contact
    # gave us, and when we last gave ours.
    """
    ALTER TABLE mailbox_owners ADD COLUMN items INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mailbox_owners ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE mailbox_owners ADD COLUMN last_proof_at INTEGER;
    ALTER TABLE mailbox_items ADD COLUMN digest BLOB;
    ALTER TABLE mailbox_items ADD COLUMN source BLOB NOT NULL DEFAULT X'';
    CREATE UNIQUE INDEX mailbox_items_by_digest ON mailbox_items (mailbox_id, digest);
    CREATE TABLE mailbox_usage (
        mailbox_id BLOB NOT NULL, source BLOB NOT NULL, items INTEGER NOT NULL,
        bytes INTEGER NOT NULL, PRIMARY KEY (mailbox_id, source));
    CREATE INDEX mailbox_usage_by_source ON mailbox_usage (source);
    INSERT INTO mailbox_usage (mailbox_id, source, items, bytes)
        SELECT mailbox_id, source, count(*), sum(size) FROM mailbox_items
        GROUP BY mailbox_id, source;
    UPDATE mailbox_owners SET
        items = (SELECT count(*) FROM mailbox_items i
                 WHERE i.mailbox_id = mailbox_owners.mailbox_id),
        bytes = (SELECT coalesce(sum(size), 0) FROM mailbox_items i
                 WHERE i.mailbox_id = mailbox_owners.mailbox_id);
    ALTER TABLE mailbox_prekeys ADD COLUMN added_at INTEGER NOT NULL DEFAULT 0;
    UPDATE mailbox_prekeys SET added_at = CAST(strftime('%s', 'now') AS INTEGER);
    ALTER TABLE contacts ADD COLUMN mailbox_token BLOB;
    ALTER TABLE contacts ADD COLUMN token_sent_at INTEGER;
    """,
    # version 6: file transfers, both directions.  The file's key and chunk
    # hashes are kept so either side can resume after a restart; a file offer
    # shown in the conversation names its transfer.
    """
    CREATE TABLE transfers (
        id BLOB PRIMARY KEY, direction TEXT NOT NULL, contact BLOB NOT NULL,
        uri TEXT NOT NULL, file_key BLOB NOT NULL, sha256 BLOB NOT NULL, leaves BLOB,
        state TEXT NOT NULL, error TEXT, source TEXT, folder TEXT, path TEXT,
        bytes_done INTEGER NOT NULL DEFAULT 0, bytes_sent INTEGER NOT NULL DEFAULT 0,
        offer_message BLOB, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
    CREATE INDEX transfers_by_state ON transfers (state);
    ALTER TABLE messages ADD COLUMN transfer BLOB;
    ALTER TABLE contacts ADD COLUMN auto_accept_bytes INTEGER;
    """,
    # version 7: how an incoming message reached us: 'direct' from the
    # sender's device or 'mailbox' collected from one of our mailboxes.  A
    # mailbox we stop using is retired, not forgotten: what senders left there
    # before they saw our new record is still collected.
    """
    ALTER TABLE messages ADD COLUMN via TEXT;
    ALTER TABLE my_mailboxes ADD COLUMN failing_since INTEGER;
    ALTER TABLE my_mailboxes ADD COLUMN retired_at INTEGER;
    """,
    # version 8: trust.  A contact is marked verified once its safety number
    # was compared; identities can be blocked; a stranger's first messages
    # wait in a bounded list of requests until accepted (requests.py).  A
    # contact whose record says it moved to a new identity waits for the
    # user to accept the new key (moved_to).
    """
    ALTER TABLE contacts ADD COLUMN verified_at INTEGER;
    CREATE TABLE blocked (
        identity_key BLOB PRIMARY KEY, identity_id TEXT NOT NULL, blocked_at INTEGER NOT NULL);
    CREATE TABLE requests (
        identity_key BLOB PRIMARY KEY, identity_id TEXT NOT NULL, name TEXT,
        first_at INTEGER NOT NULL, last_at INTEGER NOT NULL,
        messages INTEGER NOT NULL DEFAULT 0, refused INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX requests_by_age ON requests (first_at);
    CREATE TABLE request_messages (
        id BLOB PRIMARY KEY, identity_key BLOB NOT NULL, text TEXT NOT NULL,
        lamport INTEGER NOT NULL, sent_at INTEGER NOT NULL, received_at INTEGER NOT NULL);
    CREATE INDEX request_messages_by_sender ON request_messages (identity_key, lamport);
    ALTER TABLE received_envelopes ADD COLUMN stranger BLOB;
    CREATE INDEX received_envelopes_by_stranger ON received_envelopes (stranger);
    ALTER TABLE contacts ADD COLUMN moved_to BLOB;
    ALTER TABLE contacts ADD COLUMN moved_at INTEGER;
    """,
    # version 9: history search and disappearing messages.  A full-text
    # index (FTS5) over message texts, inside the encrypted database, kept in
    # step by triggers; a per-conversation timer and per-message expiry
    # (also on the encrypted copies waiting to go, so a mailbox drops them
    # in time).
    """
    ALTER TABLE contacts ADD COLUMN timer_s INTEGER;
    ALTER TABLE messages ADD COLUMN expires_at INTEGER;
    CREATE INDEX messages_by_expiry ON messages (expires_at) WHERE expires_at IS NOT NULL;
    ALTER TABLE outbox ADD COLUMN expires_at INTEGER;
    ALTER TABLE request_messages ADD COLUMN expires_at INTEGER;
    ALTER TABLE requests ADD COLUMN mailbox_token BLOB;
    CREATE VIRTUAL TABLE messages_fts USING fts5(text, content='messages', content_rowid='rowid');
    INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');
    CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts (rowid, text) VALUES (new.rowid, new.text);
    END;
    CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    END;
    CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
        INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
        INSERT INTO messages_fts (rowid, text) VALUES (new.rowid, new.text);
    END;
    """,
]


def statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, each whole (a trigger's body holds
    semicolons of its own)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlcipher3.complete_statement(pending):
            if pending.strip(" \n;"):
                yield pending
            pending = ""
    if pending.strip(" \n;"):
        raise ValueError(f"an incomplete SQL statement: {pending.strip()[:60]!r}")


def derive_key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), salt, opslimit, memlimit)


def key_check(key: bytes) -> str:
    """A check value of the derived key, kept in key.json: HMAC under a fixed
    label, so it reveals nothing of the key.  (It lets a thief test guesses of
    the passphrase offline, which the encrypted database already allows.)"""
    return hmac.new(key, KEY_CHECK_LABEL, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class KeyParams:
    salt: bytes
    opslimit: int
    memlimit: int
    check: str | None  # None in key.json files written before the check existed


def _key_params(raw: Any) -> KeyParams | str:
    """The validated parameters, or what is wrong with them."""
    if not isinstance(raw, dict):
        return "not a JSON object"
    if raw.get("kdf") != "argon2id":
        return f"unknown kdf {raw.get('kdf')!r}"
    salt_hex = raw.get("salt")
    try:
        salt = bytes.fromhex(salt_hex) if isinstance(salt_hex, str) else b""
    except ValueError:
        salt = b""
    if len(salt) != pwhash.argon2id.SALTBYTES:
        return f"the salt is not {pwhash.argon2id.SALTBYTES} bytes in hex"
    opslimit, memlimit = raw.get("opslimit"), raw.get("memlimit")
    if type(opslimit) is not int or not MIN_OPSLIMIT <= opslimit <= MAX_OPSLIMIT:
        return f"opslimit {opslimit!r} is not a whole number from {MIN_OPSLIMIT} to {MAX_OPSLIMIT}"
    if type(memlimit) is not int or not MIN_MEMLIMIT <= memlimit <= MAX_MEMLIMIT:
        return f"memlimit {memlimit!r} is not a whole number from {MIN_MEMLIMIT} to {MAX_MEMLIMIT}"
    check = raw.get("check")
    if check is not None and (
        not isinstance(check, str) or len(check) != 64 or check.strip("0123456789abcdef")
    ):
        return "the key check is not 64 hex digits"
    return KeyParams(salt, opslimit, memlimit, check)


def _derive(passphrase: str, params: KeyParams) -> bytes:
    try:
        return derive_key(passphrase, params.salt, params.opslimit, params.memlimit)
    except (MemoryError, nacl.exceptions.RuntimeError):
        need = params.memlimit >> 20
        raise StorageError(
            f"deriving the key needs {need} MiB of memory, which this machine could not give;"
            " close other programs and try again"
        ) from None


def _write_key_file(path: Path, params: dict[str, Any]) -> None:
    """Replace key.json atomically and durably: it holds the only copy of the
    salt, so a crash must leave either the old file or the new one, whole."""
    write_atomically(path, json.dumps(params).encode())


def write_atomically(path: Path, data: bytes) -> None:
    """Write a file (readable by its owner only) so that a crash leaves the
    old file or the new one, whole, and a finished write survives a power
    loss: a temporary file beside it, fsync'd, renamed over it, and the
    folder fsync'd."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:  # mkstemp made it 0600
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(directory)  # the rename itself must survive a power loss
    finally:
        os.close(directory)


def _is_empty(db_file: Path) -> bool:
    """A zero-byte database with no write-ahead log: what an interrupted
    ``pigeon init`` leaves; nothing in it to lose."""
    wal = db_file.with_name(db_file.name + "-wal")
    return db_file.stat().st_size == 0 and (not wal.exists() or wal.stat().st_size == 0)


def _is_damage(error: BaseException) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (SQLITE_CORRUPT, SQLITE_NOTADB)


def _damaged(db_file: Path, detail: str) -> DatabaseDamaged:
    detail = " ".join(detail.split())[:200] or "unreadable"
    return DatabaseDamaged(f"the database {db_file} is damaged: {detail}; restore it from a backup")


def _quick_check(connection: Any) -> str | None:
    """What ``PRAGMA quick_check`` finds wrong (it reads every page), or None."""
    try:
        rows = connection.execute("PRAGMA quick_check").fetchall()
    except (sqlcipher3.Error, MemoryError) as error:
        # A page that fails SQLCipher's authentication code shows up as a
        # logic error, then as MemoryError on every later statement.
        return f"a page cannot be decrypted or read ({error or type(error).__name__})"
    if [tuple(row) for row in rows] == [("ok",)]:
        return None
    return "; ".join(str(row[0]) for row in rows[:3])


class Database:
    """One node's database.  Not thread-safe: the node uses it from one thread
    (and lends the connection to a worker thread for a commit, during which
    the owning thread waits before touching it: ``_settle``)."""

    def __init__(self, connection: Any, path: Path) -> None:
        self._db = connection
        self.path = path
        self._depth = 0
        self._committed: threading.Event | None = None  # a commit in the worker thread
        self._commits: queue.SimpleQueue[Callable[[], None] | None] | None = None

    @classmethod
    def create(
        cls, home: Path, passphrase: str, *, fast_kdf: bool = False, schema: int | None = None
    ) -> Database:
        """A new database (refused where one is); its schema the newest, or
        ``schema`` (a backup's, before its rows go in and it is migrated)."""
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_file = home / DB_FILE
        if db_file.exists() and not _is_empty(db_file):
            raise StorageError(
                f"{home} already holds a Pigeon identity (see it: pigeon id);"
                f" to start over, move {home} aside first"
            )
        salt = os.urandom(pwhash.argon2id.SALTBYTES)
        opslimit, memlimit = (
            (pwhash.argon2id.OPSLIMIT_INTERACTIVE, pwhash.argon2id.MEMLIMIT_INTERACTIVE)
            if fast_kdf
            else (pwhash.argon2id.OPSLIMIT_MODERATE, pwhash.argon2id.MEMLIMIT_MODERATE)
        )
        key = _derive(passphrase, KeyParams(salt, opslimit, memlimit, None))
        params = {
            "kdf": "argon2id",
            "salt": salt.hex(),
            "opslimit": opslimit,
            "memlimit": memlimit,
            "check": key_check(key),
        }
        _write_key_file(home / KEY_FILE, params)
        return cls._connect(db_file, key, create=True, key_checked=True, schema=schema)

    @classmethod
    def open(cls, home: Path, passphrase: str) -> Database:
        """Open an existing database; never creates one."""
        key_file, db_file = home / KEY_FILE, home / DB_FILE
        has_db = db_file.exists() and not _is_empty(db_file)
        try:
            text = key_file.read_bytes()
        except FileNotFoundError:
            if has_db:
                raise StorageError(
                    f"the key file {key_file} is missing (it holds the only copy of the"
                    " database's salt); restore it from a backup"
                ) from None
            raise StorageError(f"no Pigeon identity in {home} (run: pigeon init)") from None
        except OSError as error:
            raise StorageError(f"cannot read {key_file}: {error.strerror}") from None
        try:
            raw = json.loads(text)
        except ValueError:
            raw = None
        params = _key_params(raw)
        if isinstance(params, str):
            raise StorageError(
                f"the key file {key_file} is damaged ({params}); restore it from a backup"
            )
        if not db_file.exists():
            raise StorageError(
                f"the database {db_file} is missing: restore it from a backup,"
                " or run pigeon init to start a new identity"
            )
        if not has_db:
            raise StorageError(
                f"the database {db_file} is empty (an interrupted pigeon init?):"
                " run pigeon init to create your identity, or restore it from a backup"
            )
        key = _derive(passphrase, params)
        if params.check is not None and not hmac.compare_digest(params.check, key_check(key)):
            raise WrongPassphrase(f"wrong passphrase for {home}")
        db = cls._connect(db_file, key, create=False, key_checked=params.check is not None)
        if params.check is None:
            # The passphrase is proven right: add the check, so that later damage
            # is told apart from a wrong passphrase.  Best effort: the file works
            # without it.
            with suppress(OSError):
                _write_key_file(key_file, {**raw, "check": key_check(key)})
        return db

    @classmethod
    def _connect(
        cls,
        db_file: Path,
        key: bytes,
        *,
        create: bool,
        key_checked: bool,
        schema: int | None = None,
    ) -> Database:
        # mode=rw: SQLite would otherwise create a missing file, and an empty
        # database would pass for a new one.
        uri = f"{db_file.resolve().as_uri()}?mode={'rwc' if create else 'rw'}"
        try:
            connection = sqlcipher3.connect(
                uri, uri=True, isolation_level=None, check_same_thread=False
            )
        except sqlcipher3.Error as error:
            raise StorageError(f"cannot open the database {db_file}: {error}") from None
        try:
            connection.execute("PRAGMA cipher_log_level = NONE")
            connection.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
            try:
                connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlcipher3.DatabaseError as error:
                if not key_checked:
                    raise WrongPassphrase(
                        f"cannot open {db_file}: the passphrase is wrong, or the database is"
                        " damaged (if the passphrase is right, restore it from a backup)"
                    ) from None
                raise _damaged(db_file, str(error)) from None
            problem = _quick_check(connection)
            if problem is not None:
                raise _damaged(db_file, problem)
            db_file.chmod(0o600)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = FULL")
            connection.execute("PRAGMA secure_delete = ON")  # deleted rows are overwritten
            connection.execute("PRAGMA foreign_keys = ON")
            db = cls(connection, db_file)
            db.migrate(schema)
        except BaseException as error:
            connection.close()
            if _is_damage(error):
                raise _damaged(db_file, str(error)) from None
            raise
        return db

    def damage(self, error: BaseException) -> DatabaseDamaged | None:
        """If ``error``, raised while this database was in use, comes from a
        damaged file, the error to show instead; None otherwise.  Any database
        error (or MemoryError, see ``_quick_check``) is checked again against
        every page, so "locked" and other passing errors are not called damage."""
        if _is_damage(error):
            return _damaged(self.path, str(error))
        if not isinstance(error, sqlcipher3.Error | MemoryError):
            return None
        problem = _quick_check(self._db)
        return None if problem is None else _damaged(self.path, problem)

    def close(self) -> None:
        self._settle()
        if self._commits is not None:
            self._commits.put(None)  # the commit thread ends
            self._commits = None
        self._db.close()

    @property
    def schema(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, upto: int | None = None) -> None:
        """Bring the schema up to the newest version (or ``upto``)."""
        version = self.schema
        if version > len(MIGRATIONS):
            raise StorageError(
                f"{self.path} was written by a newer Pigeon (schema {version}); upgrade Pigeon"
            )
        for number in range(version, len(MIGRATIONS) if upto is None else upto):
            with self.transaction():
                for statement in statements(MIGRATIONS[number]):
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
        with self._begun():
            yield
        self._db.execute("COMMIT")

    @asynccontextmanager
    async def transaction_off_loop(self) -> AsyncIterator[None]:
        """``transaction()``, with the COMMIT in a worker thread: the event loop
        runs other tasks meanwhile, and the caller goes on (acknowledges, say)
        only once it is durable.  The body must not await: another task's
        statements would join this transaction.  Inside another transaction,
        it joins that one, as ``transaction()`` does."""
        if self._depth:
            with self.transaction():
                yield
            return
        with self._begun():
            yield
        import trio  # here: the command line opens databases without trio

        done = threading.Event()
        failure: list[BaseException] = []
        token = trio.lowlevel.current_trio_token()
        finished = trio.Event()

        def commit() -> None:
            try:
                self._db.execute("COMMIT")
            except BaseException as error:
                failure.append(error)
                with suppress(Exception):
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
            finally:
                done.set()
                with suppress(trio.RunFinishedError):
                    token.run_sync_soon(finished.set)

        # The thread is handed the commit before this task yields: a task that
        # runs meanwhile and waits for it (_settle) cannot wait for a commit
        # that has not started.
        self._committed = done
        self._committer().put(commit)
        try:
            # shielded: the caller learns how its commit ended, even when
            # cancelled (the cancellation arrives at its next checkpoint)
            with trio.CancelScope(shield=True):
                await finished.wait()
        finally:
            done.wait()
            if self._committed is done:  # not another task's, begun since
                self._committed = None
        if failure:
            raise failure[0]

    def _committer(self) -> queue.SimpleQueue[Callable[[], None] | None]:
        """The thread that makes commits off the event loop, started once."""
        if self._commits is None:
            jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

            def work() -> None:
                while (job := jobs.get()) is not None:
                    job()

            threading.Thread(target=work, name="pigeon-commits", daemon=True).start()
            self._commits = jobs
        return self._commits

    @contextmanager
    def _begun(self) -> Iterator[None]:
        """BEGIN, the body, and ROLLBACK if it raises; the caller commits."""
        self._settle()
        self._db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            # SQLite has already rolled back after some errors (a damaged
            # page): a second ROLLBACK would hide the real error.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._depth = 0

    def _settle(self) -> None:
        """Wait for a commit a worker thread is making (blocking, as a commit
        on this thread would)."""
        committed = self._committed
        if committed is not None:
            committed.wait()

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
        self._settle()
        return self._db.execute(sql, params)

    def one(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> Any:
        self._settle()
        return self._db.execute(sql, params).fetchone()

    def all(self, sql: str, params: tuple[Any, ...] | dict[str, Any] = ()) -> list[Any]:
        self._settle()
        rows: list[Any] = self._db.execute(sql, params).fetchall()  # sqlcipher3 is untyped
        return rows

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
