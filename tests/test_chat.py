"""``pigeon chat`` driven through a real pseudo-terminal, as a person uses it."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from daemons import Daemon, env, wait_for

pytestmark = pytest.mark.slow


class Terminal:
    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.process = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env={**env(), "TERM": "xterm"}
        )
        os.close(slave)
        self.screen = b""

    def type(self, text: str) -> None:
        """Write as a terminal does, reading the screen meanwhile so that a
        long input cannot fill the pseudo-terminal both ways and stall."""
        data = text.encode()
        while data:
            _, writable, _ = select.select([], [self.master], [], 0.2)
            if writable:
                data = data[os.write(self.master, data[:4096]) :]
            ready, _, _ = select.select([self.master], [], [], 0)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:
                    break

    def read_until(self, needle: str, timeout: float = 20, count: int = 1) -> str:
        """Read until ``needle`` has appeared ``count`` times in all."""
        deadline = time.monotonic() + timeout
        while self.screen.count(needle.encode()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} never appeared in: {self.screen[-2000:]!r}")
            ready, _, _ = select.select([self.master], [], [], 0.2)
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:
                    break
        return self.screen.decode(errors="replace")

    def close(self) -> int:
        code = self.process.wait(timeout=20)
        os.close(self.master)
        return code


def test_chat_shows_incoming_messages_and_delivery_while_typing(tmp_path: Path):
    alice = Daemon(tmp_path, "alice").start()
    bob = Daemon(tmp_path, "bob", [alice.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        terminal = Terminal(
            [sys.executable, "-m", "pigeon.ui.cli", "--home", str(alice.home), "chat", "bob"]
        )
        terminal.read_until("Ctrl-D to leave")
        terminal.type("hello from the terminal\r")
        wait_for(lambda: any(m["text"] == "hello from the terminal" for m in bob.inbox()))
        terminal.read_until("✓✓")  # delivered: Bob's receipt came back
        terminal.type("half a line")  # typing, not sent yet
        bob.cli("send", "alice", "an answer arrives")
        terminal.read_until("bob: an answer arrives")
        terminal.type("\r")
        wait_for(lambda: any(m["text"] == "half a line" for m in bob.inbox()))
        # shown in the chat, so it is marked read and Bob sees a read receipt
        wait_for(lambda: [m["status"] for m in bob.inbox() if m["direction"] == "out"] == ["read"])
        terminal.type("\x04")  # Ctrl-D
        assert terminal.close() == 0
    finally:
        alice.stop()
        bob.stop()


def test_inbox_follow_prints_new_messages_as_json_lines(tmp_path: Path):
    import json

    alice = Daemon(tmp_path, "alice").start()
    bob = Daemon(tmp_path, "bob", [alice.address]).start()
    follower = None
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        alice.cli("send", "bob", "before following")
        wait_for(lambda: len(bob.inbox()) == 1)
        follower = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pigeon.ui.cli",
                "--home",
                str(bob.home),
                "inbox",
                "--json",
                "--follow",
            ],
            stdout=subprocess.PIPE,
            env=env(),
        )
        assert follower.stdout is not None
        first = json.loads(follower.stdout.readline())
        assert first["text"] == "before following"
        alice.cli("send", "bob", "while following")
        second = json.loads(follower.stdout.readline())
        assert second["text"] == "while following" and second["from_name"] == "alice"
        assert "event" not in second
    finally:
        if follower is not None:
            follower.terminate()
            follower.wait()
            if follower.stdout:
                follower.stdout.close()
        alice.stop()
        bob.stop()


def test_chat_refuses_an_oversized_line_and_goes_on(tmp_path: Path):
    """A line over the text limit is refused where it was typed (typed raw,
    and pasted), nothing of it is sent, and the next line goes out."""
    alice = Daemon(tmp_path, "alice").start()
    bob = Daemon(tmp_path, "bob", [alice.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        terminal = Terminal(
            [sys.executable, "-m", "pigeon.ui.cli", "--home", str(alice.home), "chat", "bob"]
        )
        terminal.read_until("Ctrl-D to leave")
        # Bob has not added Alice yet: his node keeps the first line as a request (sent)
        terminal.type("are you there?\r")
        terminal.read_until("you: are you there?  \u2713")
        start = time.monotonic()
        terminal.type("a" * 200_000 + "\r")  # typed, as a terminal without bracketed paste sends it
        terminal.read_until("not sent: message too long")
        terminal.type("\x1b[200~" + "b" * 1_000_000 + "\x1b[201~\r")  # a 1 MB paste
        terminal.read_until("not sent: message too long", timeout=60, count=2)
        assert time.monotonic() - start < 60
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        terminal.type("the next line\r")
        wait_for(lambda: [m["text"] for m in bob.inbox()] == ["are you there?", "the next line"])
        terminal.type("\x04")
        assert terminal.close() == 0
    finally:
        alice.stop()
        bob.stop()
