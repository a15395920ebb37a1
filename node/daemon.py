"""``pigeon daemon``: run a node and serve the control socket until SIGINT or
SIGTERM, then shut down cleanly (listeners closed, tasks cancelled)."""

from __future__ import annotations

import fcntl
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from pigeon.protocol import ContactCode, PigeonError

from . import control
from .contacts import Contact
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


def contact_json(node: Node, contact: Contact) -> dict[str, Any]:
    return {
        "name": contact.name,
        "alias": contact.alias,
        "label": contact.label,
        "identity_id": contact.identity_id,
        "online": node.is_online(contact),
        "last_seen": contact.last_seen,
    }


def _text(request: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    """A string argument of a control request, or a clear refusal."""
    value = request.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise PigeonError(f"bad request: {key!r} must be a string")
    return value


def _number(request: dict[str, Any], key: str) -> int:
    value = request.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PigeonError(f"bad request: {key!r} must be a whole number")
    return value


Reply = Callable[[dict[str, Any]], Awaitable[None]]


def make_handler(
    node: Node, stop: trio.Event
) -> Callable[[dict[str, Any], Reply], Awaitable[dict[str, Any] | None]]:
    conv = node.conversations
    contacts = node.contacts

    def find(request: dict[str, Any]) -> Contact:
        return contacts.find(str(_text(request, "contact")))

    def maybe_find(request: dict[str, Any]) -> bytes | None:
        """The identity key of the contact a request names, if it names one."""
        name = _text(request, "contact", required=False)
        return None if not name else contacts.find(name).identity_key

    async def follow(request: dict[str, Any], send: Reply) -> None:
        key = maybe_find(request)
        after = _number(request, "after")
        await send({"ok": True})
        watched: dict[str, tuple[str, str | None]] = {}  # outgoing id -> (status, reason) sent
        while True:
            for message in conv.inbox(key, after):
                after = max(after, int(str(message["seq"])))
                await send({"event": "message", **message})
                if message["direction"] == "out":
                    reason = message["reason"]
                    watched[str(message["id"])] = (
                        str(message["status"]),
                        None if reason is None else str(reason),
                    )
            for message_id, state in conv.statuses(list(watched)).items():
                if state != watched[message_id]:
                    watched[message_id] = state
                    status, reason = state
                    await send(
                        {"event": "status", "id": message_id, "status": status, "reason": reason}
                    )
                if state[0] == "read":
                    del watched[message_id]
            with trio.move_on_after(0.5):
                await node.wait_for_messages()

    async def handle(request: dict[str, Any], send: Reply) -> dict[str, Any] | None:
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
            code = ContactCode.parse(str(_text(request, "code")))
            contact, added = await node.add_contact(code, _text(request, "alias", required=False))
            return {"ok": True, "added": added, "contact": contact_json(node, contact)}
        if cmd == "contacts.rename":
            contact = contacts.rename(find(request), str(_text(request, "alias")))
            return {"ok": True, "contact": contact_json(node, contact)}
        if cmd == "contacts.remove":
            contact = find(request)
            removed = contacts.remove(contact)
            return {"ok": True, "label": contact.label, **removed}
        if cmd == "contacts.list":
            return {"ok": True, "contacts": [contact_json(node, c) for c in contacts.all()]}
        if cmd == "send":
            app = node.send_text(find(request), str(_text(request, "text")))
            return {"ok": True, "id": app.message_id.hex()}
        if cmd == "inbox":
            return {
                "ok": True,
                "messages": conv.inbox(maybe_find(request), _number(request, "after")),
            }
        if cmd == "follow":
            await follow(request, send)
            return None
        if cmd == "read":
            return {"ok": True, "read": node.mark_read(find(request))}
        if cmd == "status":
            return {"ok": True, **node.status()}
        if cmd == "stop":
            stop.set()
            return {"ok": True}
        raise PigeonError(f"unknown command {cmd!r}")

    return handle


def _lock(home: Path) -> Any:
    """One daemon per home: hold an exclusive lock for the daemon's lifetime."""
    try:
        handle = (home / "daemon.lock").open("a")
    except FileNotFoundError:
        raise PigeonError(f"no Pigeon identity in {home} (run: pigeon init)") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PigeonError(f"a Pigeon daemon is already running for {home}") from None
    return handle


async def run(home: Path, passphrase: str, config: NodeConfig) -> None:
    lock = _lock(home)  # before the database is opened (and perhaps migrated)
    try:
        db = Database.open(home, passphrase)
    except BaseException:
        lock.close()
        raise
    try:
        await _serve(home, db, config)
    except BaseException as error:
        # A damaged page the check at open did not reach: one clear line, not
        # the database error deep inside a task.
        damage = next(filter(None, (db.damage(leaf) for leaf in _leaves(error))), None)
        if damage is not None:
            raise damage from None
        raise
    finally:
        db.close()
        lock.close()
    log.info("daemon stopped")


async def _serve(home: Path, db: Database, config: NodeConfig) -> None:
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


async def _wait_for_signal(signals: Any, stop: trio.Event) -> None:
    async for signum in signals:
        log.info("received signal %s", signal.Signals(signum).name)
        stop.set()
        return


def _leaves(error: BaseException) -> Iterator[BaseException]:
    """The exceptions inside trio's (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error


def run_daemon(home: Path, passphrase: str, config: NodeConfig, verbose: bool = False) -> int:
    setup_logging(verbose)
    try:
        trio.run(run, home, passphrase, config)
    except BaseExceptionGroup as group:
        # An error raised inside a nursery (a listen address refused as the
        # host starts, say) arrives wrapped: the user gets its one line.
        leaves = list(_leaves(group))
        if len(leaves) == 1 and isinstance(leaves[0], PigeonError):
            raise leaves[0] from None
        raise
    return 0
