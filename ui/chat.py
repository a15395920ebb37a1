"""``pigeon chat CONTACT``: an interactive conversation.  Incoming messages
and delivery statuses appear above the prompt while you type.

A line that cannot be sent (too long, the daemon gone) is reported above the
prompt and the chat goes on; nothing typed afterwards is lost with it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.filters import Condition
from prompt_toolkit.input import Input, create_input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.key_binding.key_processor import KeyPress
from prompt_toolkit.keys import Keys
from prompt_toolkit.patch_stdout import patch_stdout

from pigeon.node.control import Client
from pigeon.protocol import MAX_TEXT_BYTES, PigeonError, check_text

from .cli import key_change_alert
from .term import safe, safe_line

MARKS = {"pending": "…", "sent": "✓", "delivered": "✓✓", "read": "read", "failed": "✗ failed"}


def _line(message: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M", time.localtime(float(message["sent_at"])))
    text = safe(str(message["text"]), indent="      ")
    if message["direction"] == "out":
        mark = MARKS.get(message["status"], message["status"])
        reason = f" ({safe_line(message['reason'])})" if message.get("reason") else ""
        return f"{stamp} you: {text}  {mark}{reason}"
    return f"{stamp} {safe_line(str(message['from_name']))}: {text}"


def _file_line(file: dict[str, Any]) -> str:
    """A transfer's state in the conversation, with what to do about it."""
    arrow = "->" if file["direction"] == "out" else "<-"
    name, state = safe_line(str(file["name"])), str(file["state"])
    if state == "transferring":
        state += f" {100 * int(file['bytes_done']) // max(int(file['size']), 1)}%"
    elif state == "offered" and file["direction"] == "in":
        state += f": pigeon accept {str(file['id'])[:8]}"
    elif state == "done" and file.get("path"):
        state += f": {safe_line(str(file['path']))}"
    elif file.get("error"):
        state += f": {safe_line(str(file['error']))}"
    return f"      {arrow} file {name}: {state}"


def _follow(home: Path, contact: str, after: int, stop: threading.Event) -> None:
    try:
        client = Client(home, timeout=None)
        client.request("follow", contact=contact, after=after)
        texts: dict[str, str] = {}
        for event in client.events():
            if stop.is_set():
                break
            if event.get("event") == "message":
                texts[str(event["id"])] = str(event["text"])
                print(_line(event))
                if event["direction"] == "in":
                    reader = Client(home)
                    reader.request("read", contact=contact)
                    reader.close()
            elif event.get("event") == "file":
                print(_file_line(event))
            elif event.get("event") == "status" and event["id"] in texts:
                mark = MARKS.get(event["status"], event["status"])
                reason = f" ({safe_line(event['reason'])})" if event.get("reason") else ""
                shown = safe_line(texts[event["id"]][:40])
                print(f"      {mark} {event['status']}{reason}: {shown}")
        client.close()
    except PigeonError as error:
        if not stop.is_set():
            print(f"updates stopped: {error} (leave with Ctrl-D)")


class _Sender:
    """Sends lines, connecting again once if the daemon's connection broke."""

    def __init__(self, home: Path, contact: str) -> None:
        self.home = home
        self.contact = contact
        self.client: Client | None = Client(home)

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        for attempt in (1, 2):
            if self.client is None:
                self.client = Client(self.home)
            try:
                return self.client.request(cmd, **args)
            except PigeonError as error:
                if "connection" not in str(error) or attempt == 2:
                    raise
                self.client.close()
                self.client = None
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _coalescing_input() -> Input:
    """The terminal's input, with each run of printable characters read at
    once handed on as one paste.  prompt_toolkit handles every key alone (a
    fraction of a millisecond each), so a megabyte typed into a terminal
    without bracketed paste would otherwise take minutes."""
    terminal = create_input()
    read_keys = terminal.read_keys

    def coalesced() -> list[KeyPress]:
        out: list[KeyPress] = []
        run: list[str] = []

        def flush() -> None:
            if len(run) > 1:
                out.append(KeyPress(Keys.BracketedPaste, "".join(run)))
            elif run:
                out.append(KeyPress(run[0], run[0]))
            run.clear()

        for key in read_keys():
            if isinstance(key.key, str) and key.key == key.data and key.data.isprintable():
                run.append(key.data)
            else:
                flush()
                out.append(key)
        flush()
        return out

    terminal.read_keys = coalesced  # type: ignore[method-assign]
    return terminal


def _bounded_input(warn: Callable[[str], None]) -> KeyBindings:
    """Keep the line being typed within the one text limit: a longer one is
    cut at the limit, and refused as too long when Enter is pressed."""
    bindings = KeyBindings()
    state = {"full": False}

    def insert(event: KeyPressEvent, text: str) -> None:
        room = MAX_TEXT_BYTES + 1 - len(event.current_buffer.text)
        if len(text) >= room:  # at least one byte of UTF-8 per character
            state["full"] = True
            text = text[: max(room, 0)]
        if text:
            event.current_buffer.insert_text(text)

    @bindings.add(Keys.Any, filter=Condition(lambda: state["full"]))
    def _drop(event: KeyPressEvent) -> None:
        return None

    @bindings.add(Keys.BracketedPaste)
    def _paste(event: KeyPressEvent) -> None:
        if not state["full"]:
            insert(event, event.data.replace("\r\n", "\n").replace("\r", "\n"))

    @bindings.add(Keys.Enter, filter=Condition(lambda: state["full"]))
    def _refuse(event: KeyPressEvent) -> None:
        state["full"] = False
        event.current_buffer.reset()
        warn(f"not sent: message too long; the limit is {MAX_TEXT_BYTES:,} bytes of UTF-8")

    return bindings


def run_chat(home: Path, contact: str) -> int:
    sender = _Sender(home, contact)
    history = sender.request("inbox", contact=contact)["messages"]
    for message in history[-20:]:
        print(_line(message))
    sender.request("read", contact=contact)
    after = max((m["seq"] for m in history), default=0)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(home, contact, after, stop), daemon=True)
    session: PromptSession[str] = PromptSession(
        key_bindings=_bounded_input(print), input=_coalescing_input()
    )
    shown = sender.request("contacts.show", contact=contact)["contact"]
    trust = (
        "blocked: nothing goes to them"
        if shown["blocked"]
        else "verified"
        if shown["verified"]
        else f"not verified: pigeon verify {safe_line(contact)}"
    )
    with patch_stdout():
        follower.start()
        print(f"chatting with {safe_line(shown['label'])} ({trust}); Ctrl-D to leave")
        if shown["key_change"]:
            print(key_change_alert(shown))
        while True:
            try:
                text = session.prompt("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                continue
            try:
                check_text(text)
                sender.request("send", contact=contact, text=text)
            except PigeonError as error:
                print(f"not sent: {error}")
    stop.set()
    sender.close()
    return 0
