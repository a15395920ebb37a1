"""The encrypted database: real SQLCipher files."""

import hashlib
import os
import sys
from pathlib import Path

import pytest

from pigeon.node.storage import MIGRATIONS, Database, StorageError, WrongPassphrase


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    db = Database.create(tmp_path / "home", "right", fast_kdf=True)
    with db.transaction():
        db.set_meta("secret", b"plaintext that must not show")
    db.close()
    return tmp_path / "home"


def test_the_file_is_encrypted(home: Path):
    raw = (home / "pigeon.db").read_bytes()
    assert b"plaintext that must not show" not in raw
    assert b"SQLite format 3" not in raw
    assert oct((home / "pigeon.db").stat().st_mode)[-3:] == "600"


def test_wrong_passphrase_is_one_clear_error_and_touches_nothing(home: Path):
    files = sorted(home.iterdir())
    before = {f.name: digest(f) for f in files}
    with pytest.raises(WrongPassphrase, match=r"^wrong passphrase for "):
        Database.open(home, "wrong")
    assert {f.name: digest(f) for f in sorted(home.iterdir())} == before


def test_reopen_and_read(home: Path):
    db = Database.open(home, "right")
    assert db.get_meta("secret") == b"plaintext that must not show"
    assert db.one("PRAGMA journal_mode")[0] == "wal"
    assert db.one("PRAGMA synchronous")[0] == 2  # FULL
    db.close()


def test_transactions_are_all_or_nothing(home: Path):
    db = Database.open(home, "right")
    with pytest.raises(RuntimeError), db.transaction():
        db.set_meta("a", b"1")
        raise RuntimeError("crash in the middle")
    assert db.get_meta("a") is None
    with db.transaction():
        db.set_meta("b", b"1")
        with pytest.raises(RuntimeError), db.savepoint():
            db.set_meta("c", b"1")
            raise RuntimeError("one step fails")
    assert db.get_meta("b") == b"1" and db.get_meta("c") is None
    db.close()


def test_schema_is_versioned_and_a_newer_one_is_refused(home: Path):
    db = Database.open(home, "right")
    assert db.one("PRAGMA user_version")[0] == len(MIGRATIONS)
    db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    db.close()
    with pytest.raises(StorageError, match="newer Pigeon"):
        Database.open(home, "right")


def test_missing_identity_is_explained(tmp_path: Path):
    with pytest.raises(StorageError, match="pigeon init"):
        Database.open(tmp_path / "nothing", "x")


def test_wrong_passphrase_from_the_command_line(home: Path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "pigeon.ui.cli", "--home", str(home), "id"],
        capture_output=True,
        text=True,
        env={**os.environ, "PIGEON_PASSPHRASE": "wrong"},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == f"pigeon: wrong passphrase for {home}\n"
