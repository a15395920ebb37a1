"""Whether others can connect to us (node/reach.py): real py-libp2p hosts on
127.0.0.1 asking each other for dial-backs.  Behind a real NAT, in network
namespaces: tests/test_nat.py."""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import AsyncIterator

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.peer.peerinfo import PeerInfo

from pigeon.node.framing import frame
from pigeon.node.host import build_host, close_host
from pigeon.node.reach import (
    BEHIND_NAT,
    DIALBACK_PROTOCOL,
    PUBLIC,
    UNKNOWN,
    DialbackService,
    Reachability,
)
from pigeon.protocol.frames import DialbackRequest

LOOPBACK = ipaddress.ip_address("127.0.0.1")
ANYWHERE = multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")


@contextlib.asynccontextmanager
async def running_host() -> AsyncIterator[IHost]:
    host = build_host(os.urandom(32), [str(ANYWHERE)])
    async with host.run(listen_addrs=[ANYWHERE]):
        try:
            yield host
        finally:
            await close_host(host)


def port_of(host: IHost) -> int:
    return int(str(host.get_transport_addrs()[0]).split("/")[4])


async def served_and_connected(asker: IHost, server: IHost) -> DialbackService:
    service = DialbackService(server)
    server.set_stream_handler(DIALBACK_PROTOCOL, service.handle)
    await asker.connect(PeerInfo(server.get_id(), server.get_transport_addrs()))
    return service


def test_reached_at_an_address_not_our_own_is_told_once_two_peers_agree() -> None:
    """A router forwarding our port: peers reach us at its address, which
    is told to others with our port, but only once two peers agree on it
    (one lying peer must not make our contacts dial an address it chose)."""

    async def main() -> None:
        async with running_host() as one, running_host() as two, running_host() as asker:
            await served_and_connected(asker, one)
            reach = Reachability(asker, lambda: port_of(asker), lambda: False, lambda: [])
            await reach.check()
            assert reach.state == PUBLIC
            assert reach.public == []
            await served_and_connected(asker, two)
            service = DialbackService(one)  # a fresh server: it may dial again
            one.set_stream_handler(DIALBACK_PROTOCOL, service.handle)
            await reach.check()
            assert reach.state == PUBLIC
            assert reach.public == [f"/ip4/127.0.0.1/tcp/{port_of(asker)}"]

    trio.run(main)


def test_something_else_answering_on_our_port_is_not_us() -> None:
    """The dial-back counts only a connection whose handshake proves the
    asker's own peer ID: a router's page, or another program, on that port
    leaves us unreachable, and the reason says what peers saw."""

    async def main() -> None:
        async with running_host() as server, running_host() as asker:
            await served_and_connected(asker, server)
            impostor = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
            port = impostor.socket.getsockname()[1]

            async def accept_and_hang_up() -> None:
                while True:
                    stream = await impostor.accept()
                    await stream.send_all(b"HTTP/1.0 200 OK\r\n\r\n")
                    await stream.aclose()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_and_hang_up)
                ours = Reachability(asker, lambda: port, lambda: False, lambda: [LOOPBACK])
                await ours.check()
                assert ours.state == BEHIND_NAT
                assert "this machine's own address" in ours.reason
                assert "a firewall" in ours.reason
                nursery.cancel_scope.cancel()
            await impostor.aclose()

    trio.run(main)


def test_nobody_listening_on_the_port_from_elsewhere_is_behind_nat() -> None:
    async def main() -> None:
        async with running_host() as server, running_host() as asker:
            await served_and_connected(asker, server)
            with trio.socket.socket() as closed:  # a port nobody listens on
                await closed.bind(("127.0.0.1", 0))
                port = closed.getsockname()[1]
                reach = Reachability(asker, lambda: port, lambda: False, lambda: [])
                await reach.check()
            assert reach.state == BEHIND_NAT
            assert "not an address of this machine" in reach.reason
            assert reach.public == []

    trio.run(main)


def test_a_peer_that_connects_back_and_finds_us_makes_us_public_once_a_minute() -> None:
    """Each dial-back is a connection and a handshake: one per asker a minute
    (and a bounded number in all), so a peer cannot make us dial for it."""

    async def main() -> None:
        async with running_host() as server, running_host() as asker:
            await served_and_connected(asker, server)
            reach = Reachability(asker, lambda: port_of(asker), lambda: False, lambda: [LOOPBACK])
            await reach.check()
            assert reach.state == PUBLIC
            assert f"connected back to 127.0.0.1 port {port_of(asker)}" in reach.reason
            assert reach.public == []  # an address of our own: nothing more to tell
            await reach.check()  # asked again at once: answered, but not dialled
            assert reach.state == BEHIND_NAT

    trio.run(main)


def test_a_node_on_loopback_only_asks_no_one() -> None:
    async def main() -> None:
        async with running_host() as server, running_host() as asker:
            service = await served_and_connected(asker, server)
            reach = Reachability(asker, lambda: port_of(asker), lambda: True)
            await reach.run()  # returns at once: nothing to learn
            assert reach.state == UNKNOWN
            assert "loopback only" in reach.reason
            assert not service._asked

    trio.run(main)


def test_a_request_over_a_relayed_connection_is_refused_without_a_dial() -> None:
    """Over a relay, the address a request comes from is the relay's: the
    server must not dial it back (that would tell the asker nothing, and
    dial a port of the asker's choosing at the relay).  A stand-in stream
    whose connection is relayed, handled by the real service."""

    class Connection:
        def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
            return [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4001/p2p-circuit")]

    class Stream:
        swarm_conn = Connection()
        reset_called = False
        unread = bytearray(frame(DialbackRequest(4001).encode()))  # a well-formed request

        class muxed_conn:
            peer_id = "asker"

        def get_remote_address(self) -> tuple[str, int]:
            return ("127.0.0.1", 4001)

        async def reset(self) -> None:
            self.reset_called = True

        async def read(self, n: int | None = None) -> bytes:
            taken = bytes(self.unread[: n or len(self.unread)])
            del self.unread[: len(taken)]
            return taken

        async def write(self, data: bytes) -> None:
            return None

        async def close(self) -> None:
            return None

    async def main() -> bool:
        async with running_host() as server:
            service = DialbackService(server)
            stream = Stream()
            await service.handle(stream)  # type: ignore[arg-type]
            assert not service._asked  # no dial-back counted, none made
            return stream.reset_called

    assert trio.run(main)
