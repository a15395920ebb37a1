"""``pigeon daemon``: run a node and serve the control socket until SIGINT or
SIGTERM, then shut down cleanly (listeners closed, tasks cancelled)."""

from __future__ import annotations

import fcntl
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from libp2p.peer.id import ID

from pigeon.protocol import ContactCode, PigeonError

from . import control
from .host import quiet_libp2p_logs
from .node import Node, NodeConfig
from .storage import Database

log = logging.getLogger("pigeon.daemon")


class KeyValueFormatter(logging.Formatter):
    """One line per event: time, level, component, message (key=value pairs inside)."""

    def format(self, record: logging.LogRecord) -> str:
        return (
            f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} {record.levelname.lower():7}"
            f" {record.name} {record.getMessage()}"
        )


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    quiet_libp2p_logs()


def contact_json(node: Node, contact: Any) -> dict[str, Any]:
    return {
        "name": contact.name,
        "alias": contact.alias,
        "identity_id": contact.identity_id,
        "online": node.is_online(contact),
        "last_seen": contact.last_seen,
    }


def make_handler(
    node: Node, stop: trio.Event
) -> Callable[
    [dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]],
    Awaitable[dict[str, Any] | None],
]:
    conv = node.conversations

    async def handle(
        request: dict[str, Any], send: Callable[[dict[str, Any]], Awaitable[None]]
    ) -> dict[str, Any] | None:
        cmd = request["cmd"]
        if cmd == "id":
            return {
                "ok": True,
                "name": conv.name,
                "identity_id": conv.identity.identity_id.hex(),
                "contact_code": node.contact_code(),
                "peer_id": str(node.host.get_id()),
                "addresses": node.addresses,
            }
        if cmd == "contacts.add":
            code = ContactCode.parse(str(request["code"]))
            alias = request.get("alias")
            contact = conv.add_contact(code, str(alias) if alias else None)
            with trio.move_on_after(15):
                record = await node.refresh_record(contact.identity_key)
                for device in record.devices if record else ():
                    node.spawn(node.greet, ID(device.certificate.peer_id))
            return {"ok": True, "contact": contact_json(node, conv.contact(code.identity_key))}
        if cmd == "contacts.list":
            return {"ok": True, "contacts": [contact_json(node, c) for c in conv.contacts()]}
        if cmd == "send":
            contact = conv.find_contact(str(request["contact"]))
            text = str(request["text"])
            if not text:
                raise PigeonError("nothing to send: the message is empty")
            message_id = await node.send_text(contact, text)
            return {"ok": True, "id": message_id.hex()}
        if cmd == "inbox":
            key = (
                conv.find_contact(request["contact"]).identity_key
                if request.get("contact")
                else None
            )
            return {"ok": True, "messages": conv.inbox(key, int(request.get("after", 0)))}
        if cmd == "follow":
            key = (
                conv.find_contact(request["contact"]).identity_key
                if request.get("contact")
                else None
            )
            after = int(request.get("after", 0))
            await send({"ok": True})
            watched: dict[str, str] = {}  # outgoing message id -> last status sent
            while True:
                for message in conv.inbox(key, after):
                    after = max(after, int(message["seq"]))  # type: ignore[call-overload]
                    await send({"event": "message", **message})
                    if message["direction"] == "out":
                        watched[str(message["id"])] = str(message["status"])
                for message_id, status in conv.statuses(list(watched)).items():
                    if status != watched[message_id]:
                        watched[message_id] = status
                        await send({"event": "status", "id": message_id, "status": status})
                    if status == "read":
                        del watched[message_id]
                with trio.move_on_after(0.5):
                    await node.wait_for_messages()
        if cmd == "read":
            contact = conv.find_contact(str(request["contact"]))
            count = conv.mark_read(contact.identity_key)
            node.wake_outbox()
            return {"ok": True, "read": count}
        if cmd == "status":
            return {"ok": True, **node.status()}
        if cmd == "stop":
            stop.set()
            return {"ok": True}
        raise PigeonError(f"unknown command {cmd!r}")

    return handle


def _lock(home: Path) -> Any:
    """One daemon per home: hold an exclusive lock for the daemon's lifetime."""
    handle = (home / "daemon.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PigeonError(f"a Pigeon daemon is already running for {home}") from None
    return handle


async def run(home: Path, passphrase: str, config: NodeConfig) -> None:
    db = Database.open(home, passphrase)
    lock = _lock(home)
    try:
        node = Node(db, config)
        stop = trio.Event()
        async with node.running(), trio.open_nursery() as nursery:
            await nursery.start(control.serve, home / control.SOCKET_NAME, make_handler(node, stop))
            log.info(
                "daemon ready identity=%s peer=%s addresses=%s",
                node.conversations.identity.identity_id.hex(),
                node.host.get_id(),
                ",".join(node.addresses),
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                nursery.start_soon(_wait_for_signal, signals, stop)
                await stop.wait()
            log.info("daemon stopping")
            nursery.cancel_scope.cancel()
    finally:
        db.close()
        lock.close()
    log.info("daemon stopped")


async def _wait_for_signal(signals: Any, stop: trio.Event) -> None:
    async for signum in signals:
        log.info("received signal %s", signal.Signals(signum).name)
        stop.set()
        return


def run_daemon(home: Path, passphrase: str, config: NodeConfig, verbose: bool = False) -> int:
    setup_logging(verbose)
    trio.run(run, home, passphrase, config)
    return 0
