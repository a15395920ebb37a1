"""The blocking client of the control socket, for ``pigeon`` commands.

Kept apart from the daemon's side (control.py, on trio) so that a command
that only asks the running daemon something starts without importing trio,
libp2p or the rest of the node: only the standard library and the protocol's
errors.  The wire format is in docs/CONTROL.md.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pigeon.protocol import PigeonError

SOCKET_NAME = "control.sock"
# Room for the longest text (MAX_TEXT_BYTES) however JSON escapes it: at worst
# six characters (a \uXXXX escape) for each byte.
MAX_REQUEST = 1024 * 1024


class DaemonNotRunning(PigeonError):
    pass


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
            # The daemon may have said why before it closed (too many
            # connections, say): that beats "broken pipe".
            raise PigeonError(
                self._last_words() or f"lost the connection to the daemon: {error}"
            ) from None
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

    def _last_words(self) -> str | None:
        """The error the daemon sent before closing the connection, if it did."""
        try:
            reply = self._read()
        except PigeonError:
            return None
        error = reply.get("error")
        return str(error) if reply.get("ok") is False and error else None

    def events(self) -> Iterator[dict[str, Any]]:
        while True:
            yield self._read()

    def close(self) -> None:
        # the daemon may have gone away first: nothing is lost by not flushing
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()
