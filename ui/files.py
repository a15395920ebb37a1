"""``pigeon send-file``, ``files``, ``accept`` and ``cancel``: the daemon moves
the bytes; these ask it to, and show how it goes."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pigeon.protocol import PigeonError
from pigeon.transfer.reference import human_size

from .term import safe_line

POLL = 0.5  # seconds between looks at a transfer's progress
FINAL = ("done", "failed", "refused", "cancelled")
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """'50MB', '1.5GB', '700KiB' or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise PigeonError(f"{text!r} is not a size (say 50MB, 1GB, 700KiB or a number of bytes)")
    return int(float(match.group(1)) * _UNITS[unit])


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02}:{seconds % 60:02}"


class Progress:
    """One line on standard error that redraws itself on a terminal, and a
    line per state change (and per 10%) anywhere else."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.samples: list[tuple[float, int]] = []
        self.last_line = ""
        self.last_key: tuple[str, str | None, int] | None = None

    def show(self, file: dict[str, Any]) -> None:
        now = time.monotonic()
        done, size = int(file["bytes_done"]), max(int(file["size"]), 1)
        self.samples = [s for s in self.samples if now - s[0] <= 5.0] + [(now, done)]
        state = file["state"]
        if state == "transferring":
            first_at, first = self.samples[0]
            rate = (done - first) / (now - first_at) if now > first_at else 0.0
            left = f"{_clock((size - done) / rate)} left" if rate > 0 else "--:--:-- left"
            width = 24
            filled = int(width * done / size)
            bar = "#" * filled + "-" * (width - filled)
            line = (
                f"[{bar}] {100 * done / size:5.1f}%  {human_size(done)} of {human_size(size)}"
                f"  {human_size(rate)}/s  {left}"
            )
        else:
            reason = file.get("error")
            line = f"{state}{': ' + safe_line(reason) if reason else ''}"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
            self.last_line = line
            return
        # elsewhere (a log, a pipe): a line per state and per tenth done
        key = (state, file.get("error"), int(10 * done / size) if state == "transferring" else 0)
        if key != self.last_key:
            print(line, file=self.stream, flush=True)
            self.last_key = key

    def end(self) -> None:
        if self.tty and self.last_line:
            self.stream.write("\n")
            self.stream.flush()


def follow(client: Any, transfer_id: str, progress: Progress) -> dict[str, Any]:
    """Show a transfer's progress until it ends; its last state."""
    last_shown: tuple[str, int, str | None] | None = None
    try:
        while True:
            files = client.request("files.list")["files"]
            file: dict[str, Any] | None = next((f for f in files if f["id"] == transfer_id), None)
            if file is None:
                raise PigeonError("the transfer is gone (its contact was removed?)")
            key = (file["state"], file["bytes_done"], file.get("error"))
            if key != last_shown or file["state"] == "transferring":
                progress.show(file)
                last_shown = key
            if file["state"] in FINAL:
                return file
            time.sleep(POLL)
    finally:
        progress.end()


def _ended(file: dict[str, Any], done: Callable[[dict[str, Any]], str]) -> int:
    if file["state"] == "done":
        print(done(file))
        return 0
    reason = file.get("error") or file["state"]
    raise PigeonError(f"{safe_line(file['name'])} {file['state']}: {safe_line(reason)}")


def cmd_send_file(client: Any, args: argparse.Namespace) -> int:
    source = Path(args.path).expanduser().absolute()
    if not source.is_file():
        raise PigeonError(f"{args.path} is not a file")
    print(
        f"preparing {safe_line(source.name)} ({human_size(source.stat().st_size)})...",
        file=sys.stderr,
    )
    file = client.request("files.send", contact=args.contact, path=str(source))["file"]
    label = safe_line(str(file["contact"]))
    print(
        f"offered {safe_line(file['name'])} to {label} (transfer {file['id'][:8]})", file=sys.stderr
    )
    if args.no_wait:
        print(file["id"])
        return 0
    print(
        f"waiting for {label} to accept; Ctrl-C leaves the transfer to the daemon"
        " (see: pigeon files)",
        file=sys.stderr,
    )
    final = follow(client, file["id"], Progress())
    return _ended(
        final, lambda f: f"sent {safe_line(f['name'])} to {label} ({human_size(f['size'])})"
    )


def cmd_accept(client: Any, args: argparse.Namespace) -> int:
    folder = None if args.to is None else str(Path(args.to).expanduser().absolute())
    file = client.request("files.accept", id=args.id, to=folder)["file"]
    print(f"accepted {safe_line(file['name'])} ({human_size(file['size'])})", file=sys.stderr)
    if args.no_wait:
        return 0
    final = follow(client, file["id"], Progress())
    return _ended(final, lambda f: f"saved {f['path']}")


def cmd_cancel(client: Any, args: argparse.Namespace) -> int:
    file = client.request("files.cancel", id=args.id)["file"]
    print(f"{safe_line(file['name'])}: {file['state']}")
    return 0


def cmd_files(client: Any, args: argparse.Namespace) -> int:
    if args.action == "auto-accept":
        who = None if args.contact == "all" else args.contact
        limit = None if args.max_size == "off" else parse_size(args.max_size)
        client.request("files.auto_accept", contact=who, max_bytes=limit)
        whom = "every contact" if who is None else safe_line(who)
        if limit is None:
            print(f"files from {whom} wait for pigeon accept")
        else:
            print(f"files up to {human_size(limit)} from {whom} are accepted without asking")
        return 0
    files = client.request("files.list")["files"]
    if args.json:
        for file in files:
            print(json.dumps(file))
        return 0
    if not files:
        print("no files sent or received yet")
    for file in files:
        arrow = "->" if file["direction"] == "out" else "<-"
        who = safe_line(str(file["contact"] or file["peer"][:16]))
        state = file["state"]
        if state in ("transferring", "paused"):
            state += f" {100 * file['bytes_done'] // max(file['size'], 1)}%"
        line = (
            f"{file['id'][:8]}  {arrow} {who:12} {safe_line(file['name'])}"
            f"  {human_size(file['size'])}  {state}"
        )
        if file.get("error"):
            line += f" ({safe_line(file['error'])})"
        if file.get("path"):
            line += f"  {safe_line(file['path'])}"
        print(line)
    return 0


def add_commands(commands: Any) -> None:
    """The file commands, on the main parser's subcommands."""
    send = commands.add_parser(
        "send-file",
        help="send a file to a contact, directly between your nodes",
        description="Offer a file to a contact and show the transfer until it ends."
        " The contact accepts it with pigeon accept; the file moves directly between"
        " the two daemons (WebRTC), encrypted, and resumes if interrupted.",
    )
    send.add_argument("contact")
    send.add_argument("path")
    send.add_argument(
        "--no-wait", action="store_true", help="return once offered, printing the transfer ID"
    )
    files = commands.add_parser("files", help="list files sent and received")
    files.add_argument("--json", action="store_true", help="one JSON object per transfer")
    sub = files.add_subparsers(dest="action", metavar="ACTION")
    auto = sub.add_parser(
        "auto-accept", help="accept files from a contact (or all) without asking, up to a size"
    )
    auto.add_argument("contact", help="a contact, or all")
    auto.add_argument("max_size", metavar="SIZE|off", help="largest file accepted (e.g. 50MB)")
    accept = commands.add_parser("accept", help="accept a file a contact offered")
    accept.add_argument("id", help="the transfer ID (or its first 6+ hex digits; see pigeon files)")
    accept.add_argument(
        "--to", metavar="DIR", help="folder to save it in (default: HOME/downloads)"
    )
    accept.add_argument("--no-wait", action="store_true", help="return once accepted")
    cancel = commands.add_parser("cancel", help="cancel a transfer, or decline an offered file")
    cancel.add_argument("id")
