"""``pigeon daemon``: run a node and serve the control socket until SIGINT or
SIGTERM, then shut down cleanly (listeners closed, tasks cancelled)."""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from pigeon.protocol import (
    MAX_TIMER,
    ContactCode,
    PigeonError,
    compare_scannable,
    identity_id,
    safety_number,
    scannable_fingerprint,
    scannable_from_qr_text,
    scannable_to_qr_text,
)

from . import control
from .addresses import default_listen
from .backup import restored_notice
from .contacts import Contact
from .host import quiet_libp2p_logs
from .node import Node, NodeConfig
from .requests import Request
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
        "connection": node.connection(contact),
        "last_seen": contact.last_seen,
        "verified": contact.verified,
        "blocked": contact.blocked,
        "key_change": key_change(node, contact),
        "timer_s": node.conversations.timer(contact.identity_key) or None,
    }


def key_change(node: Node, contact: Contact) -> dict[str, Any] | None:
    """A contact's pending move to a new identity: signed by its old key
    (its record says so), or only claimed (a message request from another
    identity under the contact's name, as after a lost device)."""
    if contact.moved_to is not None:
        return {"identity_id": identity_id(contact.moved_to).hex(), "signed": True}
    claimant = node.conversations.requests.claiming(contact.name, contact.label)
    if claimant is not None:
        return {"identity_id": identity_id(claimant).hex(), "signed": False}
    return None


def verify_json(node: Node, contact: Contact) -> dict[str, Any]:
    """What ``pigeon verify`` shows: the safety number and our scannable code."""
    me = node.conversations.identity
    # While a move is pending, what is compared is the new key (matching it
    # accepts the move).
    key = contact.moved_to or contact.identity_key
    theirs = (key, identity_id(key))
    return {
        "contact": contact_json(node, contact),
        "identity_id": identity_id(key).hex(),
        "safety_number": safety_number(me.public_key, me.identity_id, *theirs),
        "qr": scannable_to_qr_text(scannable_fingerprint(me.public_key, me.identity_id, *theirs)),
        "verified": contact.verified,
        "verified_at": contact.verified_at,
    }


def request_json(node: Node, request: Request) -> dict[str, Any]:
    contacts = node.contacts.all()
    moved = [c.label for c in contacts if c.moved_to == request.identity_key]
    named = [c.label for c in contacts if request.name and request.claims(c.name, c.label)]
    return {
        # a contact whose old key signed its move to this identity
        "moved_from": moved[0] if moved else None,
        # a contact whose name it gives, with another key: a new identity
        # after a lost device, or someone posing as them
        "claims": named[0] if named and not moved else None,
        "identity_id": request.identity_id,
        "name": request.name,
        "first_at": request.first_at,
        "last_at": request.last_at,
        "messages": request.messages,
        "refused": request.refused,
    }


# The arguments each command takes, besides "cmd".  A request carrying any
# other key is refused, not served with the key ignored: a misspelt argument
# ("contacts" for "contact", say) would otherwise change what a command does
# (the whole inbox instead of one conversation) without a word.
ARGUMENTS: dict[str, frozenset[str]] = {
    "id": frozenset(),
    "contacts.add": frozenset({"code", "alias"}),
    "contacts.rename": frozenset({"contact", "alias"}),
    "contacts.remove": frozenset({"contact"}),
    "contacts.list": frozenset(),
    "contacts.show": frozenset({"contact"}),
    "contacts.accept_key": frozenset({"contact", "from"}),
    "verify": frozenset({"contact"}),
    "verify.scan": frozenset({"contact", "code"}),
    "verify.accept": frozenset({"contact"}),
    "requests.list": frozenset(),
    "requests.accept": frozenset({"id"}),
    "block": frozenset({"id"}),
    "unblock": frozenset({"id"}),
    "send": frozenset({"contact", "text"}),
    "inbox": frozenset({"contact", "after"}),
    "history": frozenset({"contact", "limit", "before"}),
    "search": frozenset({"text", "limit"}),
    "timer": frozenset({"contact", "seconds"}),
    "follow": frozenset({"contact", "after"}),
    "read": frozenset({"contact"}),
    "files.send": frozenset({"contact", "path"}),
    "files.list": frozenset(),
    "files.accept": frozenset({"id", "to"}),
    "files.cancel": frozenset({"id"}),
    "files.auto_accept": frozenset({"contact", "max_bytes"}),
    "status": frozenset(),
    "metrics": frozenset(),
    "lookup": frozenset({"contact"}),
    "stop": frozenset(),
}
# Sequence numbers are SQLite rowids: 64-bit and signed.
MAX_SEQUENCE = 2**63 - 1


def _quoted(name: str) -> str:
    """A name a client sent, short enough to quote in an error."""
    return repr(name[:32]) + ("..." if len(name) > 32 else "")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _command(request: dict[str, Any]) -> str:
    """The request's command, once every key it carries is one the command takes."""
    cmd = str(request["cmd"])
    takes = ARGUMENTS.get(cmd)
    if takes is None:
        raise control.BadRequest(f"unknown command {_quoted(cmd)}")
    for key in request:
        if key != "cmd" and key not in takes:
            listed = ", ".join(sorted(takes)) or "none"
            raise control.BadRequest(f"{cmd} takes no argument {_quoted(key)} (it takes: {listed})")
    return cmd


def _optional_text(request: dict[str, Any], key: str) -> str | None:
    """A string argument, or None when it is absent or null."""
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise control.BadRequest(f"{key!r} must be a string, not {_json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (\ud800, say) is valid JSON but not text: the
        # database, a peer and a terminal would each fail on it later.
        raise control.BadRequest(f"{key!r} is not valid text (a lone surrogate)") from None
    return value


def _text(request: dict[str, Any], key: str) -> str:
    """A string argument the command needs."""
    value = _optional_text(request, key)
    if value is None:
        raise control.BadRequest(f"{request['cmd']} needs {key!r} (a string)")
    return value


def _number(request: dict[str, Any], key: str) -> int:
    """A sequence number argument; 0 when it is absent or null."""
    value = request.get(key)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQUENCE:
        raise control.BadRequest(f"{key!r} must be a whole number from 0 to {MAX_SEQUENCE}")
    return value


DEFAULT_LIMIT = 50  # messages a history page or a search shows
MAX_LIMIT = 1000


def _limit(request: dict[str, Any]) -> int:
    """How many messages to show: ``limit``, or the default when absent."""
    value = request.get("limit")
    if value is None:
        return DEFAULT_LIMIT
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_LIMIT:
        raise control.BadRequest(f"'limit' must be a whole number from 1 to {MAX_LIMIT}")
    return value


def _message_id(text: str) -> bytes:
    try:
        message_id = bytes.fromhex(text)
    except ValueError:
        message_id = b""
    if len(message_id) != 16:
        raise control.BadRequest("a message ID is 32 hex characters (see: --json)")
    return message_id


def _path(request: dict[str, Any], key: str) -> Path | None:
    """An absolute path argument (the daemon's working directory is not the
    client's), or None when it is absent."""
    value = _optional_text(request, key)
    if value is None:
        return None
    if "\x00" in value or not value.startswith("/"):
        raise control.BadRequest(f"{key!r} must be an absolute path")
    return Path(value)


def _size_limit(request: dict[str, Any], key: str) -> int | None:
    """A size in bytes, or None (null or absent) for "off"."""
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEQUENCE:
        raise control.BadRequest(f"{key!r} must be a whole number of bytes, or null")
    return value


Reply = control.Send


def _identity(node: Node, name: str) -> bytes:
    """The identity a block names: a message request's sender, or a contact."""
    requests = node.conversations.requests
    try:
        return requests.find(name)
    except PigeonError:
        pass
    try:
        return node.contacts.find(name).identity_key
    except PigeonError:
        raise PigeonError(
            f"{name!r} is neither a message request nor a contact"
            " (see: pigeon requests, pigeon contacts list)"
        ) from None


def make_handler(node: Node, stop: trio.Event) -> control.Handler:
    conv = node.conversations
    contacts = node.contacts
    transfers = node.transfers

    def maybe_find(name: str | None) -> bytes | None:
        """The identity key of the contact a request names, if it names one."""
        return None if not name else contacts.find(name).identity_key

    async def follow(name: str | None, after: int, send: Reply) -> None:
        key = maybe_find(name)
        await send({"ok": True})
        watched: dict[str, tuple[str, str | None]] = {}  # outgoing id -> (status, reason) sent
        files_seen: dict[str, tuple[str, str | None, int]] = {}  # transfer id -> what was sent
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
            for file in transfers.list():
                if key is not None and file["peer"] != identity_id(key).hex():
                    continue
                # a line per state, and per quarter done while it moves
                quarter = 4 * file["bytes_done"] // max(file["size"], 1)
                shown = (file["state"], file["error"], quarter)
                if files_seen.get(file["id"]) != shown:
                    files_seen[file["id"]] = shown
                    await send({"event": "file", **file})
            with trio.move_on_after(0.5):
                await node.wait_for_messages()

    async def handle(request: dict[str, Any], send: Reply) -> dict[str, Any] | None:
        cmd = _command(request)
        try:
            return await dispatch(cmd, request, send)
        except PigeonError:
            raise
        except Exception as error:
            # A damaged page this request reached: the one line to show for it.
            damage = node.db.damage(error)
            if damage is not None:
                raise damage from None
            raise

    async def dispatch(cmd: str, request: dict[str, Any], send: Reply) -> dict[str, Any] | None:
        # Every argument is read (and so its shape checked) before anything is done.
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
            uri, alias = _text(request, "code"), _optional_text(request, "alias")
            contact, added = await node.add_contact(ContactCode.parse(uri), alias)
            return {"ok": True, "added": added, "contact": contact_json(node, contact)}
        if cmd == "contacts.rename":
            name, alias = _text(request, "contact"), _text(request, "alias")
            contact = contacts.rename(contacts.find(name), alias)
            return {"ok": True, "contact": contact_json(node, contact)}
        if cmd == "contacts.remove":
            contact = contacts.find(_text(request, "contact"))
            removed = contacts.remove(contact)
            return {"ok": True, "label": contact.label, **removed}
        if cmd == "contacts.list":
            return {"ok": True, "contacts": [contact_json(node, c) for c in contacts.all()]}
        if cmd == "contacts.show":
            return {
                "ok": True,
                "contact": contact_json(node, contacts.find(_text(request, "contact"))),
            }
        if cmd == "contacts.accept_key":
            contact = contacts.find(_text(request, "contact"))
            claimant = _optional_text(request, "from")
            if claimant is not None:
                new = conv.requests.find(claimant)
            elif contact.moved_to is not None:
                new = contact.moved_to
            else:
                raise PigeonError(
                    f"{contact.label} has not moved to a new identity; after a lost device,"
                    " name the message request it wrote from: --from ID (pigeon requests)"
                )
            contact = await node.accept_key(contact, new)
            return {"ok": True, "contact": contact_json(node, contact)}
        if cmd == "verify":
            return {"ok": True, **verify_json(node, contacts.find(_text(request, "contact")))}
        if cmd == "verify.scan":
            name, scanned = _text(request, "contact"), _text(request, "code")
            contact = contacts.find(name)
            theirs = scannable_from_qr_text(scanned)
            ours = scannable_from_qr_text(verify_json(node, contact)["qr"])
            match = compare_scannable(ours, theirs)
            if match:
                if contact.moved_to is not None:  # the new key's number matched
                    contact = await node.accept_key(contact, contact.moved_to)
                contact = contacts.set_verified(contact, int(node.clock()))
            return {"ok": True, "match": match, **verify_json(node, contact)}
        if cmd == "verify.accept":
            contact = contacts.find(_text(request, "contact"))
            if contact.moved_to is not None:  # compared aloud: the new key's number
                contact = await node.accept_key(contact, contact.moved_to)
            contact = contacts.set_verified(contact, int(node.clock()))
            return {"ok": True, **verify_json(node, contact)}
        if cmd == "requests.list":
            return {
                "ok": True,
                "requests": [request_json(node, r) for r in conv.requests.all()],
                "blocked": conv.requests.blocked(),
            }
        if cmd == "requests.accept":
            contact = await node.accept_request(conv.requests.find(_text(request, "id")))
            return {
                "ok": True,
                "contact": contact_json(node, contact),
                "messages": conv.inbox(contact.identity_key),
            }
        if cmd == "block":
            blocked = _identity(node, _text(request, "id"))
            conv.requests.block(blocked, int(node.clock()))
            return {"ok": True, "identity_id": identity_id(blocked).hex()}
        if cmd == "unblock":
            blocked = conv.requests.find_blocked(_text(request, "id"))
            conv.requests.unblock(blocked)
            return {"ok": True, "identity_id": identity_id(blocked).hex()}
        if cmd == "send":
            name, text = _text(request, "contact"), _text(request, "text")
            app = node.send_text(contacts.find(name), text)
            return {"ok": True, "id": app.message_id.hex()}
        if cmd == "inbox":
            which, after = _optional_text(request, "contact"), _number(request, "after")
            return {"ok": True, "messages": conv.inbox(maybe_find(which), after)}
        if cmd == "history":
            contact = contacts.find(_text(request, "contact"))
            before = _optional_text(request, "before")
            return {
                "ok": True,
                "messages": conv.history(
                    contact.identity_key,
                    _limit(request),
                    None if before is None else _message_id(before),
                ),
            }
        if cmd == "timer":
            contact = contacts.find(_text(request, "contact"))
            seconds = _number(request, "seconds")
            if seconds > MAX_TIMER:
                raise control.BadRequest(f"'seconds' must be at most {MAX_TIMER} (a year)")
            node.set_timer(contact, seconds)
            return {"ok": True, "contact": contact_json(node, contacts.get(contact.identity_key))}
        if cmd == "search":
            return {"ok": True, "messages": conv.search(_text(request, "text"), _limit(request))}
        if cmd == "follow":
            which, after = _optional_text(request, "contact"), _number(request, "after")
            await follow(which, after, send)
            return None
        if cmd == "read":
            return {"ok": True, "read": node.mark_read(contacts.find(_text(request, "contact")))}
        if cmd == "files.send":
            name, source = _text(request, "contact"), _path(request, "path")
            if source is None:
                raise control.BadRequest("files.send needs 'path' (a string)")
            transfer = await transfers.offer(contacts.find(name).identity_key, source)
            return {"ok": True, "file": transfers.describe(transfer)}
        if cmd == "files.list":
            return {"ok": True, "files": transfers.list()}
        if cmd == "files.accept":
            which, folder = _text(request, "id"), _path(request, "to")
            transfer = transfers.accept(transfers.find(which), folder)
            return {"ok": True, "file": transfers.describe(transfer)}
        if cmd == "files.cancel":
            transfer = transfers.cancel(transfers.find(_text(request, "id")))
            return {"ok": True, "file": transfers.describe(transfer)}
        if cmd == "files.auto_accept":
            which, limit = _optional_text(request, "contact"), _size_limit(request, "max_bytes")
            key = maybe_find(which)
            transfers.set_auto_accept(key, limit)
            return {"ok": True, "contact": which, "max_bytes": limit}
        if cmd == "status":
            return {"ok": True, **node.status()}
        if cmd == "metrics":
            return {"ok": True, **node.metrics()}
        if cmd == "lookup":
            key = contacts.find(_text(request, "contact")).identity_key
            ms, found = await node.directory.probe(key)
            return {"ok": True, "ms": round(ms, 2), "found": found}
        if cmd == "stop":
            stop.set()
            return {"ok": True}
        # A command in ARGUMENTS that nothing here serves: the daemon's own bug.
        raise RuntimeError("command without a handler")

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
    if not config.listen:  # no --listen: every interface, on this node's own port
        config = dataclasses.replace(config, listen=default_listen(db))
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
        notice = restored_notice(db)
        if notice is not None:  # told once, at the first start after a restore
            log.warning("%s", notice)
            db.execute("DELETE FROM meta WHERE key = 'restored_at'")
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
