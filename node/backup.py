"""Encrypted backups of a node's database, and restoring one into a new home.

A backup holds every table of the database (identity, contacts, sessions,
history, settings, a mailbox peer's holdings), encrypted under a key derived
from a backup passphrase with Argon2id and sealed with XChaCha20-Poly1305;
the format is versioned and written down in docs/protocol/backup.md.  It is
written atomically: a crash leaves the old file or the new one, whole.

Restoring checks the whole file before it creates anything, so a wrong
passphrase or a damaged file changes nothing.  A restored node starts new
sessions for what it sends (a restored session may be behind its contact's,
and sending from it again would reuse message keys) while still reading
what arrives in the old ones; a contact whose messages it can no longer
read is asked for a new session, as after any lost session.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

from nacl import pwhash
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.exceptions import CryptoError

from pigeon.protocol import PigeonError

from .storage import MIGRATIONS, Database, StorageError, write_atomically

MAGIC = b"PIGEON-BACKUP\n"
VERSION = 1
# magic, version, Argon2id opslimit and memlimit, salt, nonce
_HEADER = struct.Struct(f">{len(MAGIC)}sBII16s24s")
OPSLIMIT = pwhash.argon2id.OPSLIMIT_MODERATE
MEMLIMIT = pwhash.argon2id.MEMLIMIT_MODERATE
MAX_OPSLIMIT = 10
MAX_MEMLIMIT = pwhash.argon2id.MEMLIMIT_SENSITIVE
MAX_PAYLOAD = 1 << 34  # 16 GiB, inflated: a bound on what a damaged file can make us allocate


class BackupError(PigeonError):
    """A backup that cannot be written, read or restored; the message says why."""


def _key(passphrase: str, salt: bytes, opslimit: int, memlimit: int) -> bytes:
    return pwhash.argon2id.kdf(32, passphrase.encode("utf-8"), salt, opslimit, memlimit)


def _tables(db: Database) -> list[str]:
    """The tables a backup holds: every table of ours, not SQLite's own nor
    the search index (rebuilt from the messages on restore)."""
    return [
        str(row[0])
        for row in db.all(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " AND name NOT LIKE 'messages_fts%' ORDER BY name"
        )
    ]


def _value(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b": base64.b64encode(bytes(value)).decode("ascii")}
    return value


def _unvalue(value: object) -> object:
    if isinstance(value, dict):
        return base64.b64decode(value["b"], validate=True)
    if value is None or isinstance(value, int | float | str):
        return value
    raise BackupError("the backup holds a value of an unknown kind")


def dump(db: Database, now: float) -> bytes:
    """Every table's rows, as one consistent snapshot (one transaction)."""
    tables: dict[str, Any] = {}
    with db.transaction():
        schema = db.schema
        for table in _tables(db):
            columns = [str(row[1]) for row in db.all(f'PRAGMA table_info("{table}")')]
            listed = ", ".join(f'"{c}"' for c in columns)
            rows = [[_value(v) for v in row] for row in db.all(f'SELECT {listed} FROM "{table}"')]
            tables[table] = {"columns": columns, "rows": rows}
    return json.dumps(
        {"format": "pigeon-backup", "schema": schema, "created_at": now, "tables": tables},
        separators=(",", ":"),
    ).encode()


def create(db: Database, path: Path, passphrase: str, *, now: float | None = None) -> int:
    """Write an encrypted backup of ``db`` to ``path``; its size in bytes."""
    if not passphrase:
        raise BackupError("a backup needs a passphrase (it is all that protects it)")
    payload = zlib.compress(dump(db, time.time() if now is None else now), 6)
    salt, nonce = os.urandom(16), os.urandom(24)
    header = _HEADER.pack(MAGIC, VERSION, OPSLIMIT, MEMLIMIT, salt, nonce)
    key = _key(passphrase, salt, OPSLIMIT, MEMLIMIT)
    sealed = crypto_aead_xchacha20poly1305_ietf_encrypt(payload, header, nonce, key)
    data = header + sealed
    try:
        write_atomically(path, data)
    except OSError as error:
        raise BackupError(f"cannot write {path}: {error.strerror}") from None
    return len(data)


def read(path: Path, passphrase: str) -> dict[str, Any]:
    """The contents of a backup file, checked whole (one clear error otherwise)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BackupError(f"{path}: no such file") from None
    except OSError as error:
        raise BackupError(f"cannot read {path}: {error.strerror}") from None
    if len(data) < _HEADER.size or not data.startswith(MAGIC):
        raise BackupError(f"{path} is not a Pigeon backup")
    _, version, opslimit, memlimit, salt, nonce = _HEADER.unpack_from(data)
    if version != VERSION:
        raise BackupError(
            f"{path} is a backup of format {version}, which this Pigeon cannot read (upgrade it)"
        )
    if not (
        pwhash.argon2id.OPSLIMIT_MIN <= opslimit <= MAX_OPSLIMIT
        and pwhash.argon2id.MEMLIMIT_MIN <= memlimit <= MAX_MEMLIMIT
    ):
        raise BackupError(f"{path} is damaged (its key settings are out of range)")
    key = _key(passphrase, salt, opslimit, memlimit)
    try:
        payload = crypto_aead_xchacha20poly1305_ietf_decrypt(
            data[_HEADER.size :], data[: _HEADER.size], nonce, key
        )
    except CryptoError:
        raise BackupError(
            f"cannot open {path}: the backup passphrase is wrong, or the file is damaged"
        ) from None
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(payload, MAX_PAYLOAD)
        if inflater.unconsumed_tail:
            raise BackupError(f"{path} is too large to restore")
        contents = json.loads(raw)
    except (zlib.error, ValueError):
        raise BackupError(
            f"{path} is damaged (it decrypts, but what it holds is not a backup)"
        ) from None
    if not isinstance(contents, dict) or contents.get("format") != "pigeon-backup":
        raise BackupError(f"{path} is damaged (it decrypts, but what it holds is not a backup)")
    schema = contents.get("schema")
    if not isinstance(schema, int) or not 1 <= schema <= len(MIGRATIONS):
        raise BackupError(
            f"{path} was made by a newer Pigeon (schema {schema}); upgrade Pigeon to restore it"
        )
    return contents


def restore(path: Path, passphrase: str, home: Path, db_passphrase: str) -> Database:
    """Restore a backup into ``home``, which must hold no database yet, under
    a (new) database passphrase.  Nothing is created unless the backup reads
    whole; a failure halfway leaves no database behind."""
    contents = read(path, passphrase)
    if (home / "pigeon.db").exists():
        raise BackupError(
            f"{home} already holds a Pigeon database: restore into a new home (--home DIR),"
            f" or move {home} aside first"
        )
    try:
        db = Database.create(home, db_passphrase, schema=contents["schema"])
    except StorageError as error:
        raise BackupError(str(error)) from None
    try:
        with db.transaction():
            known = set(_tables(db))
            for table, body in contents["tables"].items():
                if table not in known:
                    raise BackupError(f"{path} is damaged (it holds an unknown table {table!r})")
                columns = body["columns"]
                listed = ", ".join(f'"{c}"' for c in columns)
                marks = ", ".join("?" * len(columns))
                db.execute(f'DELETE FROM "{table}"')  # what creating the schema put there
                for row in body["rows"]:
                    db.execute(
                        f'INSERT INTO "{table}" ({listed}) VALUES ({marks})',
                        tuple(_unvalue(v) for v in row),
                    )
        db.migrate()
        with db.transaction():
            db.execute("INSERT INTO messages_fts (messages_fts) VALUES ('rebuild')")
            _start_sessions_afresh(db)
            db.set_meta("restored_at", str(int(time.time())).encode())
    except BaseException:
        db.close()
        for leftover in home.glob("pigeon.db*"):
            leftover.unlink(missing_ok=True)
        (home / "key.json").unlink(missing_ok=True)
        raise
    return db


def _start_sessions_afresh(db: Database) -> None:
    """Sessions restored from a backup may be behind the contacts' copies:
    they still read what arrives in them, but nothing is sent from them
    again (that could reuse message keys).  What waits goes out in new
    sessions; encrypted copies made in the old ones go."""
    db.execute("UPDATE sessions SET active = 0")
    db.execute("UPDATE pending_out SET session = NULL")
    db.execute("DELETE FROM outbox")


def restored_notice(db: Database) -> str | None:
    """What to tell the user, once, after a restore (None otherwise)."""
    raw = db.get_meta("restored_at")
    if raw is None:
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(int(raw)))
    return (
        f"restored from a backup on {when}: new sessions start with your contacts as messages"
        " flow; messages they sent that this copy cannot read are sent again"
    )
