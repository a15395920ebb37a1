"""Encrypted backups over real databases: a round trip, an older backup that
the conversation survives, and every way a file can be wrong changing nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_conversations import Clock, exchange, friends, texts

from pigeon.node import backup
from pigeon.node.backup import BackupError
from pigeon.node.conversations import Conversations
from pigeon.node.storage import MIGRATIONS, Database

PASS = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _cheap_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    """The format's cost settings are in the file; tests write cheap ones."""
    from nacl import pwhash

    monkeypatch.setattr(backup, "OPSLIMIT", pwhash.argon2id.OPSLIMIT_MIN)
    monkeypatch.setattr(backup, "MEMLIMIT", pwhash.argon2id.MEMLIMIT_MIN)


def talk(tmp_path: Path):
    clock = Clock()
    alice, bob = friends(tmp_path, clock)
    alice.send_text(bob.identity.public_key, "hello bob")
    exchange(alice, bob)
    bob.send_text(alice.identity.public_key, "hello alice, nice weather")
    exchange(bob, alice)
    return alice, bob, clock


def restore(tmp_path: Path, file: Path, clock: Clock, name: str = "restored") -> Conversations:
    db = backup.restore(file, PASS, tmp_path / name, "new pw")
    return Conversations(db, os.urandom, clock)


def test_a_backup_restores_identity_contacts_sessions_history_and_settings(tmp_path):
    alice, bob, clock = talk(tmp_path)
    alice.set_timer(bob.identity.public_key, 3600)
    file = tmp_path / "alice.backup"
    size = backup.create(alice.db, file, PASS)
    assert size == file.stat().st_size and file.stat().st_mode & 0o777 == 0o600
    assert b"hello bob" not in file.read_bytes() and b"alice" not in file.read_bytes()

    again = restore(tmp_path, file, clock)
    assert again.identity.public_key == alice.identity.public_key
    assert again.device_seed == alice.device_seed
    assert [c.label for c in again.contacts.all()] == ["bob"]
    assert again.inbox() == alice.inbox()
    assert again.timer(bob.identity.public_key) == 3600
    assert [m["text"] for m in again.search("weather", 5)] == ["hello alice, nice weather"]
    assert again.db.one("SELECT count(*) FROM sessions")[0] == 1
    assert again.db.one("SELECT count(*) FROM sessions WHERE active = 1")[0] == 0
    assert backup.restored_notice(again.db) is not None
    # The new database has its own passphrase.
    again.db.close()
    Database.open(tmp_path / "restored", "new pw").close()


def test_an_older_backup_restored_and_the_conversation_goes_on_both_ways(tmp_path):
    alice, bob, clock = talk(tmp_path)
    a_key, b_key = alice.identity.public_key, bob.identity.public_key
    file = tmp_path / "alice.backup"
    backup.create(alice.db, file, PASS)
    # Life goes on after the backup: both ratchets move several steps.
    for i in range(3):
        alice.send_text(b_key, f"after the backup {i}")
        exchange(alice, bob)
        bob.send_text(a_key, f"reply {i}")
        exchange(bob, alice)
    alice.db.close()  # her device is lost; the backup is all she has

    alice = restore(tmp_path, file, clock)
    bob.send_text(a_key, "are you still there?")
    alice.send_text(b_key, "back from a backup")
    exchange(bob, alice, rounds=6)
    assert "back from a backup" in texts(bob)
    assert "are you still there?" in texts(alice)
    assert {m["status"] for m in alice.inbox() if m["direction"] == "out"} >= {"delivered"}
    alice.send_text(b_key, "and again")
    bob.send_text(a_key, "and again to you")
    exchange(alice, bob)
    assert texts(bob)[-1] == "and again" and texts(alice)[-1] == "and again to you"
    for conv in (alice, bob):  # nothing left waiting
        assert not conv.has_work(b_key if conv is alice else a_key)


def test_a_wrong_passphrase_or_a_damaged_file_is_one_error_and_changes_nothing(tmp_path):
    alice, _, _ = talk(tmp_path)
    file = tmp_path / "alice.backup"
    backup.create(alice.db, file, PASS)
    data = file.read_bytes()
    home = tmp_path / "new-home"
    cases: list[tuple[bytes | None, str, str]] = [
        (data, "wrong", "the backup passphrase is wrong, or the file is damaged"),
        (data[:-1], PASS, "the backup passphrase is wrong, or the file is damaged"),
        (data[:30], PASS, "is not a Pigeon backup"),
        (b"hello" * 100, PASS, "is not a Pigeon backup"),
        (None, PASS, "no such file"),
    ]
    for index in (len(backup.MAGIC), 20, len(data) // 2, len(data) - 5):  # version, keys, body
        damaged = bytearray(data)
        damaged[index] ^= 0x40
        cases.append((bytes(damaged), PASS, ""))
    for content, secret, complaint in cases:
        target = tmp_path / "case.backup"
        target.unlink(missing_ok=True)
        if content is not None:
            target.write_bytes(content)
        with pytest.raises(BackupError) as raised:
            backup.restore(target, secret, home, "pw")
        assert complaint in str(raised.value)
        assert "\n" not in str(raised.value)
        assert not (home / "pigeon.db").exists() and not (home / "key.json").exists()
    # A home that holds a database already is never written over.
    with pytest.raises(BackupError, match="already holds a Pigeon database"):
        backup.restore(file, PASS, alice.db.path.parent, "pw")
    assert Conversations(alice.db, os.urandom).identity == alice.identity


def test_writing_a_backup_is_atomic(tmp_path, monkeypatch):
    alice, _, _ = talk(tmp_path)
    file = tmp_path / "alice.backup"
    backup.create(alice.db, file, PASS)
    before = file.read_bytes()

    def crash(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BackupError, match="cannot write"):
        backup.create(alice.db, file, PASS)
    assert file.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".alice.backup")] == []


def test_a_backup_from_an_older_schema_is_migrated_on_restore(tmp_path):
    old = Database.create(tmp_path / "old", "pw", fast_kdf=True, schema=len(MIGRATIONS) - 1)
    Conversations.initialise(old, "olga", os.urandom)
    old.execute(
        "INSERT INTO contacts (identity_key, identity_id, name, added_at) VALUES (?, ?, ?, 0)",
        (b"k" * 32, "aa" * 20, "pat"),
    )
    old.execute(
        "INSERT INTO messages (id, contact, direction, text, lamport, sent_at, status)"
        " VALUES (?, ?, 'in', 'from before the index', 1, 0, 'received')",
        (b"m" * 16, b"k" * 32),
    )
    file = tmp_path / "old.backup"
    backup.create(old, file, PASS)
    new = backup.restore(file, PASS, tmp_path / "new", "pw")
    assert new.schema == len(MIGRATIONS)
    conv = Conversations(new, os.urandom)
    assert [m["text"] for m in conv.search("index", 5)] == ["from before the index"]
