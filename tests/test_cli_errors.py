"""The command line never lies or crashes: each failure below is one line on
stderr (``pigeon: ...``), a non-zero exit and nothing changed on disk.  Bad
listen addresses, a port in use, a truncated, empty, missing or damaged
database, absurd key parameters; and the small commands (``--version``,
``stop``, ``init`` with an empty passphrase).  Real daemons as subprocesses,
real SQLCipher files, listening on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pty
import select
import shutil
import socket
import stat
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
import trio

from daemons import PASSPHRASE, Daemon, env

# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node that has run once and was stopped cleanly: copied by each test."""
    root = tmp_path_factory.mktemp("template")
    daemon = Daemon(root, "alice").start()
    daemon.stop()
    return daemon.home


@pytest.fixture
def home(template: Path, tmp_path: Path) -> Path:
    target = tmp_path / "alice"
    shutil.copytree(template, target)
    return target


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` with a digest of its content and mode."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        + oct(path.stat().st_mode)
        for path in sorted(directory.rglob("*"))
        if path.is_file() and not path.is_socket()
    }


def run(
    home: Path,
    *args: str,
    timeout: float = 30,
    passphrase: str | None = PASSPHRASE,
) -> subprocess.CompletedProcess[str]:
    """``pigeon --home HOME ARGS``; a command still running at the deadline
    (a daemon that started although it should not have) fails the test."""
    environment = env()
    if passphrase is None:
        environment.pop("PIGEON_PASSPHRASE", None)
    else:
        environment["PIGEON_PASSPHRASE"] = passphrase
    try:
        return subprocess.run(
            [sys.executable, "-m", "pigeon.ui.cli", "--home", str(home), *args],
            capture_output=True,
            text=True,
            env=environment,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as expired:
        err = expired.stderr
        tail = (err.decode(errors="replace") if isinstance(err, bytes) else err or "")[-1500:]
        pytest.fail(f"pigeon {' '.join(args)} was still running after {timeout} s:\n{tail}")


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pigeon: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def is_local(ip: str) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
        return True


# --------------------------------------------------------------------------- listen


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("garbage", "Pigeon listens on TCP only"),
        ("/ip4/999.0.0.1/tcp/1", "'999.0.0.1' is not an IPv4 address"),
        ("/ip4/127.0.0.1/udp/4001", "Pigeon listens on TCP only"),
        ("/ip4/127.0.0.1/tcp/70000", "the port must be a number from 0 to 65535"),
        ("/ip4/10.123.45.67/tcp/4001", "10.123.45.67 is not an address of this machine"),
    ],
)
def test_a_bad_listen_address_is_one_line(home: Path, address: str, expected: str):
    if address.startswith("/ip4/10.") and is_local("10.123.45.67"):
        pytest.skip("this machine has 10.123.45.67")
    before = snapshot(home)
    result = run(home, "daemon", "--listen", address)
    assert_one_line_error(result, "cannot listen on", expected)
    assert "Traceback" not in result.stderr
    assert snapshot(home) == before


@pytest.mark.slow
def test_a_port_another_daemon_listens_on_is_refused(home: Path, tmp_path: Path):
    port = free_port()
    address = f"/ip4/127.0.0.1/tcp/{port}"
    first = Daemon(tmp_path, "alice", extra=["--listen", address]).start()
    try:
        second = Daemon(tmp_path, "bob")  # another home, another identity
        before = snapshot(second.home)
        result = run(second.home, "daemon", "--listen", address)
        assert_one_line_error(result, f"TCP port {port} on 127.0.0.1 is already in use")
        assert snapshot(second.home) == before
        assert first.alive()
        assert first.id()["addresses"][0].startswith(address + "/p2p/")
    finally:
        first.stop()


def test_a_port_another_program_listens_on_is_refused(home: Path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        before = snapshot(home)
        result = run(home, "daemon", "--listen", f"/ip4/127.0.0.1/tcp/{port}")
    assert_one_line_error(result, f"TCP port {port} on 127.0.0.1 is already in use")
    assert snapshot(home) == before


def test_a_port_taken_between_the_check_and_the_start_is_refused():
    """py-libp2p listens with SO_REUSEPORT, so a second listener of the same
    user can join a port after the check made before the start: the check
    after the start sees it and closes the host."""
    from pigeon.node.host import ListenError, build_host, check_listening

    port = free_port()
    address = f"/ip4/127.0.0.1/tcp/{port}"
    host = build_host(os.urandom(32), [address])  # the check before the start passes
    intruder = socket.socket()
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    intruder.bind(("127.0.0.1", port))
    intruder.listen()
    errors: list[str] = []

    async def start() -> None:
        import multiaddr

        listen = [multiaddr.Multiaddr(address)]
        async with host.run(listen_addrs=listen):
            try:
                await check_listening(host, listen)
            except ListenError as error:
                errors.append(str(error))

    try:
        trio.run(start)
    finally:
        intruder.close()
    assert errors and f"TCP port {port} on 127.0.0.1 is already in use" in errors[0]
    with socket.socket() as probe:  # the host's listener was closed
        probe.bind(("127.0.0.1", port))


def test_a_listen_error_as_the_host_starts_reaches_the_user_as_one_line(home: Path):
    """The same race through the real daemon: the error is raised inside
    trio's nurseries and must not come out as an exception group."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        script = (
            "import sys\n"
            "import pigeon.node.host\n"
            "pigeon.node.host._probe = lambda address: None  # taken after the check\n"
            "from pigeon.ui.cli import main\n"
            f"sys.exit(main(['--home', {str(home)!r}, 'daemon', '--listen',"
            f" '/ip4/127.0.0.1/tcp/{port}']))\n"
        )
        try:
            result = subprocess.run(
                [sys.executable, "-c", script],
                capture_output=True,
                text=True,
                env=env(),
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("the daemon started on a port another socket listens on")
    assert_one_line_error(result, f"TCP port {port} on 127.0.0.1 is already in use")


# --------------------------------------------------------------------------- database


def truncate_half(path: Path) -> None:
    with path.open("r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def test_a_truncated_database_is_damaged_not_a_wrong_passphrase(home: Path):
    truncate_half(home / "pigeon.db")
    before = snapshot(home)
    damaged = run(home, "id")
    assert_one_line_error(damaged, f"the database {home}/pigeon.db is damaged", "from a backup")
    assert "passphrase" not in damaged.stderr
    wrong = run(home, "id", passphrase="not the passphrase")
    assert_one_line_error(wrong, f"wrong passphrase for {home}")
    assert snapshot(home) == before


def drop_key_check(home: Path) -> None:
    """Make key.json as written before it held a check value."""
    params = json.loads((home / "key.json").read_text())
    params.pop("check", None)
    (home / "key.json").write_text(json.dumps(params))


def test_a_key_file_without_check_still_works_and_gains_one(home: Path):
    drop_key_check(home)
    assert run(home, "id").returncode == 0
    params = json.loads((home / "key.json").read_text())
    assert len(params["check"]) == 64
    assert oct((home / "key.json").stat().st_mode)[-3:] == "600"
    assert run(home, "id").returncode == 0


def test_a_key_file_without_check_admits_both_causes(home: Path):
    drop_key_check(home)
    truncate_half(home / "pigeon.db")
    before = snapshot(home)
    result = run(home, "id")
    assert_one_line_error(result, "the passphrase is wrong, or the database is damaged")
    assert snapshot(home) == before


def test_an_empty_database_is_explained_and_init_recovers(home: Path):
    (home / "pigeon.db").write_bytes(b"")
    before = snapshot(home)
    result = run(home, "id")
    assert_one_line_error(result, "is empty", "pigeon init")
    assert snapshot(home) == before
    assert (home / "pigeon.db").stat().st_size == 0
    created = run(home, "init", "--name", "alice")
    assert created.returncode == 0, created.stderr
    assert run(home, "id").returncode == 0


def test_a_missing_database_is_explained_and_not_created(home: Path):
    (home / "pigeon.db").unlink()
    before = snapshot(home)
    result = run(home, "id")
    assert_one_line_error(result, "is missing", "from a backup", "pigeon init")
    assert snapshot(home) == before
    assert not (home / "pigeon.db").exists()


def test_a_missing_key_file_is_explained(home: Path):
    (home / "key.json").unlink()
    before = snapshot(home)
    result = run(home, "id")
    assert_one_line_error(result, "key.json is missing", "from a backup")
    assert snapshot(home) == before


def damage_pages(path: Path) -> None:
    """Overwrite 8 KB in the middle, as a failing disk or a bad copy would."""
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.seek(size // 2 // 4096 * 4096)
        handle.write(os.urandom(8192))


@pytest.mark.slow
def test_damaged_pages_are_one_line_for_the_daemon_and_id(home: Path):
    damage_pages(home / "pigeon.db")
    before = snapshot(home)
    for args in (("daemon",), ("id",)):
        result = run(home, *args, timeout=20)
        assert_one_line_error(result, f"the database {home}/pigeon.db is damaged", "from a backup")
        assert snapshot(home) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memlimit", 1 << 40),
        ("memlimit", "lots"),
        ("opslimit", 2**32 - 1),
        ("opslimit", 0),
        ("salt", "00"),
        ("salt", "not hex at all"),
    ],
)
def test_absurd_key_parameters_are_one_line(home: Path, field: str, value: object):
    params = json.loads((home / "key.json").read_text())
    params[field] = value
    (home / "key.json").write_text(json.dumps(params))
    before = snapshot(home)
    result = run(home, "id", timeout=20)
    assert_one_line_error(result, f"the key file {home}/key.json is damaged", field)
    assert snapshot(home) == before


def test_the_key_file_is_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Written to a temporary file in the same directory, fsynced, renamed over
    key.json, then the directory fsynced: a crash leaves the old file or the
    new one, whole."""
    from pigeon.node.storage import Database

    events: list[tuple[str, object]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append(("fsync-dir" if stat.S_ISDIR(info.st_mode) else "fsync", info.st_ino))
        real_fsync(fd)

    def replace(src: str | Path, dst: str | Path) -> None:
        events.append(("replace", (Path(src), Path(dst))))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    home = tmp_path / "home"
    Database.create(home, "right", fast_kdf=True).close()
    key_file = home / "key.json"
    renames = [i for i, (kind, value) in enumerate(events) if kind == "replace"]
    assert len(renames) == 1
    src, dst = events[renames[0]][1]  # type: ignore[misc]
    assert dst == key_file and src.parent == home
    assert ("fsync", key_file.stat().st_ino) in events[: renames[0]]
    assert ("fsync-dir", home.stat().st_ino) in events[renames[0] :]
    assert sorted(p.name for p in home.iterdir() if "key" in p.name) == ["key.json"]
    assert oct(key_file.stat().st_mode)[-3:] == "600"


# --------------------------------------------------------------------------- small commands


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "pigeon.ui.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pigeon {metadata.version('pigeon-messenger')}"


@pytest.mark.slow
def test_stop_stops_the_daemon_and_waits_for_it(home: Path, tmp_path: Path):
    daemon = Daemon(tmp_path, "alice").start()
    assert daemon.process is not None
    try:
        result = run(home, "stop", timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "stopped"
        assert daemon.process.wait(timeout=5) == 0
        assert not (home / "control.sock").exists()
        daemon.process = None
    finally:
        if daemon.alive():
            daemon.stop()
    assert_one_line_error(run(home, "stop"), "no Pigeon daemon is running")


def test_init_refuses_an_empty_passphrase_without_the_flag(tmp_path: Path):
    home = tmp_path / "new"
    result = run(home, "init", "--name", "alice", passphrase="")
    assert_one_line_error(result, "empty passphrase", "--empty-passphrase")
    assert not home.exists()
    created = run(home, "init", "--name", "alice", "--empty-passphrase", passphrase="")
    assert created.returncode == 0, created.stderr
    assert run(home, "id", passphrase="").returncode == 0


@contextlib.contextmanager
def terminal(args: list[str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run ``args`` with a pseudo-terminal as its controlling terminal."""
    master, slave = pty.openpty()

    def take_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    environment = env()
    environment.pop("PIGEON_PASSPHRASE")
    process = subprocess.Popen(
        args,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=environment,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    try:
        yield process, master
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        os.close(master)


def read_until(master: int, text: str, seen: bytearray, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        ready = select.select([master], [], [], max(left, 0))[0] if left > 0 else []
        if not ready:
            pytest.fail(f"no {text!r} on the terminal; it shows: {bytes(seen)!r}")
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the program ended
            chunk = b""
        if not chunk:
            pytest.fail(f"the program ended without {text!r}; it showed: {bytes(seen)!r}")
        seen += chunk
    del seen[: seen.index(text.encode()) + len(text)]


def read_rest(master: int, seen: bytearray) -> str:
    while select.select([master], [], [], 30)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    return seen.decode(errors="replace")


@pytest.mark.parametrize("answer", ["n", "y"])
def test_init_asks_before_accepting_an_empty_passphrase(tmp_path: Path, answer: str):
    home = tmp_path / "new"
    args = [sys.executable, "-m", "pigeon.ui.cli", "--home", str(home)]
    with terminal([*args, "init", "--name", "alice"]) as (process, master):
        seen = bytearray()
        read_until(master, "Passphrase: ", seen)
        os.write(master, b"\n")
        read_until(master, "Passphrase again: ", seen)
        os.write(master, b"\n")
        read_until(
            master,
            f"empty passphrase: anyone who can read {home} can read your messages;"
            " continue? [y/N] ",
            seen,
        )
        os.write(master, answer.encode() + b"\n")
        rest = read_rest(master, seen)
        code = process.wait(timeout=30)
    if answer == "n":
        assert code == 1, rest
        assert "pigeon: no identity created" in rest
        assert not home.exists()
    else:
        assert code == 0, rest
        assert "created identity" in rest
        assert run(home, "id", passphrase="").returncode == 0
