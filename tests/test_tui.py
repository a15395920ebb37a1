"""``pigeon tui`` driven by textual's pilot against real daemons: open a
conversation, send, watch the status move to delivered and read, see a reply
appear without a refresh, open the verify screen; all in 80x24."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from daemons import Daemon
from pigeon.node.control import Client
from pigeon.ui.tui import PigeonTUI, SearchScreen, VerifyScreen, message_line, qr_blocks

pytestmark = pytest.mark.slow


async def until(pilot, condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        await pilot.pause(0.2)


def test_the_tui_sends_shows_statuses_and_receives_live(tmp_path: Path):
    alice = Daemon(tmp_path, "alice").start()
    bob = Daemon(tmp_path, "bob", [alice.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"])
        bob.cli("contacts", "add", alice.id()["contact_code"])
        bob.cli("send", "alice", "an older message")
        app = PigeonTUI(alice.home)

        async def scenario() -> str:
            async with app.run_test(size=(80, 24)) as pilot:
                await until(pilot, lambda: "an older message" in " ".join(app.shown))
                await pilot.press(*"hello from the tui", "enter")
                sent = "you: hello from the tui"
                await until(pilot, lambda: any(sent in x and x.endswith("✓✓") for x in app.shown))
                bob_control = Client(bob.home)
                bob_control.request("read", contact="alice")
                bob_control.close()
                await until(pilot, lambda: any(sent in x and x.endswith("read") for x in app.shown))
                bob.cli("send", "alice", "a reply, live")
                await until(pilot, lambda: any("bob: a reply, live" in x for x in app.shown))
                chat = app.export_screenshot()
                await pilot.press("f2")
                await until(pilot, lambda: isinstance(app.screen, VerifyScreen))
                await pilot.pause(0.5)
                verify = app.export_screenshot()
                assert "Safety&#160;number&#160;with" in verify and "bob&#160;(not" in verify
                await pilot.press("escape")
                # Search, also here: a word that is in a message, and one that is not.
                await pilot.press("ctrl+f")
                await until(pilot, lambda: isinstance(app.screen, SearchScreen))
                await pilot.press(*"live", "enter")
                await until(pilot, lambda: app.screen.found)
                assert [m["text"] for m in app.screen.found] == ["a reply, live"]
                words = app.screen.query_one("#words")
                words.value = "lighthouse"
                words.focus()
                await pilot.press("enter")
                await pilot.pause(0.5)
                assert app.screen.found == []
                await pilot.press("escape")
                await pilot.press("ctrl+q")
                return chat, verify

        chat, verify = asyncio.run(scenario())
        # The screenshots in docs/ come from here: PIGEON_SCREENSHOTS=docs pytest tests/test_tui.py
        folder = Path(os.environ.get("PIGEON_SCREENSHOTS") or tmp_path)
        (folder / "tui-chat.svg").write_text(chat)
        (folder / "tui-verify.svg").write_text(verify)
    finally:
        alice.stop()
        bob.stop()


def test_lines_and_qr_blocks():
    line = message_line(
        {
            "sent_at": 0,
            "text": "a\x1b[31mb",
            "direction": "out",
            "status": "delivered",
            "reason": None,
        }
    )
    assert "\x1b" not in line and line.endswith("✓✓")
    drawn = qr_blocks("PIGEON-SN:ABC")
    rows = drawn.splitlines()
    assert len(rows) <= 22 and all(len(r) == len(rows[0]) for r in rows)
