"""Everyday use with real daemons (subprocesses on 127.0.0.1): history and
search from the command line, disappearing messages on both sides, and a
backup restored after the conversation moved on.  The tests share one
network and run in order; the backup test, which wipes a home, is last."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from daemons import Daemon, env, small_network, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("everyday")
    with small_network(root, ("alice", "bob")) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        alice.cli("contacts", "add", bob.id()["contact_code"])
        bob.cli("contacts", "add", alice.id()["contact_code"])
        yield {**nodes, "root": root}


def texts(daemon: Daemon, direction: str = "in") -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == direction]


def test_history_pages_and_search_finds_by_a_word(network):
    alice, bob = network["alice"], network["bob"]
    for i in range(7):
        alice.cli("send", "bob", f"note {i}" + (" about the harbour" if i == 3 else ""))
    wait_for(lambda: len(texts(bob)) == 7)
    page = bob.cli("history", "alice", "--limit", "3", "--json").stdout.splitlines()
    newest = [json.loads(line) for line in page]
    assert [m["text"] for m in newest] == ["note 4", "note 5", "note 6"]
    older = bob.cli("history", "alice", "--limit", "3", "--before", newest[0]["id"]).stdout
    assert "note 1" in older and "note 3 about the harbour" in older and "note 4" not in older
    assert "(older: pigeon history alice --before" in older
    found = bob.cli("search", "harbour").stdout
    assert "note 3 about the harbour" in found and "note 2" not in found
    assert "no message holds" in bob.cli("search", "lighthouse").stdout
    bad = bob.cli("history", "alice", "--before", "xyz", check=False)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1


def test_a_timer_set_by_one_side_deletes_the_message_on_both(network):
    alice, bob = network["alice"], network["bob"]
    assert "disappear 3s after" in alice.cli("timer", "bob", "3s").stdout
    wait_for(lambda: json.loads(bob.cli("contacts", "list", "--json").stdout)["timer_s"] == 3)
    alice.cli("send", "bob", "this will self-destruct")
    wait_for(lambda: "this will self-destruct" in texts(bob))
    wait_for(lambda: "this will self-destruct" not in texts(bob), timeout=15)
    wait_for(lambda: "this will self-destruct" not in texts(alice, "out"), timeout=15)
    assert "self-destruct" not in bob.cli("search", "self-destruct").stdout
    assert "kept" in bob.cli("timer", "alice", "off").stdout
    wait_for(lambda: json.loads(alice.cli("contacts", "list", "--json").stdout)["timer_s"] is None)
    assert alice.cli("timer", "bob", "soon", check=False).returncode == 1


def test_an_older_backup_restored_into_a_wiped_home_and_the_conversation_goes_on(network):
    alice, bob, root = network["alice"], network["bob"], network["root"]
    file = Path(root) / "alice.backup"
    environment = {**env(), "PIGEON_BACKUP_PASSPHRASE": "backup secret"}

    def pigeon(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pigeon.ui.cli", "--home", str(alice.home), *args],
            env=environment,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    identity = alice.id()["identity_id"]
    assert "wrote an encrypted backup" in pigeon("backup", "create", str(file)).stdout
    alice.cli("send", "bob", "after the backup")
    bob.cli("send", "alice", "a reply after the backup")
    wait_for(lambda: "a reply after the backup" in texts(alice))
    alice.stop()
    shutil.rmtree(alice.home)

    wrong = subprocess.run(
        [
            sys.executable,
            "-m",
            "pigeon.ui.cli",
            "--home",
            str(alice.home),
            "backup",
            "restore",
            str(file),
        ],
        env={**environment, "PIGEON_BACKUP_PASSPHRASE": "not it"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert wrong.returncode == 1 and "passphrase is wrong" in wrong.stderr
    assert wrong.stderr.count("\n") == 1 and not (alice.home / "pigeon.db").exists()
    restored = pigeon("backup", "restore", str(file)).stdout
    assert f"restored identity {identity}" in restored
    alice.start()
    assert alice.id()["identity_id"] == identity
    alice.cli("send", "bob", "back from my backup")
    wait_for(lambda: "back from my backup" in texts(bob), timeout=60)
    bob.cli("send", "alice", "welcome back")
    wait_for(lambda: "welcome back" in texts(alice), timeout=60)
    wait_for(
        lambda: all(
            m["status"] in ("delivered", "read") for m in alice.inbox() if m["direction"] == "out"
        ),
        timeout=60,
    )
    assert "restored from a backup" in alice.log.read_text()
