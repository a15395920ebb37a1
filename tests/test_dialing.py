"""Dialling a peer at every address it tells (node/dialing.py), with real
py-libp2p hosts on 127.0.0.1: py-libp2p's own dial tries one TCP address of
a peer and no other, with no connect timeout."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from libp2p.abc import IHost
from libp2p.network.exceptions import SwarmException
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from pigeon.node import dialing
from pigeon.node.host import build_host, close_host

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


@asynccontextmanager
async def running() -> AsyncIterator[IHost]:
    host = build_host(os.urandom(32), [LOOPBACK])
    try:
        async with host.run(listen_addrs=[Multiaddr(LOOPBACK)]):
            yield host
    finally:
        await close_host(host)


@asynccontextmanager
async def silent_port() -> AsyncIterator[str]:
    """An address whose connections are accepted and never answered (a
    wedged peer; a dropped SYN behaves the same for the dialler)."""
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    held: list[trio.SocketStream] = []

    async def accept() -> None:
        while True:
            held.append(await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        yield f"/ip4/127.0.0.1/tcp/{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()
    for stream in held:
        await stream.aclose()
    await listener.aclose()


def closed_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}"


def test_a_peer_is_reached_at_its_second_address_when_the_first_never_answers() -> None:
    async def main() -> float:
        async with running() as a, running() as b, silent_port() as wedged:
            addresses = [Multiaddr(wedged), *b.get_addrs()]
            started = trio.current_time()
            with trio.fail_after(5):
                await a.connect(PeerInfo(b.get_id(), addresses))
            assert a.get_network().get_connections(b.get_id())
            return trio.current_time() - started

    assert trio.run(main) < 2  # the second address tried after 250 ms, not after a timeout


def test_a_dead_address_before_a_live_one_costs_nothing() -> None:
    async def main() -> None:
        async with running() as a, running() as b:
            with trio.fail_after(3):
                await a.connect(PeerInfo(b.get_id(), [Multiaddr(closed_port()), *b.get_addrs()]))
            assert a.get_network().get_connections(b.get_id())

    trio.run(main)


def test_an_address_that_never_answers_gives_up_after_the_attempt_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dialing, "ATTEMPT_TIMEOUT", 0.5)

    async def main() -> str:
        async with running() as a, running() as b, silent_port() as wedged:
            with trio.fail_after(5), pytest.raises(SwarmException) as failed:
                await a.connect(PeerInfo(b.get_id(), [Multiaddr(wedged)]))
            return str(failed.value)

    assert "no answer in 0.5 s" in trio.run(main)


def test_a_peer_that_failed_is_not_dialled_again_at_once_unless_it_has_a_new_address() -> None:
    async def main() -> None:
        async with running() as a, running() as b:
            dead = PeerInfo(b.get_id(), [Multiaddr(closed_port())])
            calls = 0
            swarm = a.get_network()
            single = swarm._dial_addr_single_attempt  # type: ignore[attr-defined]

            async def counted(*args: object) -> object:
                nonlocal calls
                calls += 1
                return await single(*args)

            swarm._dial_addr_single_attempt = counted  # type: ignore[attr-defined]
            # Three at once, as a DHT walk and a delivery may: one dial, and
            # each caller gets the same clear failure.
            failures: list[str] = []

            async def connect() -> None:
                try:
                    await a.connect(dead)
                except SwarmException as error:
                    failures.append(str(error))

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(connect)
            assert len(failures) == 3 and calls == 1
            assert "answered at none of its addresses a moment ago" in failures[-1]
            # A new address (the peer moved): dialled at once.
            with trio.fail_after(3):
                await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            assert calls >= 2 and a.get_network().get_connections(b.get_id())

    trio.run(main)


def test_a_peer_telling_many_addresses_costs_at_most_eight_attempts() -> None:
    """A hostile record may list hundreds of addresses: a dial tries the
    first eight and fails with one clear error."""

    async def main() -> tuple[int, str]:
        async with running() as a, running() as b:
            swarm = a.get_network()
            single = swarm._dial_addr_single_attempt  # type: ignore[attr-defined]
            calls = 0

            async def counted(*args: object) -> object:
                nonlocal calls
                calls += 1
                return await single(*args)

            swarm._dial_addr_single_attempt = counted  # type: ignore[attr-defined]
            many = [Multiaddr(closed_port()) for _ in range(40)]
            with trio.fail_after(10), pytest.raises(SwarmException) as failed:
                await a.connect(PeerInfo(b.get_id(), many))
            return calls, str(failed.value)

    calls, error = trio.run(main)
    assert calls == dialing.MOST_ADDRESSES == 8
    assert error.startswith("could not reach ")
