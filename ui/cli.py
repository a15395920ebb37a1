"""The ``pigeon`` command line.

Every command but ``init``, ``daemon``, ``demo`` (and ``id`` when no daemon
runs) talks to the running daemon through its control socket.  Errors are
one line on stderr and a non-zero exit code.

A command that only talks to the daemon imports neither trio nor libp2p (nor
aiortc, textual or matplotlib): what a command needs beyond the standard
library, the protocol and the control-socket client it imports inside itself.
tests/test_cli_imports.py holds the commands to it.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from pigeon.protocol import (
    MAX_TEXT_BYTES,
    MAX_TIMER,
    PigeonError,
    check_text,
    format_safety_number,
    identity_id,
)

from . import files, qr, sim
from .term import safe, safe_line


class UsageError(PigeonError):
    pass


def default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pigeon"


def resolve_home(args: argparse.Namespace) -> Path:
    if args.home:
        return Path(args.home).expanduser()
    if os.environ.get("PIGEON_HOME"):
        return Path(os.environ["PIGEON_HOME"]).expanduser()
    return default_home()


def passphrase(
    confirm: bool = False, variable: str = "PIGEON_PASSPHRASE", what: str = "Passphrase"
) -> str:
    value = os.environ.get(variable)
    if value is not None:
        return value
    if not sys.stdin.isatty():
        raise UsageError(f"no {what.lower()}: set {variable} or run from a terminal")
    first = getpass.getpass(f"{what}: ")
    if confirm and getpass.getpass(f"{what} again: ") != first:
        raise UsageError("the passphrases differ")
    return first


def backup_passphrase(confirm: bool = False) -> str:
    return passphrase(confirm, "PIGEON_BACKUP_PASSPHRASE", "Backup passphrase")


class _Version(argparse.Action):
    """``--version``, looked up only when asked for: reading the installed
    package's metadata costs every other command tens of milliseconds."""

    def __init__(self, option_strings: list[str], dest: str) -> None:
        super().__init__(
            option_strings,
            dest=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            nargs=0,
            help="show program's version number and exit",
        )

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        from importlib import metadata

        try:
            version = metadata.version("pigeon-messenger")
        except metadata.PackageNotFoundError:
            version = "unknown (not installed)"
        print(f"pigeon {version}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pigeon", description="Peer-to-peer, end-to-end encrypted messaging."
    )
    parser.add_argument("--home", help="node directory (default: $PIGEON_HOME or user data dir)")
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser("init", help="create your identity")
    init.add_argument("--name", required=True, help="the display name contacts see")
    init.add_argument(
        "--empty-passphrase",
        action="store_true",
        help="accept an empty passphrase: the database is then readable by anyone who can read it",
    )

    ident = commands.add_parser("id", help="show your identity and contact code")
    ident.add_argument("--json", action="store_true")
    ident.add_argument("--qr", action="store_true", help="print the contact code as a QR code")
    ident.add_argument("--png", metavar="FILE", help="write the contact code's QR code to FILE")

    daemon = commands.add_parser("daemon", help="run your node")
    daemon.add_argument(
        "--listen",
        action="append",
        metavar="MULTIADDR",
        default=[],
        help="where to listen (repeatable; default: every interface, IPv4 and IPv6, on a"
        " port chosen at the first start and kept); an address named here is told to"
        " others as it is",
    )
    daemon.add_argument("--bootstrap", action="append", metavar="MULTIADDR", default=[])
    daemon.add_argument(
        "--relay",
        action="store_true",
        help="also relay connections for nodes behind NAT (limits: docs/NETWORK.md)",
    )
    daemon.add_argument(
        "--mailbox", action="store_true", help="also serve as a mailbox peer for others"
    )
    daemon.add_argument(
        "--mailboxes",
        type=int,
        default=3,
        metavar="K",
        help="how many mailbox peers hold your messages while you are offline (default 3)",
    )
    daemon.add_argument(
        "--mailbox-rate-limit",
        type=int,
        default=60,
        metavar="N",
        help="as a mailbox: deposits accepted per depositor per minute (default 60)",
    )
    daemon.add_argument(
        "--mailbox-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how often to collect from your mailboxes (default 30)",
    )
    daemon.add_argument(
        "--no-presence",
        action="store_true",
        help="do not tell contacts when you are online",
    )
    daemon.add_argument(
        "--downloads",
        metavar="DIR",
        help="where accepted files are saved (default: HOME/downloads, HOME being --home)",
    )
    daemon.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="a STUN or TURN server for file transfers (stun:HOST:PORT,"
        " turn:USER:PASSWORD@HOST:PORT); may be repeated; none by default",
    )
    daemon.add_argument("-v", "--verbose", action="store_true")

    contacts = commands.add_parser("contacts", help="add, list, rename or remove contacts")
    sub = contacts.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = sub.add_parser(
        "add", help="add a contact by contact code, or by a picture of its QR code"
    )
    add.add_argument(
        "code",
        metavar="CODE|QR.png",
        help="the contact code (pigeon:...) or an image of its QR code",
    )
    add.add_argument("--as", dest="alias", metavar="ALIAS", help="what to call the contact")
    listing = sub.add_parser("list", help="list contacts with presence")
    listing.add_argument("--json", action="store_true")
    rename = sub.add_parser("rename", help="call a contact something else")
    rename.add_argument("contact")
    rename.add_argument("alias", metavar="NEW_NAME")
    remove = sub.add_parser(
        "remove", help="forget a contact: its sessions, queued messages and history"
    )
    remove.add_argument("contact")
    accept_key = sub.add_parser(
        "accept-key",
        help="accept a contact's new identity (after its key change alert)",
        description="A contact that moved to a new identity (pigeon identity rotate, signed"
        " by its old key) gets nothing from you until you accept the move.  After a lost"
        " device there is no signed move: the contact writes from its new identity, which"
        " shows as a message request; name it with --from.  Check with the person another"
        " way first (pigeon verify compares the new safety number and accepts on a match).",
    )
    accept_key.add_argument("contact")
    accept_key.add_argument(
        "--from",
        dest="source",
        metavar="ID",
        help="the message request (identity ID) the contact now writes from",
    )

    identity = commands.add_parser("identity", help="move to a new identity")
    identity_sub = identity.add_subparsers(dest="action", required=True, metavar="ACTION")
    identity_sub.add_parser(
        "rotate",
        help="create a new identity, signed over by the old one (with the daemon stopped)",
        description="Create a new identity key.  The old key signs a statement naming the"
        " new one, which your daemon publishes under both identities when it next runs;"
        " your contacts' nodes then alert their users, who accept the new key or verify"
        " it again before anything more is sent to you.  Messages not yet delivered go"
        " out again from the new identity.  Use it when the old key may be compromised.",
    )

    verify = commands.add_parser(
        "verify",
        help="compare safety numbers with a contact, and mark it verified",
        description="Show the safety number you share with a contact (the same 60 digits"
        " on both sides) and a QR code of it.  Compare the numbers aloud, then --accept;"
        " or --scan a picture of the contact's QR code, which marks the contact verified"
        " only if it matches.",
    )
    verify.add_argument("contact")
    verify.add_argument("--json", action="store_true")
    verify.add_argument("--png", metavar="FILE", help="write the safety number's QR code to FILE")
    how = verify.add_mutually_exclusive_group()
    how.add_argument(
        "--scan", metavar="FILE", help="compare with the contact's QR code in this image"
    )
    how.add_argument(
        "--accept", action="store_true", help="mark verified: you compared the numbers aloud"
    )

    requests = commands.add_parser(
        "requests", help="messages from people who are not your contacts (yet)"
    )
    requests.add_argument("--json", action="store_true")
    requests_sub = requests.add_subparsers(dest="action", metavar="ACTION")
    accept_request = requests_sub.add_parser(
        "accept", help="make the sender a contact and show the conversation"
    )
    accept_request.add_argument("id", metavar="ID", help="the sender's identity ID (or its start)")
    block = commands.add_parser("block", help="refuse everything from an identity from now on")
    block.add_argument("id", metavar="ID", help="a message request's identity ID, or a contact")
    unblock = commands.add_parser("unblock", help="stop refusing an identity")
    unblock.add_argument("id", metavar="ID", help="the blocked identity ID (or its start)")

    send = commands.add_parser(
        "send",
        help="send a message",
        description=f"Send a text of at most {MAX_TEXT_BYTES:,} bytes of UTF-8 to a contact."
        " The text is the argument, or standard input when it is '-' or left out"
        " (one trailing newline is dropped).",
    )
    send.add_argument("contact")
    send.add_argument("text", nargs="?", default="-", help="the message, or - for standard input")

    inbox = commands.add_parser("inbox", help="show conversations")
    inbox.add_argument("--json", action="store_true")
    inbox.add_argument("--follow", action="store_true", help="keep showing new messages")
    inbox.add_argument("--contact")

    history = commands.add_parser(
        "history", help="page through one conversation, newest page first"
    )
    history.add_argument("contact")
    history.add_argument("--limit", type=int, default=50, metavar="N", help="messages a page")
    history.add_argument(
        "--before", metavar="ID", help="the page before this message (its ID: --json)"
    )
    history.add_argument("--json", action="store_true")
    search = commands.add_parser("search", help="find messages by the words in them")
    search.add_argument("text", metavar="TEXT", help="every word must be in the message")
    search.add_argument("--limit", type=int, default=50, metavar="N")
    search.add_argument("--json", action="store_true")

    backup = commands.add_parser(
        "backup",
        help="write an encrypted backup, or restore one into a new home",
        description="A backup holds your identity, contacts, sessions, history and settings,"
        " encrypted under a backup passphrase (PIGEON_BACKUP_PASSPHRASE, or asked for).  It"
        " can be made while the daemon runs.  Restore it into a home that holds no"
        " identity yet, with a passphrase for the new database (PIGEON_PASSPHRASE).",
    )
    backup_sub = backup.add_subparsers(dest="action", required=True, metavar="ACTION")
    backup_create = backup_sub.add_parser("create", help="write an encrypted backup to FILE")
    backup_create.add_argument("file", metavar="FILE")
    backup_restore = backup_sub.add_parser("restore", help="restore FILE into this home")
    backup_restore.add_argument("file", metavar="FILE")

    timer = commands.add_parser(
        "timer",
        help="disappearing messages: delete a conversation's texts on both sides after a time",
        description="Set the conversation's timer for you and the contact: texts sent from"
        " now on are deleted from both nodes that long after they were sent, and one still"
        " waiting in a mailbox past its time is never delivered.  DURATION: 30s, 10m, 1h,"
        " 1d, 1w (at most a year), or off.",
    )
    timer.add_argument("contact")
    timer.add_argument("duration", metavar="DURATION|off")

    chat = commands.add_parser("chat", help="talk with a contact interactively")
    chat.add_argument("contact")
    tui = commands.add_parser(
        "tui",
        help="a full-screen chat: every conversation, live statuses, keyboard only",
        description="Ctrl+N/Ctrl+P: next/previous conversation; Ctrl+L: the list;"
        " F2: the safety number; Ctrl+F: search; Enter sends; Ctrl+Q quits.",
    )
    tui.add_argument("contact", nargs="?", help="the conversation to open first")

    files.add_commands(commands)

    commands.add_parser("status", help="show the daemon's state")
    commands.add_parser("stop", help="stop the running daemon")
    commands.add_parser(
        "demo",
        help="run three real nodes here (a bootstrap node, Alice and Bob) and show a conversation",
    )
    sim.add_command(commands)
    return parser


def _client(home: Path, timeout: float | None = 60.0) -> Any:
    from pigeon.node.control_client import Client

    return Client(home, timeout)


def _print_message(message: dict[str, Any], as_json: bool) -> None:
    if as_json:
        message = {k: v for k, v in message.items() if k not in ("event",)}
        print(json.dumps(message), flush=True)
        return
    stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(message["sent_at"])))
    arrow = "->" if message["direction"] == "out" else "<-"
    who = safe_line(str(message.get("contact_name", message["from_name"])))
    status = ""
    if message["direction"] == "out":
        reason = message.get("reason")
        status = f"  [{message['status']}{': ' + safe_line(reason) if reason else ''}]"
    print(f"{stamp} {arrow} {who}: {safe(str(message['text']))}{status}", flush=True)


def cmd_init(home: Path, args: argparse.Namespace) -> int:
    from pigeon.node.conversations import Conversations
    from pigeon.node.storage import Database
    from pigeon.protocol.contact import validate_name

    name = validate_name(args.name)
    secret = passphrase(confirm=True)
    if not secret and not args.empty_passphrase:
        warning = f"empty passphrase: anyone who can read {home} can read your messages"
        if os.environ.get("PIGEON_PASSPHRASE") is not None or not sys.stdin.isatty():
            raise UsageError(
                f"{warning}; set a passphrase, or accept none with: pigeon init --empty-passphrase"
            )
        try:
            answer = input(f"{warning}; continue? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            raise UsageError("no identity created: run pigeon init again and choose a passphrase")
    db = Database.create(home, secret)
    try:
        Conversations.initialise(db, name, os.urandom)
        conv = Conversations(db, os.urandom)
        print(f"created identity {conv.identity.identity_id.hex()} for {name!r} in {home}")
    finally:
        db.close()
    return 0


def cmd_id(home: Path, args: argparse.Namespace) -> int:
    from pigeon.node.control_client import DaemonNotRunning

    try:
        client = _client(home)
        info = client.request("id")
        client.close()
    except DaemonNotRunning:
        from pigeon.node.conversations import Conversations
        from pigeon.node.host import peer_id_for
        from pigeon.node.storage import Database
        from pigeon.protocol import ContactCode

        db = Database.open(home, passphrase())
        try:
            conv = Conversations(db, os.urandom)
            info = {
                "name": conv.name,
                "identity_id": conv.identity.identity_id.hex(),
                "contact_code": ContactCode(conv.identity.public_key, conv.name).to_uri(),
                "peer_id": str(peer_id_for(conv.device_seed)),
                "addresses": [],
            }
        finally:
            db.close()
    info.pop("ok", None)
    if args.png:
        qr.write_png(info["contact_code"], args.png)
    if args.json:
        print(json.dumps(info))
    else:
        print(f"name         {info['name']}")
        print(f"identity     {info['identity_id']}")
        print(f"peer         {info['peer_id']}")
        for address in info["addresses"]:
            print(f"address      {address}")
        print(f"contact code {info['contact_code']}")
    if args.qr:
        qr.print_terminal(info["contact_code"])
    return 0


def cmd_daemon(home: Path, args: argparse.Namespace) -> int:
    from pigeon.node.daemon import run_daemon
    from pigeon.node.mailbox_store import MailboxLimits
    from pigeon.node.node import NodeConfig

    config = NodeConfig(
        bootstrap=args.bootstrap,
        announce_presence=not args.no_presence,
        serve_mailbox=args.mailbox,
        relay=args.relay,
        mailbox_interval=args.mailbox_interval,
        mailbox_count=args.mailboxes,
        mailbox_limits=MailboxLimits(deposits_per_minute=args.mailbox_rate_limit),
        downloads=None if args.downloads is None else Path(args.downloads).expanduser().absolute(),
    )
    if args.ice_server:
        from pigeon.transfer.rtc import parse_ice_server

        config.ice_servers = [parse_ice_server(url) for url in args.ice_server]
    # Checked before the passphrase is asked and the database opened: a typo
    # costs nothing and changes nothing on disk.  None given: every interface,
    # on the node's own port (chosen by the daemon, which holds the database).
    config.listen = []
    if args.listen:
        from pigeon.node.host import listen_addresses

        config.listen = [str(address) for address in listen_addresses(args.listen)]
    return run_daemon(home, passphrase(), config, verbose=args.verbose)


def cmd_stop(home: Path, args: argparse.Namespace) -> int:
    import fcntl

    from pigeon.node.control_client import SOCKET_NAME, DaemonNotRunning

    def running() -> bool:
        """The daemon removes its control socket as it shuts down, then closes
        its connections and database and releases daemon.lock (held for its
        whole life): the lock says when it is really gone, even after kill -9."""
        try:
            fd = os.open(home / "daemon.lock", os.O_RDONLY)
        except FileNotFoundError:
            return (home / SOCKET_NAME).exists()
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also releases the shared lock just taken
        return False

    try:
        client = _client(home, timeout=10.0)
    except DaemonNotRunning:
        raise PigeonError(f"no Pigeon daemon is running for {home}") from None
    refused: PigeonError | None = None
    try:
        client.request("stop")
    except PigeonError as error:  # the daemon may close the connection as it stops
        refused = error
    finally:
        client.close()
    deadline = time.monotonic() + 15
    while running():
        if time.monotonic() > deadline:
            if refused is not None:
                raise refused
            raise PigeonError(
                f"the daemon for {home} is still shutting down after 15 s;"
                " if it does not exit, end its process"
            )
        time.sleep(0.1)
    print("stopped")
    return 0


def cmd_contacts(home: Path, args: argparse.Namespace) -> int:
    if args.action == "add":
        code = _contact_code(args.code)
        reply = _client(home).request("contacts.add", code=code, alias=args.alias)
        contact = reply["contact"]
        label = safe_line(contact["label"])
        if reply["added"]:
            print(f"added {label} ({contact['identity_id']})")
        else:
            print(f"{label} is already a contact ({contact['identity_id']})")
        return 0
    client = _client(home)
    if args.action == "accept-key":
        reply = client.request("contacts.accept_key", contact=args.contact, **{"from": args.source})
        contact = reply["contact"]
        print(
            f"{safe_line(contact['label'])} is now identity {contact['identity_id']}; what waited"
            f" goes to it.  Verify it when you can: pigeon verify {safe_line(contact['label'])}"
        )
        return 0
    if args.action == "rename":
        contact = client.request("contacts.rename", contact=args.contact, alias=args.alias)
        print(f"renamed to {safe_line(contact['contact']['label'])}")
        return 0
    if args.action == "remove":
        reply = client.request("contacts.remove", contact=args.contact)
        unsent = f", {reply['unsent']} unsent" if reply["unsent"] else ""
        print(f"removed {safe_line(reply['label'])} and {reply['messages']} messages{unsent}")
        return 0
    contacts = client.request("contacts.list")["contacts"]
    if args.json:
        for contact in contacts:
            print(json.dumps(contact))
        return 0
    for contact in contacts:
        seen = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(contact["last_seen"]))
            if contact["last_seen"]
            else "never"
        )
        presence = "online" if contact["online"] else f"last seen {seen}"
        if contact["online"] and contact["connection"]:
            presence += f" ({contact['connection']})"
        trust = "blocked " if contact["blocked"] else "verified" if contact["verified"] else ""
        print(
            f"{safe_line(contact['label']):20} {contact['identity_id'][:16]}  {trust:8}  {presence}"
        )
        if contact["key_change"]:
            print("  " + key_change_alert(contact))
    return 0


def key_change_alert(contact: dict[str, Any]) -> str:
    """The line no one should miss: a contact's key changed, or someone
    claims to be the contact with another key."""
    label = safe_line(contact["label"])
    change = contact["key_change"]
    new = change["identity_id"]
    if change["signed"]:
        return (
            f"!! KEY CHANGE: {label} moved to a new identity {new[:16]} (signed by the old key)."
            f"  Nothing is sent to {label} until you accept it: pigeon contacts accept-key"
            f" {label}, or compare the new safety number: pigeon verify {label}"
        )
    return (
        f"!! KEY CHANGE?: a message request from {new[:16]} says it is {label}, with another"
        f" key (a lost device, or someone posing as {label}).  Check with {label} another way;"
        f" then: pigeon contacts accept-key {label} --from {new[:8]}"
    )


def _contact_code(argument: str) -> str:
    """A contact code given as text, or read from a picture of its QR code."""
    if argument.startswith("pigeon:"):
        return argument
    path = Path(argument).expanduser()
    if not path.exists() and not path.suffix:
        raise UsageError(
            f"{argument[:60]!r} is neither a contact code (pigeon:...) nor an image file"
        )
    text = qr.read(path)
    if not text.startswith("pigeon:"):
        raise UsageError(f"the QR code in {path} is not a Pigeon contact code")
    return text


def cmd_verify(home: Path, args: argparse.Namespace) -> int:
    client = _client(home)
    if args.scan:
        picture = Path(args.scan).expanduser()
        scanned = qr.read(picture)
        if scanned.startswith("pigeon:"):
            raise UsageError(
                f"the QR code in {picture} is a contact code, not a safety-number code: ask"
                f" for the one `pigeon verify` shows (or add the contact: pigeon contacts add"
                f" {picture})"
            )
        reply = client.request("verify.scan", contact=args.contact, code=scanned)
    elif args.accept:
        reply = client.request("verify.accept", contact=args.contact)
    else:
        reply = client.request("verify", contact=args.contact)
    if args.png:
        qr.write_png(reply["qr"], args.png)
    label = safe_line(reply["contact"]["label"])
    if args.json:
        out = {k: reply[k] for k in ("identity_id", "safety_number", "verified", "verified_at")}
        out["label"] = reply["contact"]["label"]
        if "match" in reply:
            out["match"] = reply["match"]
        print(json.dumps(out))
    else:
        groups = format_safety_number(reply["safety_number"]).split()
        print(f"safety number with {label} ({reply['identity_id'][:16]}):")
        for row in range(3):
            print("  " + " ".join(groups[4 * row : 4 * row + 4]))
        if not args.scan and not args.accept:
            qr.print_terminal(reply["qr"])
            state = "verified" if reply["verified"] else "not verified"
            print(
                f"{label} is {state}.  Compare these digits with theirs (in person or on a call"
                f" you trust), then: pigeon verify {args.contact} --accept;"
                f" or scan their code: pigeon verify {args.contact} --scan THEIR.png"
            )
    if reply.get("match") is False:
        raise PigeonError(
            f"the scanned code does NOT match your safety number with {label}: nothing was"
            " marked.  It may be another person's code, or someone may be between you; compare"
            " the numbers aloud"
        )
    if (args.scan or args.accept) and not args.json:
        print(f"{label} is verified")
    return 0


def cmd_requests(home: Path, args: argparse.Namespace) -> int:
    client = _client(home)
    if args.action == "accept":
        reply = client.request("requests.accept", id=args.id)
        contact = reply["contact"]
        print(f"added {safe_line(contact['label'])} ({contact['identity_id']})")
        for message in reply["messages"]:
            _print_message(message, args.json)
        return 0
    reply = client.request("requests.list")
    if args.json:
        for request in reply["requests"]:
            print(json.dumps(request))
        return 0
    if not reply["requests"]:
        print("no message requests")
    for request in reply["requests"]:
        name = safe_line(request["name"]) if request["name"] else "(no name given)"
        refused = f", {request['refused']} more refused" if request["refused"] else ""
        print(f"{request['identity_id'][:16]}  says they are {name}{refused}")
        for field, what in (
            (
                "moved_from",
                "the new identity of your contact {0} (signed by the old key):"
                " pigeon contacts accept-key {0}",
            ),
            (
                "claims",
                "!! not your contact {0}, whose key is another: a new identity after a"
                " lost device, or someone posing as {0}.  Check with {0} another way",
            ),
        ):
            if request[field]:
                print("  " + what.format(safe_line(request[field])))
        for message in request["messages"]:
            print(f"    {safe_line(str(message['text']))}")
    if reply["requests"]:
        print("accept one: pigeon requests accept ID   refuse it for good: pigeon block ID")
    for blocked in reply["blocked"]:
        print(
            f"blocked: {blocked['identity_id'][:16]}  (pigeon unblock {blocked['identity_id'][:8]})"
        )
    return 0


def cmd_identity(home: Path, args: argparse.Namespace) -> int:
    from pigeon.node.control_client import DaemonNotRunning
    from pigeon.node.conversations import Conversations
    from pigeon.node.storage import Database

    try:
        _client(home).close()
    except DaemonNotRunning:
        pass
    else:
        raise UsageError(
            "stop the daemon first (pigeon stop), rotate, then start it again: it publishes"
            " the move when it starts"
        )
    db = Database.open(home, passphrase())
    try:
        rotation = Conversations.rotate(db, os.urandom, int(time.time()))
    finally:
        db.close()
    old, new = identity_id(rotation.old_key).hex(), identity_id(rotation.new_key).hex()
    print(f"moved from identity {old} to {new}")
    print(
        "Start your daemon: it tells your contacts' nodes, under both identities.  Their users"
        " must accept the new key before anything more reaches you; your messages not yet"
        " delivered go out again from the new identity.  Share your new contact code"
        " (pigeon id) with anyone who should add you from now on."
    )
    return 0


def cmd_block(home: Path, args: argparse.Namespace) -> int:
    reply = _client(home).request("block", id=args.id)
    print(f"blocked {reply['identity_id'][:16]}: everything from it is refused from now on")
    return 0


def cmd_unblock(home: Path, args: argparse.Namespace) -> int:
    reply = _client(home).request("unblock", id=args.id)
    print(f"unblocked {reply['identity_id'][:16]}")
    return 0


def read_text(argument: str) -> str:
    """The text to send: the argument, or standard input for '-'.  Checked
    against the one limit before anything reaches the daemon."""
    if argument != "-":
        text = argument
    else:
        if sys.stdin.isatty():
            print("type the message; end it with Ctrl-D", file=sys.stderr)
        raw = sys.stdin.buffer.read(MAX_TEXT_BYTES + 2)
        if len(raw) > MAX_TEXT_BYTES + 1:
            raise UsageError(
                f"message too long: more than {MAX_TEXT_BYTES:,} bytes on standard input"
                f" (the limit is {MAX_TEXT_BYTES:,} bytes of UTF-8)"
            )
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError("standard input is not UTF-8 text") from None
        if text.endswith("\n"):
            text = text[:-1]  # what echo and editors add, not part of the message
    check_text(text)
    return text


def cmd_send(home: Path, args: argparse.Namespace) -> int:
    text = read_text(args.text)
    reply = _client(home).request("send", contact=args.contact, text=text)
    print(reply["id"])
    return 0


def cmd_inbox(home: Path, args: argparse.Namespace) -> int:
    client = _client(home, timeout=None if args.follow else 60.0)
    messages = client.request("inbox", contact=args.contact)["messages"]
    for message in messages:
        _print_message(message, args.json)
    if not args.follow:
        return 0
    after = max((m["seq"] for m in messages), default=0)
    client.request("follow", contact=args.contact, after=after)
    for event in client.events():
        if event.get("event") == "message":
            _print_message(event, args.json)
    return 0


def cmd_history(home: Path, args: argparse.Namespace) -> int:
    reply = _client(home).request(
        "history", contact=args.contact, limit=args.limit, before=args.before
    )
    messages = reply["messages"]
    for message in messages:
        _print_message(message, args.json)
    if not args.json and len(messages) == args.limit:
        print(f"(older: pigeon history {safe_line(args.contact)} --before {messages[0]['id']})")
    return 0


def cmd_backup(home: Path, args: argparse.Namespace) -> int:
    from pigeon.node import backup
    from pigeon.node.storage import Database

    path = Path(args.file).expanduser().absolute()
    if args.action == "create":
        if path.is_dir():
            raise UsageError(f"{path} is a folder: name the backup file to write")
        db = Database.open(home, passphrase())
        try:
            size = backup.create(db, path, backup_passphrase(confirm=True))
        finally:
            db.close()
        print(f"wrote an encrypted backup to {path} ({size:,} bytes)")
        print("Keep its passphrase: without it, nothing in it can be read.")
        return 0
    secret = backup_passphrase()
    backup.read(path, secret)  # the whole file checked before the new passphrase is asked for
    db = backup.restore(path, secret, home, passphrase(confirm=True))
    try:
        from pigeon.node.conversations import Conversations

        conv = Conversations(db, os.urandom)
        contacts = db.one("SELECT count(*) FROM contacts")[0]
        messages = db.one("SELECT count(*) FROM messages")[0]
        print(
            f"restored identity {conv.identity.identity_id.hex()} ({safe_line(conv.name)})"
            f" into {home}: {contacts} contacts, {messages} messages"
        )
        print(backup.restored_notice(db))
    finally:
        db.close()
    return 0


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> int:
    """Seconds in "30s", "10m", "1h", "2d", "1w" (or a bare number of
    seconds); 0 for "off"."""
    value = text.strip().lower()
    if value in ("off", "0"):
        return 0
    unit = DURATION_UNITS.get(value[-1:], 1) if not value[-1:].isdigit() else 1
    number = value[:-1] if not value[-1:].isdigit() else value
    if not number.isdigit() or (not value[-1:].isdigit() and value[-1:] not in DURATION_UNITS):
        raise UsageError(f"{text!r} is not a duration: use 30s, 10m, 1h, 1d, 1w or off")
    seconds = int(number) * unit
    if not 1 <= seconds <= MAX_TIMER:
        raise UsageError("a timer is from 1 second to a year (or off)")
    return seconds


def format_duration(seconds: int) -> str:
    for unit, size in sorted(DURATION_UNITS.items(), key=lambda item: -item[1]):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def cmd_timer(home: Path, args: argparse.Namespace) -> int:
    seconds = parse_duration(args.duration)
    reply = _client(home).request("timer", contact=args.contact, seconds=seconds)
    label = safe_line(reply["contact"]["label"])
    if seconds:
        print(
            f"texts with {label} now disappear {format_duration(seconds)} after they are sent,"
            " on both sides"
        )
    else:
        print(f"texts with {label} are kept (the timer is off)")
    return 0


def cmd_search(home: Path, args: argparse.Namespace) -> int:
    messages = _client(home).request("search", text=args.text, limit=args.limit)["messages"]
    for message in messages:
        _print_message(message, args.json)
    if not messages and not args.json:
        print("no message holds all of those words")
    return 0


def cmd_status(home: Path, args: argparse.Namespace) -> int:
    reply = _client(home).request("status")
    reply.pop("ok", None)
    serving = reply.pop("mailbox_serving", None)
    for key, value in reply.items():
        print(f"{key:16} {value}")
    if serving is not None:
        print("mailbox holds:")
        for box in serving:
            print(f"  {box['mailbox'][:16]}  {box['messages']} messages, {box['bytes']} bytes")
    return 0


def cmd_chat(home: Path, args: argparse.Namespace) -> int:
    from .chat import run_chat

    return run_chat(home, args.contact)


def cmd_tui(home: Path, args: argparse.Namespace) -> int:
    from .tui import run_tui

    return run_tui(home, args.contact)


def cmd_send_file(home: Path, args: argparse.Namespace) -> int:
    return files.cmd_send_file(_client(home, timeout=None), args)


def cmd_files(home: Path, args: argparse.Namespace) -> int:
    return files.cmd_files(_client(home), args)


def cmd_accept(home: Path, args: argparse.Namespace) -> int:
    return files.cmd_accept(_client(home, timeout=None), args)


def cmd_cancel(home: Path, args: argparse.Namespace) -> int:
    return files.cmd_cancel(_client(home), args)


def cmd_demo(home: Path, args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def cmd_sim(home: Path, args: argparse.Namespace) -> int:
    return sim.cmd_sim(args)


COMMANDS = {
    "init": cmd_init,
    "id": cmd_id,
    "daemon": cmd_daemon,
    "contacts": cmd_contacts,
    "verify": cmd_verify,
    "requests": cmd_requests,
    "identity": cmd_identity,
    "block": cmd_block,
    "unblock": cmd_unblock,
    "send": cmd_send,
    "inbox": cmd_inbox,
    "history": cmd_history,
    "search": cmd_search,
    "timer": cmd_timer,
    "backup": cmd_backup,
    "chat": cmd_chat,
    "tui": cmd_tui,
    "send-file": cmd_send_file,
    "files": cmd_files,
    "accept": cmd_accept,
    "cancel": cmd_cancel,
    "status": cmd_status,
    "stop": cmd_stop,
    "demo": cmd_demo,
    "sim": cmd_sim,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](resolve_home(args), args)
    except PigeonError as error:
        print(f"pigeon: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Our standard output went away (``pigeon inbox | head``); a broken
        # control socket is a PigeonError above.  Exit as SIGPIPE would.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the interpreter flushes it at exit)
        return 141


if __name__ == "__main__":
    sys.exit(main())
