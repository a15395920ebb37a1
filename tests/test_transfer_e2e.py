"""Files between real daemons over real aiortc data channels on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemons import Daemon, env, mailbox_network, record_published, status, wait_for

pytestmark = pytest.mark.slow


def files(daemon: Daemon) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.cli("files", "--json").stdout.splitlines()]


def the_file(daemon: Daemon, transfer_id: str) -> dict[str, Any]:
    found = [f for f in files(daemon) if f["id"] == transfer_id]
    assert found, f"{daemon.name} has no transfer {transfer_id}"
    return found[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def introduce(alice: Daemon, bob: Daemon) -> None:
    bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
    alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")


@pytest.fixture
def pair(tmp_path):
    boot = Daemon(tmp_path, "boot").start()
    alice = Daemon(tmp_path, "alice", [boot.address])
    bob = Daemon(tmp_path, "bob", [boot.address])
    alice.launch(), bob.launch()
    alice.wait_ready(), bob.wait_ready()
    introduce(alice, bob)
    yield alice, bob
    for daemon in (alice, bob, boot):
        if daemon.alive():
            daemon.stop()


def offer(alice: Daemon, path: Path) -> str:
    return alice.cli("send-file", "bob", str(path), "--no-wait").stdout.strip()


def offered_to(bob: Daemon, transfer_id: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        lambda: next((f for f in files(bob) if f["id"] == transfer_id), None), timeout=timeout
    )


def test_a_file_arrives_whole_and_the_sender_sees_it_done(pair, tmp_path):
    alice, bob = pair
    source = random_file(tmp_path / "report 2026.pdf", 20_000_000)
    sending = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pigeon.ui.cli",
            "--home",
            str(alice.home),
            "send-file",
            "bob",
            str(source),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    try:
        incoming = wait_for(lambda: files(bob))[0]
        assert incoming["state"] == "offered" and incoming["direction"] == "in"
        assert incoming["name"] == "report 2026.pdf" and incoming["size"] == 20_000_000
        assert incoming["peer"] == alice.id()["identity_id"]
        # the offer shows in the conversation
        assert any("[file] report 2026.pdf" in m["text"] for m in bob.inbox())
        accepted = bob.cli("accept", incoming["id"][:8], "--to", str(tmp_path / "got"))
        out, err = sending.communicate(timeout=120)
    finally:
        if sending.poll() is None:
            sending.kill()
    assert sending.returncode == 0, err
    assert b"sent report 2026.pdf to bob" in out
    done = the_file(bob, incoming["id"])
    assert done["state"] == "done" and done["bytes_done"] == 20_000_000
    assert accepted.stdout.strip() == f"saved {done['path']}"
    assert Path(done["path"]) == tmp_path / "got" / "report 2026.pdf"
    assert sha256(Path(done["path"])) == sha256(source) == done["sha256"]
    assert not [p for p in (tmp_path / "got").iterdir() if p.name.endswith(".pigeon-part")]
    sent = the_file(alice, incoming["id"])
    assert sent["state"] == "done" and sent["sha256"] == done["sha256"]
    # every chunk once: the ciphertext (a 16-byte tag per chunk) and no more
    assert 20_000_000 <= sent["bytes_sent"] <= 20_000_000 + 16 * 153
    # the same name again does not replace the first file
    again = offer(alice, source)
    offered_to(bob, again)
    bob.cli("accept", again, "--to", str(tmp_path / "got"))
    assert the_file(bob, again)["path"] == str(tmp_path / "got" / "report 2026 (1).pdf")


def test_the_receiver_killed_halfway_resumes_without_sending_much_again(pair, tmp_path):
    alice, bob = pair
    size = 20_000_000
    source = random_file(tmp_path / "video.mp4", size)
    transfer_id = offer(alice, source)
    offered_to(bob, transfer_id)
    bob.cli("accept", transfer_id, "--to", str(tmp_path / "got"), "--no-wait")
    wait_for(lambda: the_file(bob, transfer_id)["bytes_done"] >= size // 2, interval=0.05)
    bob.kill9()
    alice.stop()
    part = next((tmp_path / "got").glob("*.pigeon-part"))
    assert size // 4 < part.stat().st_size < size
    alice.start(), bob.start()
    done = wait_for(lambda: the_file(bob, transfer_id)["state"] == "done", timeout=90)
    assert done
    final = the_file(bob, transfer_id)
    assert sha256(Path(final["path"])) == sha256(source)
    sent = the_file(alice, transfer_id)
    assert sent["state"] == "done"
    again = sent["bytes_sent"] - size
    assert again < size // 10, f"{again} bytes sent twice"


def test_an_offer_to_someone_who_has_not_added_you_is_refused(tmp_path):
    boot = Daemon(tmp_path, "boot").start()
    alice = Daemon(tmp_path, "alice", [boot.address]).start()
    bob = Daemon(tmp_path, "bob", [boot.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        source = random_file(tmp_path / "x.bin", 1000)
        result = alice.cli("send-file", "bob", str(source), check=False)
        assert result.returncode == 1
        assert "x.bin refused: refused by bob's node" in result.stderr
        assert files(alice)[0]["state"] == "refused"
        assert files(bob) == []
    finally:
        for daemon in (alice, bob, boot):
            daemon.stop()


def test_declining_and_cancelling_say_why_on_both_sides(pair, tmp_path):
    alice, bob = pair
    declined = offer(alice, random_file(tmp_path / "a.bin", 1000))
    offered_to(bob, declined)
    bob.cli("cancel", declined)
    assert the_file(bob, declined)["state"] == "refused"
    wait_for(lambda: the_file(alice, declined)["state"] == "refused")
    assert the_file(alice, declined)["error"] == "declined by bob"

    cancelled = offer(alice, random_file(tmp_path / "b.bin", 30_000_000))
    offered_to(bob, cancelled)
    bob.cli("accept", cancelled, "--to", str(tmp_path / "got"), "--no-wait")
    wait_for(lambda: the_file(bob, cancelled)["bytes_done"] > 0, interval=0.05)
    alice.cli("cancel", cancelled[:6])
    wait_for(lambda: the_file(bob, cancelled)["state"] == "cancelled")
    assert the_file(bob, cancelled)["error"] == "cancelled by alice"
    assert list((tmp_path / "got").iterdir()) == []  # the partial file is gone
    result = bob.cli("accept", cancelled, check=False)
    assert result.returncode == 1 and "that transfer is cancelled" in result.stderr


def test_auto_accept_up_to_a_size(pair, tmp_path):
    alice, bob = pair
    bob.cli("files", "auto-accept", "alice", "1MB")
    small = offer(alice, random_file(tmp_path / "small.txt", 999_000))
    large = offer(alice, random_file(tmp_path / "large.txt", 1_000_001))
    wait_for(lambda: the_file(bob, small)["state"] == "done")
    assert the_file(bob, large)["state"] == "offered"
    assert Path(the_file(bob, small)["path"]).parent == bob.home / "downloads"


def test_an_offer_made_while_the_receiver_is_offline_waits_in_its_mailboxes(tmp_path):
    with mailbox_network(tmp_path) as nodes:
        alice, bob = nodes["alice"], nodes["bob"]
        introduce(alice, bob)
        wait_for(lambda: len(status(bob)["mailboxes"]) == 3, 60)
        wait_for(lambda: bob.log.read_text().count("left 100 one-time prekeys") >= 3, 60)
        record_published(bob)
        bob.stop()
        source = random_file(tmp_path / "while-away.bin", 3_000_000)
        transfer_id = offer(alice, source)
        # the offer went to Bob's mailboxes
        wait_for(lambda: any(m["status"] == "sent" for m in alice.inbox()), 60)
        bob.start()
        offered_to(bob, transfer_id, timeout=60)
        bob.cli("accept", transfer_id, "--to", str(tmp_path / "got"))
        final = the_file(bob, transfer_id)
        assert sha256(Path(final["path"])) == sha256(source)
        wait_for(lambda: the_file(alice, transfer_id)["state"] == "done")


def test_the_readme_file_send_runs_as_written(pair, tmp_path):
    """The README's "Send a file" block, with its homes mapped to these daemons."""
    alice, bob = pair
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Send a file", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    homes = {"~/pigeon-alice": alice.home, "~/pigeon-bob": bob.home}
    photo = random_file(tmp_path / "holiday.jpg", 2_000_000)
    running: list[subprocess.Popen[bytes]] = []
    transfer_id = ""
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        if not command:
            continue
        words = command.replace("~/holiday.jpg", str(photo)).split()
        home = homes[words[0].removeprefix("PIGEON_HOME=")]
        words = [w.replace("ID", transfer_id[:8]) if w == "ID" else w for w in words[1:]]
        words = [str(tmp_path / "dl") if w == "~/Downloads" else w for w in words]
        assert words[0] == "pigeon"
        args = [sys.executable, "-m", "pigeon.ui.cli", "--home", str(home), *words[1:]]
        if words[1] == "send-file":  # it shows progress until Bob has the file
            running.append(
                subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            )
            transfer_id = wait_for(lambda: files(alice))[0]["id"]
            continue
        result = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, (command, result.stderr)
    assert running
    out, err = running[0].communicate(timeout=60)
    assert running[0].returncode == 0, err
    assert out.decode().strip() == "sent holiday.jpg to bob (2.0 MB)"
    assert sha256(tmp_path / "dl" / "holiday.jpg") == sha256(photo)


def test_the_chat_shows_offers_and_how_they_go(pair, tmp_path):
    from test_chat import Terminal

    alice, bob = pair
    terminal = Terminal(
        [sys.executable, "-m", "pigeon.ui.cli", "--home", str(bob.home), "chat", "alice"]
    )
    try:
        terminal.read_until("Ctrl-D to leave")
        transfer_id = offer(alice, random_file(tmp_path / "slides.pdf", 500_000))
        terminal.read_until(f"<- file slides.pdf: offered: pigeon accept {transfer_id[:8]}")
        bob.cli("accept", transfer_id[:8], "--to", str(tmp_path / "got"))
        terminal.read_until(f"<- file slides.pdf: done: {tmp_path / 'got' / 'slides.pdf'}")
        terminal.type("\x04")
        assert terminal.close() == 0
    finally:
        if terminal.process.poll() is None:
            terminal.process.kill()
            terminal.close()
