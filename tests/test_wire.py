"""The TCP under every connection (node/host.py): what it writes is already
encrypted, so a write is never cut short by a cancelled caller."""

from __future__ import annotations

import pytest
import trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream

from pigeon.node import host
from pigeon.node.host import Wire

BIG = 8 * 1024 * 1024  # far more than the socket buffers hold


async def _pair() -> tuple[TrioTCPStream, trio.SocketStream, trio.SocketListener]:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await listener.accept()
    return TrioTCPStream(client), server, listener


async def _read_all(stream: trio.SocketStream, into: bytearray) -> None:
    while chunk := await stream.receive_some(65536):
        into += chunk
        await trio.sleep(0.001)  # a slow reader: the writer waits on it


def test_a_cancelled_write_still_sends_every_byte() -> None:
    async def main() -> int:
        raw, server, listener = await _pair()
        wire = Wire()
        metered = wire.track(raw)
        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_all, server, received)
            with trio.move_on_after(0.05) as scope:
                await metered.write(b"x" * BIG)
            assert scope.cancel_called  # the caller's deadline passed mid-write
            await metered.close()
        await server.aclose()
        await listener.aclose()
        assert wire.sent == BIG
        return len(received)

    assert trio.run(main) == BIG


def test_a_peer_that_takes_nothing_loses_its_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(host, "WRITE_TIMEOUT", 0.5)

    async def main() -> None:
        raw, server, listener = await _pair()
        metered = Wire().track(raw)
        with pytest.raises(ConnectionClosedError, match="took nothing"):
            await metered.write(b"x" * BIG)
        # closed: the peer reads what was sent, then the end
        with trio.fail_after(5):
            while await server.receive_some(65536):
                pass
        await server.aclose()
        await listener.aclose()

    trio.run(main)
