"""The TCP under every connection (node/host.py): what it writes is already
encrypted, so a write is never cut short by a cancelled caller; and yamux
above it gives window back in halves, not a frame per read."""

from __future__ import annotations

import os
import struct
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.peer.peerinfo import PeerInfo
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from pigeon.node import host
from pigeon.node.host import Wire, build_host, close_host

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


ECHO = TProtocol("/pigeon-test/bytes/1.0.0")
LOOPBACK = Multiaddr("/ip4/127.0.0.1/tcp/0")


def test_reads_give_window_back_in_halves_not_a_frame_per_read() -> None:
    """py-libp2p sent a WINDOW_UPDATE for every read that returned bytes (and
    multistream-select reads a byte at a time); ours go out once half the
    window is used, and a stream still carries far more than one window."""
    updates: list[int] = []
    write_frame = Yamux._write_frame

    async def counting(self: Yamux, data: bytes) -> None:
        kind, flags = data[1], struct.unpack(">H", data[2:4])[0]
        if kind == 1 and flags == 0:  # a bare window update (not SYN, ACK or FIN)
            updates.append(struct.unpack(">I", data[8:12])[0])
        await write_frame(self, data)

    async def main() -> tuple[bytes, bytes]:
        a = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        b = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        received = bytearray()
        done = trio.Event()

        async def handler(stream: INetStream) -> None:
            for _ in range(300):  # small reads, as a protocol reading headers does
                received.extend(await stream.read(1))
            while len(received) < 300 + BIG // 8:
                received.extend(await stream.read(65536))
            done.set()

        b.set_stream_handler(ECHO, handler)
        with trio.fail_after(30):
            async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
                await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
                stream = await a.new_stream(b.get_id(), [ECHO])
                payload = os.urandom(300 + BIG // 8)
                await stream.write(payload)  # 1 MiB: four windows' worth
                await done.wait()
                await stream.close()
                await close_host(a)
                await close_host(b)
        return payload, bytes(received)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Yamux, "_write_frame", counting)
        sent, received = trio.run(main)
    assert received == sent
    # 1 MiB through 256 KiB windows: about one update per 128 KiB, not one
    # per read (300 single-byte reads alone would have been 300).
    assert 4 <= len(updates) <= 16, updates


def test_a_dial_from_a_source_address_leaves_from_the_port_it_was_given() -> None:
    """A dial from a source address leaves from an ephemeral port unless a
    port is given (a hole punch leaves from our listening port), never from
    the peer's port: that tied every dial to one four-tuple, so dialling a
    peer again while the last connection to it was in TIME_WAIT failed, and
    a hole punch left from a port the NAT had not mapped."""

    async def main() -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        peer_port = listeners[0].socket.getsockname()[1]
        target = Multiaddr(f"/ip4/127.0.0.1/tcp/{peer_port}")
        ours = trio.socket.socket()
        ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        ours.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        await ours.bind(("127.0.0.1", 0))
        ours.listen()
        our_port = ours.getsockname()[1]
        for _ in range(2):  # the second while the first is in TIME_WAIT
            stream = await host._connect_from(target, "127.0.0.1")
            assert stream.socket.getsockname()[1] not in (peer_port, our_port)
            await stream.aclose()
        stream = await host._connect_from(target, "127.0.0.1", our_port)
        assert stream.socket.getsockname()[1] == our_port
        await stream.aclose()
        ours.close()
        for listener in listeners:
            await listener.aclose()

    trio.run(main)


def test_closing_a_host_closes_every_socket_it_opened() -> None:
    """py-libp2p drops some connections without closing their socket (a
    second dial to a peer already connected, one closed by the peer while
    its first stream was being negotiated): the garbage collector found
    them later, in whichever test it ran."""
    opened: list[trio.socket.SocketType] = []
    track = Wire.track

    def tracking(wire: Wire, stream: ReadWriteCloser) -> ReadWriteCloser:
        if isinstance(stream, TrioTCPStream):
            opened.append(stream.stream.socket)
        return track(wire, stream)

    async def once() -> None:
        a, b = (build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
        try:
            async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
                await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
        finally:  # as the node does: the hosts stop running, then close
            await close_host(b)
            await close_host(a)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Wire, "track", tracking)
        for _ in range(30):  # without closing what py-libp2p left, about one in three leaks
            trio.run(once)
    assert len(opened) >= 60
    assert [sock for sock in opened if sock.fileno() != -1] == []


def test_a_notifee_that_raises_on_a_stream_event_harms_neither_the_stream_nor_the_others() -> None:
    class Counting:
        def __init__(self, fail: bool) -> None:
            self.fail = fail
            self.events: list[str] = []

        def __getattr__(self, event: str) -> Any:
            async def record(network: object, *args: object) -> None:
                self.events.append(event)
                if self.fail:
                    raise RuntimeError("a faulty notifee")

            return record

    async def main() -> tuple[list[str], list[str], bytes]:
        a, b = (build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))

        async def echo(stream: INetStream) -> None:
            await stream.write(await stream.read(5))
            await stream.close()

        b.set_stream_handler(ECHO, echo)
        faulty, healthy = Counting(fail=True), Counting(fail=False)
        async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            a.get_network().register_notifee(faulty)  # type: ignore[arg-type]
            a.get_network().register_notifee(healthy)  # type: ignore[arg-type]
            with trio.fail_after(10):
                stream = await a.new_stream(b.get_id(), [ECHO])
                await stream.write(b"hello")
                answer = await stream.read(5)
                await stream.close()
            await close_host(a)
            await close_host(b)
        return faulty.events, healthy.events, answer

    faulty, healthy, answer = trio.run(main)
    assert answer == b"hello"
    assert "opened_stream" in faulty and "opened_stream" in healthy


def test_an_idle_connection_sends_no_pings() -> None:
    """py-libp2p pinged over every connection every 30 s (the first after
    half a second) for a round trip nothing of ours reads."""
    frames: list[int] = []
    write_frame = Yamux._write_frame

    async def recording(self: Yamux, data: bytes) -> None:
        frames.append(struct.unpack(">BBHII", data[:12])[1])
        await write_frame(self, data)

    async def main() -> None:
        a, b = (build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))
        async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            await trio.sleep(1.5)
            await close_host(a)
            await close_host(b)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Yamux, "_write_frame", recording)
        trio.run(main)
    assert frames  # identify went both ways
    assert 2 not in frames  # yamux type 2: ping


class _Chunks(ReadWriteCloser):
    """A socket that gives what it was loaded with, one chunk per read."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = list(chunks)
        self.reads = 0
        self.arrived = trio.Event()

    async def read(self, n: int | None = None) -> bytes:
        self.reads += 1
        if not self.chunks:
            await self.arrived.wait()
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if n is not None and len(chunk) > n:  # as a socket does: the rest stays
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def get_remote_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 1)


def test_reads_are_served_from_what_the_socket_gave_in_order_and_nothing_twice() -> None:
    async def main() -> None:
        wire = Wire()
        socket = _Chunks(b"\x00\x05hello\x00\x03abc", b"tail")
        stream = wire.track(socket)
        assert await stream.read(2) == b"\x00\x05"
        assert await stream.read(5) == b"hello"
        assert await stream.read(0) == b""
        assert await stream.read(100) == b"\x00\x03abc"  # up to n: what is there
        assert socket.reads == 1  # one system call for three messages
        assert await stream.read(None) == b"tail"
        socket.arrived.set()
        assert await stream.read(4) == b""  # the end
        assert wire.received == len(b"\x00\x05hello\x00\x03abc" + b"tail")

    trio.run(main)


def test_two_readers_at_once_lose_no_bytes() -> None:
    async def main() -> list[bytes]:
        socket = _Chunks(b"abcdef")
        stream = Wire().track(socket)
        socket.chunks = []  # the first read waits for bytes
        got: list[bytes] = []

        async def reader(n: int) -> None:
            got.append(await stream.read(n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader, 2)
            await trio.testing.wait_all_tasks_blocked()
            socket.chunks = [b"abcdef", b"ghij"]
            nursery.start_soon(reader, 2)  # finds nothing buffered: reads the socket too
            await trio.testing.wait_all_tasks_blocked()
            socket.arrived.set()  # the first reader's bytes come after the second's
        while chunk := await stream.read(None):
            got.append(chunk)
        return got

    got = trio.run(main)
    assert sorted(b"".join(got)) == sorted(b"abcdefghij")
    assert len(b"".join(got)) == 10


def test_a_stream_handler_that_raises_leaves_the_connection_open_to_new_streams() -> None:
    """py-libp2p let a handler's error end the loop that accepts the
    connection's streams: the connection stayed, and took no stream again."""
    handled: list[str] = []

    async def main() -> bytes:
        a, b = (build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"]) for _ in range(2))

        async def read_to_the_end(stream: INetStream) -> None:
            handled.append("read")
            while True:
                await stream.read(100)  # at the end py-libp2p raises StreamEOF

        async def echo(stream: INetStream) -> None:
            await stream.write(await stream.read(5))
            await stream.close()

        b.set_stream_handler(ECHO, echo)
        b.set_stream_handler(RAISES, read_to_the_end)
        async with a.run(listen_addrs=[LOOPBACK]), b.run(listen_addrs=[LOOPBACK]):
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            with trio.fail_after(5):
                first = await a.new_stream(b.get_id(), [RAISES])
                await first.write(b"x")
                await first.close()  # b's handler reads on, and raises at the end
                await trio.sleep(0.2)
                second = await a.new_stream(b.get_id(), [ECHO])  # the same connection
                await second.write(b"hello")
                answer = await second.read(5)
            assert len(a.get_network().get_connections(b.get_id())) == 1
            await close_host(a)
            await close_host(b)
        return answer

    assert trio.run(main) == b"hello"
    assert handled == ["read"]


RAISES = TProtocol("/pigeon-test/raises/1.0.0")
