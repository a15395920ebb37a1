"""``pigeon tui``: a full-screen chat (textual) that talks to the daemon over
the control socket, like every other command.

Conversations on the left (last message, unread count, presence, the
verified mark, alerts), the open conversation on the right with timestamps
and delivery status that change as receipts arrive, and a compose line.
Everything is keyboard-driven and fits an 80x24 terminal.  One connection
follows the daemon's events in a thread and hands them to the app; the
others make short requests.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Footer, Input, Label, ListItem, ListView, Static

from pigeon.node.control import Client
from pigeon.protocol import PigeonError, check_text, format_safety_number

from .term import safe_line

MARKS = {"pending": "…", "sent": "✓", "delivered": "✓✓", "read": "read", "failed": "✗"}


def message_line(message: dict[str, Any]) -> str:
    """One message as the pane shows it (markup escaped by the caller)."""
    stamp = time.strftime("%H:%M", time.localtime(float(message["sent_at"])))
    text = safe_line(str(message["text"]))
    if message["direction"] == "out":
        mark = MARKS.get(str(message["status"]), str(message["status"]))
        reason = f" ({safe_line(str(message['reason']))})" if message.get("reason") else ""
        return f"{stamp} you: {text}  {mark}{reason}"
    return f"{stamp} {safe_line(str(message['contact_name']))}: {text}"


def peer_of(message: dict[str, Any]) -> str:
    """The identity ID of the contact a message is with."""
    return str(message["to" if message["direction"] == "out" else "from"])


def file_line(file: dict[str, Any]) -> str:
    arrow = "->" if file["direction"] == "out" else "<-"
    state = str(file["state"])
    if state == "transferring":
        state += f" {100 * int(file['bytes_done']) // max(int(file['size']), 1)}%"
    elif state == "offered" and file["direction"] == "in":
        state += f" (pigeon accept {str(file['id'])[:8]})"
    elif file.get("error"):
        state += f": {safe_line(str(file['error']))}"
    return f"      {arrow} file {safe_line(str(file['name']))}: {state}"


def qr_blocks(text: str) -> str:
    """A QR code drawn with half blocks: two rows of modules to a line, so a
    safety-number code fits an 80x24 terminal."""
    import qrcode

    code = qrcode.QRCode(border=2, error_correction=qrcode.constants.ERROR_CORRECT_L)
    code.add_data(text)
    matrix = code.get_matrix()
    if len(matrix) % 2:
        matrix.append([False] * len(matrix[0]))
    glyphs = {(True, True): "█", (True, False): "▀", (False, True): "▄", (False, False): " "}
    # Dark modules on a light ground: the terminal's light text draws the light parts.
    return "\n".join(
        "".join(glyphs[(not top, not bottom)] for top, bottom in zip(upper, lower, strict=True))
        for upper, lower in zip(matrix[::2], matrix[1::2], strict=True)
    )


class VerifyScreen(ModalScreen[None]):
    """The safety number with a contact, in twelve groups of five, and its QR code."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "close")]

    def __init__(self, reply: dict[str, Any]) -> None:
        super().__init__()
        self.reply = reply

    def compose(self) -> ComposeResult:
        reply = self.reply
        groups = format_safety_number(str(reply["safety_number"])).split()
        rows = "\n".join(" ".join(groups[i : i + 4]) for i in range(0, 12, 4))
        state = "verified" if reply["verified"] else "not verified"
        label = safe_line(str(reply["contact"]["label"]))
        with Horizontal(id="verify"):
            yield Static(
                f"Safety number with\n{label} ({state})\n\n{rows}\n\nCompare it aloud, then:"
                f"\npigeon verify {label}\n  --accept\nor let them scan the code.\n\nEsc: back",
                markup=False,
            )
            yield Static(qr_blocks(str(reply["qr"])), id="qr", markup=False)


class SearchScreen(ModalScreen[str | None]):
    """Search every conversation (the daemon's full-text index); Enter on a
    result opens its conversation."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss_none", "close")]

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client
        self.found: list[dict[str, Any]] = []

    def compose(self) -> ComposeResult:
        with Vertical(id="search"):
            yield Input(placeholder="words to find, Enter; Esc to close", id="words")
            yield ListView(id="results")

    @on(Input.Submitted, "#words")
    def search(self, event: Input.Submitted) -> None:
        results = self.query_one("#results", ListView)
        results.clear()
        try:
            self.found = self.client.request("search", text=event.value, limit=50)["messages"]
        except PigeonError as error:
            self.notify(str(error), severity="error")
            return
        for message in self.found:
            results.append(ListItem(Label(message_line(message), markup=False)))
        if not self.found:
            results.append(ListItem(Label("no message holds all of those words")))
        results.focus()

    @on(ListView.Selected, "#results")
    def chosen(self, event: ListView.Selected) -> None:
        index = event.list_view.index
        if index is not None and index < len(self.found):
            self.dismiss(peer_of(self.found[index]))

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


class Conversation(ListItem):
    def __init__(self, contact: dict[str, Any]) -> None:
        super().__init__()
        self.contact = contact
        self.label_widget = Label(markup=False)

    def compose(self) -> ComposeResult:
        yield self.label_widget

    def show(self, contact: dict[str, Any], unread: int, last: str) -> None:
        self.contact = contact
        presence = "●" if contact["online"] else "○"
        mark = "!!" if contact["key_change"] else "✔" if contact["verified"] else " "
        count = f" ({unread})" if unread else ""
        self.label_widget.update(
            f"{presence}{mark} {safe_line(str(contact['label']))[:14]}{count}\n    {last[:20]}"
        )


class PigeonTUI(App[int]):
    TITLE = "Pigeon"
    ENABLE_COMMAND_PALETTE = False  # its Ctrl+P is ours: the previous conversation
    CSS = """
    #alert { background: $error; color: $text; height: auto; display: none; }
    #alert.shown { display: block; }
    #conversations { width: 26; border-right: solid $primary; }
    #title { background: $boost; height: 1; }
    #messages { height: 1fr; }
    #compose { dock: bottom; }
    #verify { width: auto; height: auto; background: $panel; padding: 0 1; }
    #verify Static { width: auto; padding: 0 1; }
    VerifyScreen { align: center middle; }
    SearchScreen { align: center middle; }
    #search { width: 76; height: 20; background: $panel; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "quit"),
        Binding("ctrl+n", "next_conversation", "next", priority=True),
        Binding("ctrl+p", "previous_conversation", "previous", priority=True),
        Binding("f2", "verify", "verify", priority=True),
        Binding("ctrl+f", "search", "search", priority=True),
        Binding("ctrl+l", "focus_list", "list", priority=True),
    ]

    def __init__(self, home: Path, contact: str | None = None) -> None:
        super().__init__()
        self.home = home
        self.wanted = contact
        self.client = Client(home)
        self.contacts: dict[str, dict[str, Any]] = {}  # identity ID -> contact
        self.messages: dict[str, list[dict[str, Any]]] = {}  # identity ID -> messages
        self.files: dict[str, dict[str, Any]] = {}  # transfer ID -> file
        self.current: str | None = None
        self.shown: list[str] = []  # the lines the message pane shows
        self._stop = threading.Event()
        self._follower: Client | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="alert", markup=False)
        with Horizontal():
            yield ListView(id="conversations")
            with Vertical():
                yield Static("", id="title", markup=False)
                yield ListView(id="messages")
                yield Input(placeholder="type a message, Enter to send", id="compose")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_contacts()
        for message in self.client.request("inbox")["messages"]:
            self.messages.setdefault(
                str(message["to" if message["direction"] == "out" else "from"]), []
            ).append(message)
        for file in self.client.request("files.list")["files"]:
            self.files[str(file["id"])] = file
        self.refresh_list()
        ids = list(self.contacts)
        if self.wanted is not None:
            found = self.client.request("contacts.show", contact=self.wanted)["contact"]
            self.open(str(found["identity_id"]))
        elif ids:
            self.open(ids[0])
        self.query_one("#compose", Input).focus()
        thread = threading.Thread(target=self._follow, daemon=True)
        thread.start()
        self.set_interval(5.0, self.refresh_contacts_and_list)

    # -- the daemon's side ----------------------------------------------------------------

    def _follow(self) -> None:
        """In a thread: the daemon's events, handed to the app as they come."""
        try:
            client = self._follower = Client(self.home, timeout=None)
        except PigeonError as error:
            self.call_from_thread(self.show_alert, f"lost the daemon: {error}")
            return
        try:
            after = max((int(m["seq"]) for ms in self.messages.values() for m in ms), default=0)
            client.request("follow", after=after)
            for event in client.events():
                if self._stop.is_set():
                    return
                self.call_from_thread(self.on_daemon_event, event)
        except PigeonError as error:
            if not self._stop.is_set():
                self.call_from_thread(self.show_alert, f"lost the daemon: {error}")
        finally:
            client.close()

    def on_daemon_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "message":
            peer = peer_of(event)
            self.messages.setdefault(peer, []).append(event)
            if peer == self.current and event["direction"] == "in":
                self.client.request("read", contact=peer)
            if peer not in self.contacts:
                self.refresh_contacts()
        elif kind == "status":
            for messages in self.messages.values():
                for message in messages:
                    if message["id"] == event["id"]:
                        message["status"], message["reason"] = event["status"], event["reason"]
        elif kind == "file":
            self.files[str(event["id"])] = event
        self.refresh_list()
        self.refresh_pane()

    def refresh_contacts(self) -> None:
        listed = self.client.request("contacts.list")["contacts"]
        self.contacts = {str(c["identity_id"]): c for c in listed}
        alerts = [
            f"!! KEY CHANGE: {safe_line(str(c['label']))} - see pigeon contacts list"
            for c in listed
            if c["key_change"]
        ]
        requests = self.client.request("requests.list")["requests"]
        if requests:
            alerts.append(f"{len(requests)} message request(s): pigeon requests")
        self.show_alert("   ".join(alerts))

    def refresh_contacts_and_list(self) -> None:
        try:
            self.refresh_contacts()
        except PigeonError as error:
            self.show_alert(f"lost the daemon: {error}")
            return
        self.refresh_list()
        self.refresh_title()

    def show_alert(self, text: str) -> None:
        alert = self.query_one("#alert", Static)
        alert.update(text)
        alert.set_class(bool(text), "shown")

    # -- drawing -----------------------------------------------------------------------------

    def refresh_list(self) -> None:
        view = self.query_one("#conversations", ListView)
        items = {item.contact["identity_id"]: item for item in view.query(Conversation)}
        for identity, contact in self.contacts.items():
            messages = self.messages.get(identity, [])
            unread = sum(1 for m in messages if m["direction"] == "in" and m["status"] != "read")
            if identity == self.current:
                unread = 0
            last = safe_line(str(messages[-1]["text"])) if messages else ""
            item = items.pop(identity, None)
            if item is None:
                item = Conversation(contact)
                view.append(item)
            item.show(contact, unread, last)
        for gone in items.values():
            gone.remove()

    def refresh_title(self) -> None:
        contact = self.contacts.get(self.current or "")
        title = self.query_one("#title", Static)
        if contact is None:
            title.update("no conversation: add a contact (pigeon contacts add)")
            return
        trust = (
            "!! key changed"
            if contact["key_change"]
            else "verified"
            if contact["verified"]
            else "not verified (F2)"
        )
        presence = "online" if contact["online"] else "offline"
        timer = f", disappearing after {contact['timer_s']}s" if contact.get("timer_s") else ""
        title.update(f"{safe_line(str(contact['label']))}: {presence}, {trust}{timer}")

    def refresh_pane(self) -> None:
        pane = self.query_one("#messages", ListView)
        lines = [message_line(m) for m in self.messages.get(self.current or "", [])]
        lines += [file_line(f) for f in self.files.values() if f["peer"] == self.current]
        labels = [item.query_one(Label) for item in pane.query(ListItem)]
        for index, (label, line) in enumerate(zip(labels, lines, strict=False)):
            if self.shown[index] != line:
                label.update(line)
        for line in lines[len(labels) :]:
            pane.append(ListItem(Label(line, markup=False)))
        for extra in list(pane.query(ListItem))[len(lines) :]:
            extra.remove()
        self.shown = lines
        pane.scroll_end(animate=False)

    def open(self, identity: str) -> None:
        if self.current != identity:
            self.query_one("#messages", ListView).clear()
            self.shown = []
        self.current = identity
        if any(
            m["direction"] == "in" and m["status"] != "read"
            for m in self.messages.get(identity, [])
        ):
            self.client.request("read", contact=identity)
            for message in self.messages[identity]:
                if message["direction"] == "in":
                    message["status"] = "read"
        self.refresh_title()
        self.refresh_list()
        self.refresh_pane()

    # -- the user's side ---------------------------------------------------------------------

    @on(ListView.Selected, "#conversations")
    def chosen(self, event: ListView.Selected) -> None:
        if isinstance(event.item, Conversation):
            self.open(str(event.item.contact["identity_id"]))
            self.query_one("#compose", Input).focus()

    @on(Input.Submitted, "#compose")
    def send(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip() or self.current is None:
            return
        try:
            check_text(text)
            self.client.request("send", contact=self.current, text=text)
        except PigeonError as error:
            self.notify(f"not sent: {error}", severity="error")
            return
        event.input.value = ""

    def _move(self, step: int) -> None:
        ids = list(self.contacts)
        if not ids:
            return
        index = ids.index(self.current) if self.current in ids else -step
        self.open(ids[(index + step) % len(ids)])

    def action_next_conversation(self) -> None:
        self._move(1)

    def action_previous_conversation(self) -> None:
        self._move(-1)

    def action_focus_list(self) -> None:
        self.query_one("#conversations", ListView).focus()

    def action_verify(self) -> None:
        if self.current is not None:
            self.push_screen(VerifyScreen(self.client.request("verify", contact=self.current)))

    def action_search(self) -> None:
        def opened(identity: str | None) -> None:
            if identity is not None and identity in self.contacts:
                self.open(identity)

        self.push_screen(SearchScreen(self.client), opened)

    def on_unmount(self) -> None:
        self._stop.set()
        self.client.close()
        if self._follower is not None:
            # Wakes the thread's blocking read; the thread closes its client.
            with contextlib.suppress(OSError):
                self._follower.sock.shutdown(socket.SHUT_RDWR)


def run_tui(home: Path, contact: str | None) -> int:
    PigeonTUI(home, contact).run()
    return 0
