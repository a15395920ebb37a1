"""The control socket: how ``pigeon`` commands talk to the running daemon.

A Unix socket in the node's home, mode 0600.  One JSON object per line each
way: a request ``{"cmd": ..., ...}`` gets ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``.  ``follow`` keeps the connection open
and streams ``{"event": "message", ...}`` lines.  See docs/CONTROL.md.

This is the daemon's side, on trio.  The blocking client the commands use is
in control_client.py, which imports no trio (so that they start quickly); its
names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from pigeon.protocol import PigeonError

# The client's names, where they have always been imported from.
from .control_client import MAX_REQUEST as MAX_REQUEST
from .control_client import SOCKET_NAME as SOCKET_NAME
from .control_client import Client as Client
from .control_client import DaemonNotRunning as DaemonNotRunning

log = logging.getLogger("pigeon.control")
# Connections served at once.  A command holds one while it runs (a chat, two),
# so this is far more than a person uses; without a cap, a local process could
# make the daemon hold thousands of tasks and file descriptors.
MAX_CONNECTIONS = 64
# An error reply is one line for a person, however much of a request it quotes.
MAX_ERROR_CHARS = 200
# Every numeric argument is a 64-bit SQLite integer (at most 19 digits).  A
# longer number is refused before Python converts it: its own limit (4,300
# digits) is far above, and its message speaks of interpreter settings.
MAX_DIGITS = 19
RECEIVE_SIZE = 65536

Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], Send], Awaitable[dict[str, Any] | None]]


class BadRequest(PigeonError):
    """A request not of the shape its command takes; nothing was done."""

    def __init__(self, why: str) -> None:
        super().__init__(f"bad request: {why}")


class _HungUp(Exception):
    """The client went away: there is no one left to answer."""


class _TooLarge(Exception):
    """A request line longer than MAX_REQUEST."""


def one_line(text: str) -> str:
    """``text`` as one line of printable characters, at most MAX_ERROR_CHARS."""
    head = text[: MAX_ERROR_CHARS * 4]
    line = " ".join("".join(c if c.isprintable() else " " for c in head).split())
    if len(line) > MAX_ERROR_CHARS or len(head) < len(text):
        line = line[: MAX_ERROR_CHARS - 3] + "..."
    return line


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise BadRequest(f"a number has more than {MAX_DIGITS} digits")
    return int(digits)


def _parse_constant(name: str) -> float:
    raise BadRequest(f"{name} is not a number JSON allows")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        # Parsers differ on which of two equal keys wins: refuse rather than guess.
        raise BadRequest("a key appears twice in one object")
    return value


def parse_request(line: bytes) -> dict[str, Any]:
    """A request line as a JSON object with a string ``cmd``, or BadRequest.
    Which arguments a command takes, and of what type, the handler checks."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("not UTF-8 text") from None
    try:
        value = json.loads(
            text, parse_int=_parse_int, parse_constant=_parse_constant, object_pairs_hook=_object
        )
    except json.JSONDecodeError as error:
        raise BadRequest(f"not JSON ({error.msg} at column {error.colno})") from None
    except RecursionError:
        # The parser recurses once per level of nesting and gives up at the
        # interpreter's recursion limit (about 1,000), so a line nested a
        # million deep costs no more to refuse than one nested a thousand deep.
        raise BadRequest("JSON nested too deeply (a request is one flat object)") from None
    if not isinstance(value, dict) or not isinstance(value.get("cmd"), str):
        raise BadRequest("a request is a JSON object with a string 'cmd'")
    return value


def _encode(obj: dict[str, Any]) -> bytes:
    # ASCII, and never NaN or Infinity: a line any JSON parser accepts.
    return json.dumps(obj, allow_nan=False).encode() + b"\n"


def _command(request: dict[str, Any]) -> str:
    """The request's command, quoted, when it is a short lowercase name, never
    other text a client sent: it goes into the log.  (The handler refuses an
    unknown command before doing anything, so only real ones fail inside.)"""
    cmd = request.get("cmd")
    return repr(cmd) if isinstance(cmd, str) and re.fullmatch(r"[a-z.]{1,32}", cmd) else "a request"


def _describe(error: BaseException) -> str:
    """An exception's type and where it was raised: enough to find a bug, and
    nothing of its message, which may quote what a client sent (message text)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(error).__name__
    return f"{type(error).__name__} at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}"


def _error_reply(request: dict[str, Any], error: Exception) -> dict[str, Any]:
    if isinstance(error, PigeonError):
        return {"ok": False, "error": one_line(str(error))}
    # A bug, or a failure below the handler (the database, say): the client gets
    # one line, the log gets the rest, and the daemon carries on.
    log.error("control request %s failed: %s", _command(request), _describe(error))
    return {
        "ok": False,
        "error": f"internal error: the daemon could not carry out {_command(request)}"
        " (its log says where)",
    }


async def serve(
    path: Path, handle: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    finally:
        os.umask(old_umask)
    path.chmod(0o600)
    # Room for as many waiting to be accepted as may be served: commands
    # started together (by a script, say) are not refused for want of it.
    sock.listen(MAX_CONNECTIONS)
    listener = trio.SocketListener(sock)
    task_status.started()
    served = 0
    refusing = False

    async def client(stream: trio.SocketStream) -> None:
        nonlocal served, refusing
        if served >= MAX_CONNECTIONS:
            if not refusing:  # one line per burst, not one per connection
                log.warning("control connections refused: the limit is %d", MAX_CONNECTIONS)
                refusing = True
            await _refuse(stream)
            return
        served += 1
        try:
            await _client(stream, handle)
        finally:
            served -= 1
            refusing = False

    try:
        await trio.serve_listeners(client, [listener])
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        path.unlink(missing_ok=True)


async def _refuse(stream: trio.SocketStream) -> None:
    """Say why, then close: the client reads this as the reply to its first request."""
    reply = {
        "ok": False,
        "error": f"too many connections to the daemon (the limit is {MAX_CONNECTIONS}):"
        " close some pigeon commands and try again",
    }
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(_encode(reply))
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _client(stream: trio.SocketStream, handle: Handler) -> None:
    """Serve one connection until the client hangs up.  This is each client's
    error boundary: trio ends serve_listeners, and with it the daemon, when a
    connection's task raises, so nothing a request does (nor a bug in its
    handler) may escape from here."""
    buffer = bytearray()
    junk_logged = False

    async def send(obj: dict[str, Any]) -> None:
        data = _encode(obj)
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _HungUp from None

    try:
        while True:
            try:
                line = await _receive_line(stream, buffer)
            except _TooLarge:
                await send({"ok": False, "error": f"request larger than {MAX_REQUEST:,} bytes"})
                return
            if line is None:
                return
            try:
                request = parse_request(line)
            except BadRequest as error:
                if not junk_logged:  # once: a client may pipeline thousands
                    log.warning("control client sent junk: %s", error)
                    junk_logged = True
                await send({"ok": False, "error": one_line(str(error))})
                continue
            reply = await _answer(stream, handle, request, send)
            if reply is not None:
                await send(reply)
    except (_HungUp, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    except Exception as error:
        log.error("control connection failed: %s", _describe(error))
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _receive_line(stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
    """The next line, without its newline, from ``buffer`` topped up from the
    stream; None when the client has hung up."""
    searched = 0
    while True:
        end = buffer.find(b"\n", searched)
        if end >= 0:
            if end > MAX_REQUEST:
                raise _TooLarge
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if len(buffer) > MAX_REQUEST:
            raise _TooLarge
        searched = len(buffer)
        chunk = await stream.receive_some(RECEIVE_SIZE)
        if not chunk:
            return None
        buffer += chunk


async def _answer(
    stream: trio.SocketStream, handle: Handler, request: dict[str, Any], send: Send
) -> dict[str, Any] | None:
    """The handler's reply to one request, or an error reply for whatever it
    raised; raises _HungUp when the client has gone.

    A handler that sends before it returns (``follow``) has made the
    connection a stream: from then on what the client sends is ignored, and
    the client closing the connection (or its sending side) ends the handler.
    Otherwise a follower that went away would be noticed only when there is
    something to send it, holding its task and a connection until then."""
    replies: list[dict[str, Any] | None] = []
    failures: list[Exception] = []
    hung_up = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal hung_up
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while await stream.receive_some(RECEIVE_SIZE):
                    pass
            hung_up = True
            nursery.cancel_scope.cancel()

        watching = False

        async def send_and_watch(obj: dict[str, Any]) -> None:
            nonlocal watching
            await send(obj)
            if not watching:
                watching = True
                nursery.start_soon(watch)

        async def run() -> None:
            # Everything is caught here, in the task, so that nothing leaves
            # the nursery wrapped in an exception group.
            try:
                replies.append(await handle(request, send_and_watch))
            except Exception as error:
                failures.append(error)
            finally:
                nursery.cancel_scope.cancel()

        nursery.start_soon(run)
    if hung_up or any(isinstance(error, _HungUp) for error in failures):
        raise _HungUp
    if failures:
        return _error_reply(request, failures[0])
    return replies[0] if replies else None
