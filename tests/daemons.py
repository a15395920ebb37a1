"""Real ``pigeon`` daemons as subprocesses on 127.0.0.1, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PASSPHRASE = "correct horse battery staple"


def env() -> dict[str, str]:
    return {**os.environ, "PIGEON_PASSPHRASE": PASSPHRASE, "PYTHONUNBUFFERED": "1"}


def pigeon(
    home: Path,
    *args: str,
    check: bool = True,
    timeout: float = 60,
    stdin: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pigeon.ui.cli", "--home", str(home), *args],
        capture_output=True,
        input=stdin if stdin is not None else b"",
        env=env(),
        timeout=timeout,
    )
    result = subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode("utf-8", "replace"),
        result.stderr.decode("utf-8", "replace"),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pigeon {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def create_home(home: Path, name: str) -> None:
    """What ``pigeon init`` makes (tests/test_cli_errors.py runs that), with the
    database key derived by the cheaper of Argon2id's two settings the node
    supports, as ``pigeon sim`` and ``pigeon demo`` do: every start of a test
    daemon derives it again."""
    from pigeon.node.conversations import Conversations
    from pigeon.node.storage import Database

    db = Database.create(home, PASSPHRASE, fast_kdf=True)
    try:
        Conversations.initialise(db, name, os.urandom)
    finally:
        db.close()


class Daemon:
    def __init__(
        self,
        root: Path,
        name: str,
        bootstrap: list[str] | None = None,
        extra: list[str] | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.home = root / name
        self.name = name
        self.bootstrap = bootstrap or []
        self.extra = extra or []
        self.prefix = prefix or []  # e.g. ip netns exec NAME: a daemon in a namespace
        self.log = root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0
        if not (self.home / "pigeon.db").exists():
            create_home(self.home, name)

    def start(self) -> Daemon:
        return self.launch().wait_ready()

    def launch(self) -> Daemon:
        """Start the process without waiting for it (see wait_ready)."""
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        args = [*self.prefix, sys.executable, "-m", "pigeon.ui.cli", "--home", str(self.home)]
        args.append("daemon")
        for address in self.bootstrap:
            args += ["--bootstrap", address]
        if "--listen" not in self.extra and not self.prefix:  # on this machine: loopback only
            args += ["--listen", "/ip4/127.0.0.1/tcp/0"]
        args += self.extra
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, env=env())
        return self

    def wait_ready(self) -> Daemon:
        assert self.process is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon {self.name} exited: {self.log.read_text()[-2000:]}")
            if "daemon ready" in self.log.read_bytes()[self._offset :].decode(errors="replace"):
                return self
            time.sleep(0.1)
        raise AssertionError(f"daemon {self.name} did not start: {self.log.read_text()[-2000:]}")

    def cli(
        self, *args: str, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        return pigeon(self.home, *args, check=check, stdin=stdin)

    def id(self) -> dict[str, Any]:
        return json.loads(self.cli("id", "--json").stdout)

    @property
    def address(self) -> str:
        return str(self.id()["addresses"][0])

    def inbox(self) -> list[dict[str, Any]]:
        out = self.cli("inbox", "--json").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"daemon {self.name} did not stop on SIGTERM") from None
        code = self.process.returncode
        self.process = None
        if code != 0:
            raise AssertionError(f"daemon {self.name} exited with {code} on SIGTERM")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


def rss_mb(daemon: Daemon) -> float:
    """The daemon's resident memory now, in MiB."""
    assert daemon.process is not None
    for line in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(interval)


PUBLISHED = re.compile(r"published directory record|directory record \S+ updated")


def record_published(
    daemon: Daemon, after: str = "registered with mailbox", quiet: float = 4.0
) -> None:
    """Wait until the daemon has published its directory record as changed by
    the last event logged as ``after`` (by default: its mailboxes): a publish
    logged after that line, then ``quiet`` seconds with no other publish (one
    begun before the change, of the old record, is followed by another)."""

    def publishes() -> int:
        text = daemon.log.read_text()
        return len(PUBLISHED.findall(text, max(text.rfind(after), 0)))

    wait_for(publishes, timeout=60)
    seen, since = -1, time.monotonic()
    while time.monotonic() - since < quiet:
        if (count := publishes()) != seen:
            seen, since = count, time.monotonic()
        time.sleep(0.2)


def status(daemon: Daemon) -> dict[str, Any]:
    """The daemon's ``status`` reply, as a dict."""
    from pigeon.node.control import Client

    client = Client(daemon.home)
    try:
        return client.request("status")
    finally:
        client.close()


FAST = ["--mailbox-interval", "1"]
BOX = ["--mailbox", "--mailbox-rate-limit", "1000", *FAST]


@contextlib.contextmanager
def small_network(
    root: Path, names: tuple[str, ...], extra: dict[str, list[str]] | None = None
) -> Iterator[dict[str, Daemon]]:
    """A bootstrap node and the named daemons (with their extra daemon
    options), started together; every daemon is stopped at the end."""
    nodes: dict[str, Daemon] = {}
    try:
        nodes["boot"] = Daemon(root, "boot").start()
        for name in names:
            options = (extra or {}).get(name)
            nodes[name] = Daemon(root, name, [nodes["boot"].address], options).launch()
        for daemon in nodes.values():
            daemon.wait_ready()
        yield nodes
    finally:
        for daemon in nodes.values():
            if daemon.alive():
                daemon.stop()


@contextlib.contextmanager
def mailbox_network(root: Path) -> Iterator[dict[str, Daemon]]:
    """A bootstrap node, three mailbox peers (box0-box2), Alice and Bob, all
    collecting every second; every daemon is stopped at the end."""
    boxes = {f"box{i}": BOX for i in range(3)}
    options = {**boxes, "alice": FAST, "bob": FAST}
    with small_network(root, (*boxes, "alice", "bob"), options) as nodes:
        yield nodes


def relayed(daemon: Daemon) -> bool:
    return any("/p2p-circuit/" in a for a in daemon.id()["addresses"])


def contact(daemon: Daemon, label: str) -> dict[str, object]:
    out = daemon.cli("contacts", "list", "--json").stdout
    (found,) = [c for c in map(json.loads, out.splitlines()) if c["label"] == label]
    return found


def incoming(daemon: Daemon) -> list[dict[str, object]]:
    return [m for m in daemon.inbox() if m["direction"] == "in"]


def introduce(alice: Daemon, bob: Daemon) -> None:
    alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
    bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
