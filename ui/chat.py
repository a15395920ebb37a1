"""``pigeon chat CONTACT``: an interactive conversation.  Incoming messages
and delivery status appear above the prompt while you type."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.patch_stdout import patch_stdout

from pigeon.node.control import Client
from pigeon.protocol import PigeonError

MARKS = {"pending": "…", "sent": "✓", "delivered": "✓✓", "read": "read"}


def _line(message: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M", time.localtime(float(message["sent_at"])))
    if message["direction"] == "out":
        return f"{stamp} you: {message['text']}  {MARKS.get(message['status'], '')}"
    return f"{stamp} {message['from_name']}: {message['text']}"


def _follow(home: Path, contact: str, after: int, stop: threading.Event) -> None:
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
        elif event.get("event") == "status" and event["id"] in texts:
            mark = MARKS.get(event["status"], event["status"])
            print(f"      {mark} {event['status']}: {texts[event['id']][:40]}")
    client.close()


def run_chat(home: Path, contact: str) -> int:
    client = Client(home)
    history = client.request("inbox", contact=contact)["messages"]
    for message in history[-20:]:
        print(_line(message))
    client.request("read", contact=contact)
    after = max((m["seq"] for m in history), default=0)
    stop = threading.Event()
    follower = threading.Thread(target=_follow, args=(home, contact, after, stop), daemon=True)
    session: PromptSession[str] = PromptSession()
    with patch_stdout():
        follower.start()
        print(f"chatting with {contact}; Ctrl-D to leave")
        while True:
            try:
                text = session.prompt("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if not text.strip():
                continue
            try:
                client.request("send", contact=contact, text=text)
            except PigeonError as error:
                print(f"not sent: {error}")
    stop.set()
    client.close()
    return 0
