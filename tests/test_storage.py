"""The encrypted database: real SQLCipher files."""

import ast
import hashlib
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import sqlcipher3
import trio

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


# -- commits off the event loop -------------------------------------------------------


class SlowCommits:
    """The real connection, with every COMMIT held for ``delay`` seconds (in
    whichever thread runs it) or failing, and a record of the threads."""

    def __init__(self, connection: object, delay: float = 0.3, fail: bool = False) -> None:
        self.connection = connection
        self.delay = delay
        self.fail = fail
        self.commit_threads: list[int] = []

    def execute(self, sql: str, params: object = ()) -> object:
        if sql == "COMMIT":
            self.commit_threads.append(threading.get_ident())
            time.sleep(self.delay)
            if self.fail:
                raise sqlcipher3.OperationalError("disk I/O error")
        return self.connection.execute(sql, params)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.connection, name)


def slow(db: Database, **kwargs: object) -> SlowCommits:
    proxy = SlowCommits(db._db, **kwargs)  # type: ignore[arg-type]
    db._db = proxy
    return proxy


def stored_elsewhere(home: Path, key: str) -> bytes | None:
    """What a second connection (another process, after a crash) reads."""
    other = Database.open(home, "right")
    try:
        return other.get_meta(key)
    finally:
        other.close()


def test_an_off_loop_commit_lets_the_loop_run_and_holds_back_every_other_use(home: Path):
    db = Database.open(home, "right")
    proxy = slow(db)
    ticks: list[float] = []
    seen: list[tuple[str, bytes | None, float]] = []

    async def main() -> None:
        async def ticker() -> None:
            for _ in range(10):
                ticks.append(time.monotonic())
                await trio.sleep(0.01)

        async def reader() -> None:
            await trio.sleep(0.05)  # the commit is under way by now
            value = db.get_meta("k")  # waits for the commit to end
            seen.append(("reader", value, time.monotonic() - start))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            nursery.start_soon(reader)
            async with db.transaction_off_loop():
                db.set_meta("k", b"v")
            seen.append(("committed", stored_elsewhere(home, "k"), time.monotonic() - start))

    start = time.monotonic()
    trio.run(main)
    assert proxy.commit_threads and proxy.commit_threads[0] != threading.get_ident()
    assert sum(1 for t in ticks if t < start + 0.25) >= 5  # the loop went on meanwhile
    by = {what: (value, at) for what, value, at in seen}
    assert by["committed"][0] == b"v"
    # the reader, started during the commit, waited for it: no read ahead of one
    assert by["reader"] == (b"v", by["reader"][1]) and by["reader"][1] >= 0.3
    db.close()


def test_an_off_loop_transaction_is_all_or_nothing(home: Path):
    db = Database.open(home, "right")

    async def body_fails() -> None:
        async with db.transaction_off_loop():
            db.set_meta("half", b"done")
            raise RuntimeError("crash halfway")

    with pytest.raises(RuntimeError):
        trio.run(body_fails)
    assert db.get_meta("half") is None

    slow(db, delay=0.0, fail=True)

    async def commit_fails() -> None:
        async with db.transaction_off_loop():
            db.set_meta("lost", b"x")

    with pytest.raises(sqlcipher3.OperationalError, match="disk I/O"):
        trio.run(commit_fails)
    db._db = db._db.connection  # type: ignore[attr-defined]
    assert db.get_meta("lost") is None  # rolled back, and the connection still works
    with db.transaction():
        db.set_meta("after", b"fine")
    assert stored_elsewhere(home, "after") == b"fine"
    db.close()


def test_a_cancelled_caller_still_learns_its_commit_happened(home: Path):
    db = Database.open(home, "right")
    slow(db, delay=0.3)
    outcome: list[str] = []

    async def main() -> None:
        with trio.move_on_after(0.05) as scope:
            async with db.transaction_off_loop():
                db.set_meta("k", b"kept")
            outcome.append("returned")
        outcome.append("cancelled" if scope.cancelled_caught else "not cancelled")

    trio.run(main)
    # the commit is never abandoned half-known: it finished, and is durable
    assert stored_elsewhere(home, "k") == b"kept"
    assert outcome in (["cancelled"], ["returned", "not cancelled"])
    db.close()


def test_an_off_loop_transaction_inside_another_joins_it(home: Path):
    db = Database.open(home, "right")
    proxy = slow(db, delay=0.0)

    async def main() -> None:
        with db.transaction():
            async with db.transaction_off_loop():
                db.set_meta("inner", b"1")
            db.set_meta("outer", b"2")
            raise RuntimeError("the outer one fails")

    with pytest.raises(RuntimeError):
        trio.run(main)
    assert db.get_meta("inner") is None and db.get_meta("outer") is None
    assert proxy.commit_threads == []
    db.close()


def awaits_inside_transactions(source: str) -> list[int]:
    """Lines where an async function awaits inside a synchronous transaction
    or savepoint: another task could then join that transaction."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, ast.AsyncFunctionDef):
            continue
        for block in ast.walk(function):
            if isinstance(block, ast.With) and any(
                "transaction" in ast.unparse(i.context_expr)
                or "savepoint" in ast.unparse(i.context_expr)
                for i in block.items
            ):
                for statement in block.body:
                    for node in ast.walk(statement):
                        if isinstance(node, ast.Await | ast.AsyncWith | ast.AsyncFor):
                            found.append(block.lineno)
    return found


def test_no_task_awaits_inside_a_transaction():
    """What commits off the event loop rely on: a transaction is only ever
    open while one task runs without yielding."""
    root = Path(__file__).resolve().parent.parent
    offenders = {
        str(path.relative_to(root)): lines
        for folder in ("node", "transfer", "sim", "ui")
        for path in (root / folder).glob("*.py")
        if (lines := awaits_inside_transactions(path.read_text()))
    }
    assert offenders == {}
    bad = "async def f(db):\n    with db.transaction():\n        await g()\n"
    assert awaits_inside_transactions(bad) == [2]


def test_a_task_that_reads_while_a_commit_is_handed_over_does_not_deadlock(home: Path):
    """The reader runs at the committing task's first checkpoint, before any
    thread could have been started by then: the commit must already be with
    its thread, or the reader waits for it forever with the loop blocked."""
    db = Database.open(home, "right")
    seen: list[bytes | None] = []

    async def reader() -> None:
        for _ in range(100):
            seen.append(db.get_meta("k"))
            await trio.sleep(0)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for n in range(20):
                async with db.transaction_off_loop():
                    db.set_meta("k", b"%d" % n)

    runner = threading.Thread(target=trio.run, args=(main,), daemon=True)
    runner.start()
    runner.join(timeout=20)
    assert not runner.is_alive(), "deadlocked"
    assert stored_elsewhere(home, "k") == b"19"
    db.close()


def test_two_tasks_committing_one_after_the_other_both_hold_back_the_rest(home: Path):
    """A's commit ends while B's is under way: B's must still hold back a
    third task's transaction until it is durable."""
    db = Database.open(home, "right")
    slow(db, delay=0.2)
    order: list[str] = []

    async def commit(name: str, delay: float) -> None:
        await trio.sleep(delay)
        async with db.transaction_off_loop():
            db.set_meta(name, b"1")
        order.append(name)

    async def third() -> None:
        await trio.sleep(0.3)  # A is done by now, B's commit under way
        with db.transaction():
            db.set_meta("c", b"1")
        order.append("c")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(commit, "a", 0.0)
            nursery.start_soon(commit, "b", 0.1)
            nursery.start_soon(third)

    trio.run(main)
    assert sorted(order) == ["a", "b", "c"]
    for key in ("a", "b", "c"):
        assert stored_elsewhere(home, key) == b"1"
    db.close()
