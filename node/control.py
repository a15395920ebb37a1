"""The control socket: how ``pigeon`` commands talk to the running daemon.

A Unix socket in the node's home, mode 0600.  One JSON object per line each
way: a request ``{"cmd": ..., ...}`` gets ``{"ok": true, ...}`` or
``{"ok": false, "error": "one line"}``.  ``follow`` keeps the connection open
and streams ``{"event": "message", ...}`` lines.  See docs/CONTROL.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from pigeon.protocol import PigeonError

log = logging.getLogger("pigeon.control")
SOCKET_NAME = "control.sock"
# Room for the longest text (MAX_TEXT_BYTES) however JSON escapes it: at worst
# six characters (a \uXXXX escape) for each byte.
MAX_REQUEST = 1024 * 1024

Handler = Callable[
    [dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[dict[str, Any] | None]
]


class DaemonNotRunning(PigeonError):
    pass


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
    sock.listen(16)
    listener = trio.SocketListener(sock)
    task_status.started()
    try:
        await trio.serve_listeners(lambda stream: _client(stream, handle), [listener])
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        path.unlink(missing_ok=True)


async def _client(stream: trio.SocketStream, handle: Handler) -> None:
    buffer = b""

    async def send(obj: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(obj).encode() + b"\n")

    try:
        while True:
            while b"\n" not in buffer:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buffer += chunk
                if len(buffer) > MAX_REQUEST:
                    await send({"ok": False, "error": f"request larger than {MAX_REQUEST:,} bytes"})
                    return
            line, buffer = buffer.split(b"\n", 1)
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("a request is a JSON object with a 'cmd'")
            except ValueError as error:
                log.warning("control client sent junk: %s", str(error)[:80])
                await send({"ok": False, "error": f"bad request: {str(error)[:80]}"})
                continue
            try:
                reply = await handle(request, send)
            except PigeonError as error:
                reply = {"ok": False, "error": str(error)}
            except (KeyError, TypeError, ValueError) as error:
                reply = {"ok": False, "error": f"bad request: {error}"}
            if reply is not None:
                await send(reply)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        with trio.CancelScope(shield=True):
            await stream.aclose()


class Client:
    """A blocking client, for the command line.  Every way the conversation
    with the daemon can fail is a PigeonError with one line to show."""

    def __init__(self, home: Path, timeout: float | None = 30.0) -> None:
        self.path = home / SOCKET_NAME
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self.sock.close()
            raise DaemonNotRunning(
                f"the Pigeon daemon is not running for {home} (start it: pigeon daemon)"
            ) from None
        except OSError as error:
            self.sock.close()
            raise PigeonError(f"cannot reach the daemon's control socket: {error}") from None
        self.file = self.sock.makefile("rwb")

    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        line = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        if len(line) > MAX_REQUEST:
            raise PigeonError(f"request too large for the daemon ({len(line):,} bytes)")
        try:
            self.file.write(line)
            self.file.flush()
        except OSError as error:
            raise PigeonError(f"lost the connection to the daemon: {error}") from None
        reply = self._read()
        if not reply.get("ok", False):
            raise PigeonError(str(reply.get("error", "the daemon refused the request")))
        return reply

    def _read(self) -> dict[str, Any]:
        try:
            line = self.file.readline()
        except TimeoutError:
            raise PigeonError("the daemon did not answer in time") from None
        except OSError as error:
            raise PigeonError(f"lost the connection to the daemon: {error}") from None
        if not line:
            raise PigeonError("the daemon closed the connection")
        try:
            value = json.loads(line)
        except ValueError:
            raise PigeonError("the daemon sent something that is not JSON") from None
        if not isinstance(value, dict):
            raise PigeonError("the daemon sent something unexpected")
        return value

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self._read()

    def close(self) -> None:
        # the daemon may have gone away first: nothing is lost by not flushing
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()
