"""The commands that only talk to the running daemon start light: they import
neither trio nor libp2p (nor multiaddr, aiortc, textual, matplotlib, the
database or the interactive chat's toolkit).  Those cost a command more than
everything it needs; ``init``, ``daemon``, ``demo``, ``sim``, ``chat`` and
``tui`` import them inside themselves, and only they do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemons import Daemon, env, wait_for

HEAVY = (
    "trio",
    "libp2p",
    "multiaddr",
    "aiortc",
    "textual",
    "matplotlib",
    "prompt_toolkit",
    "sqlcipher3",
)

# Every command (and form of one) that only asks the daemon something.
DAEMON_ONLY = [
    ["status"],
    ["send", "bob", "hello"],
    ["inbox"],
    ["inbox", "--json", "--contact", "bob"],
    ["inbox", "--follow"],
    ["history", "bob"],
    ["search", "hello"],
    ["contacts", "list"],
    ["contacts", "list", "--json"],
    ["contacts", "add", "pigeon:not-a-real-code", "--as", "bob"],
    ["contacts", "rename", "bob", "robert"],
    ["contacts", "remove", "bob"],
    ["contacts", "accept-key", "bob"],
    ["verify", "bob"],
    ["verify", "bob", "--accept"],
    ["requests"],
    ["requests", "accept", "abcd"],
    ["block", "abcd"],
    ["unblock", "abcd"],
    ["timer", "bob", "1h"],
    ["send-file", "bob", __file__],
    ["files"],
    ["accept", "1"],
    ["cancel", "1"],
    ["stop"],
]

# Runs each command in one interpreter, in turn, and reports the heavy modules
# loaded after each: modules stay loaded, so the first command a module appears
# after is the one that imported it.
EACH_IN_TURN = """
import json, sys
from pigeon.ui.cli import main
home, commands, heavy = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
report = []
for argv in commands:
    code = main(["--home", home, *argv])
    report.append([argv, code, sorted(m for m in heavy if m in sys.modules)])
import pigeon.node.control  # the daemon's side: the check must see it
report.append([["(the daemon's side)"], 0, sorted(m for m in heavy if m in sys.modules)])
print(json.dumps(report))
"""


def imported(stderr: str) -> set[str]:
    """The top-level packages ``python -X importtime`` says were imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    return names


def script() -> str:
    """The console script installed beside this interpreter: the real entry."""
    path = Path(sys.executable).parent / "pigeon"
    assert path.exists(), "the pigeon console script is not installed (pip install -e '.[test]')"
    return str(path)


def run_light(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed ``pigeon`` script run as a user runs it, with the
    interpreter listing every module it imports."""
    return subprocess.run(
        [sys.executable, "-X", "importtime", script(), "--home", str(home), *args],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )


def test_commands_that_only_ask_the_daemon_import_nothing_heavy(tmp_path):
    commands, heavy_names = json.dumps(DAEMON_ONLY), json.dumps(HEAVY)
    result = subprocess.run(
        [sys.executable, "-c", EACH_IN_TURN, str(tmp_path), commands, heavy_names],
        capture_output=True,
        text=True,
        input="",
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    heavy = {" ".join(argv): loaded for argv, _, loaded in report[:-1] if loaded}
    assert heavy == {}, "these commands import what they do not need"
    # None of them found a daemon, and each said so in one line.
    assert [code for _, code, _ in report[:-1]] == [1] * len(DAEMON_ONLY)
    lines = result.stderr.splitlines()
    assert len(lines) == len(DAEMON_ONLY)
    assert all(line.startswith("pigeon: ") and "running for" in line for line in lines), lines
    assert "trio" in report[-1][2], "the check sees a module the daemon's side imports"


def test_send_inbox_and_status_work_against_a_daemon_without_importing_it(tmp_path):
    alice = Daemon(tmp_path, "alice").start()
    bob = Daemon(tmp_path, "bob", [alice.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")

        sent = run_light(alice.home, "send", "bob", "hello, lightly")
        assert sent.returncode == 0, sent.stderr
        message_id = sent.stdout.strip()
        assert message_id
        wait_for(lambda: any(m["text"] == "hello, lightly" for m in bob.inbox()))

        inbox = run_light(bob.home, "inbox", "--json")
        assert inbox.returncode == 0, inbox.stderr
        texts = [json.loads(line)["text"] for line in inbox.stdout.splitlines()]
        assert texts == ["hello, lightly"]
        history = run_light(alice.home, "history", "bob", "--json")
        assert [json.loads(line)["id"] for line in history.stdout.splitlines()] == [message_id]

        status = run_light(alice.home, "status")
        assert status.returncode == 0, status.stderr
        rows = dict(line.split(None, 1) for line in status.stdout.splitlines() if " " in line)
        assert rows["identity_id"] == alice.id()["identity_id"]
        ident = run_light(bob.home, "id", "--json")
        assert json.loads(ident.stdout)["addresses"], "the running daemon answered"

        for result in (sent, inbox, history, status, ident):
            assert imported(result.stderr) & set(HEAVY) == set(), result.args
            assert "pigeon" in imported(result.stderr)  # the listing is there
    finally:
        alice.stop()
        bob.stop()


def test_the_listing_names_what_is_imported():
    """The daemon's modules import trio and libp2p, and the listing the test
    above reads says so."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pigeon.node.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert {"trio", "libp2p", "multiaddr"} <= imported(result.stderr)
