"""Dialling a peer at every address it has, in place of py-libp2p's.

py-libp2p 0.8.1's ``Swarm.dial_peer`` dials at most one address per kind of
transport: of a peer's TCP addresses it tries the first and no other.  A
peer that tells two (a server's public address and its second interface,
a home machine's LAN address and its router's) is unreachable whenever the
first one is, which in the namespace tests was a relay's second interface:
no route from the homes, so no one behind NAT could reserve a slot.  It
then retries that address three times with no connect timeout (a dropped
SYN takes the kernel about two minutes to give up on), and a peer whose
dial failed is refused every dial for the next 60 s, so a contact that
comes back online soon after could not be reached.

``Dialer.dial_peer`` tries every address the peer store holds, in its
order, a new one every ``STAGGER`` seconds or as soon as the last failed
(Happy Eyeballs, RFC 8305), each with ``ATTEMPT_TIMEOUT`` for the whole
of the connect, Noise and the muxer; the first connection made wins and
the others are cancelled.  A peer none of whose addresses answered is not
dialled again at those same addresses for ``FAILED_FOR`` seconds (DHT walks
ask for the same dead peers again and again), but an address not tried
yet is dialled at once.  Relayed addresses are dialled by ``Relays``
through ``host.connect``.
"""

from __future__ import annotations

import logging

import multiaddr
import trio
from libp2p.abc import INetConn
from libp2p.network.exceptions import SwarmException
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

log = logging.getLogger("pigeon.dialing")

STAGGER = 0.25  # seconds before the next address is tried alongside (RFC 8305's 250 ms)
ATTEMPT_TIMEOUT = 10.0  # seconds for one address: TCP connect, Noise, muxer
FAILED_FOR = 10.0  # seconds a peer none of whose addresses answered is not dialled again
MOST_ADDRESSES = 8  # addresses tried per dial (a hostile peer may tell hundreds)


def is_relayed(address: object) -> bool:
    """Whether a multiaddr (or its text) goes through a circuit relay."""
    return "/p2p-circuit" in str(address)


class Dialer:
    def __init__(self, swarm: Swarm) -> None:
        self.swarm = swarm
        self._ongoing: dict[ID, trio.Event] = {}
        self._failed: dict[ID, tuple[float, frozenset[str]]] = {}  # peer -> (until, addresses)

    def install(self) -> None:
        self.swarm.dial_peer = self.dial_peer  # type: ignore[method-assign,assignment]

    def _live(self, peer: ID) -> list[INetConn]:
        return [c for c in self.swarm.get_connections(peer) if not c.is_closed]

    async def dial_peer(self, peer: ID) -> list[INetConn]:
        live = self._live(peer)
        while not live and (ongoing := self._ongoing.get(peer)) is not None:
            await ongoing.wait()  # one dial per peer at a time: wait for it, then look again
            live = self._live(peer)
        if live:
            return live
        addresses = self.addresses(peer)
        if not addresses:
            raise SwarmException(f"no address to dial {peer} at")
        told = frozenset(map(str, addresses))
        now = trio.current_time()
        until, tried = self._failed.get(peer, (0.0, frozenset()))
        if now < until and told <= tried:
            raise SwarmException(f"{peer} answered at none of its addresses a moment ago")
        done = trio.Event()
        self._ongoing[peer] = done
        try:
            connection = await self._race(peer, addresses)
        except SwarmException:
            self._failed[peer] = (trio.current_time() + FAILED_FOR, told)
            raise
        finally:
            done.set()
            if self._ongoing.get(peer) is done:
                del self._ongoing[peer]
        self._failed.pop(peer, None)
        if len(self._failed) > 10_000:
            self._failed = {p: f for p, f in self._failed.items() if f[0] > now}
        return [connection]

    def addresses(self, peer: ID) -> list[multiaddr.Multiaddr]:
        """The peer's addresses we can dial directly, in the peer store's order."""
        try:
            known = self.swarm.peerstore.addrs(peer)
        except Exception:
            return []
        usable = []
        for address in known:
            if is_relayed(address):
                continue
            try:
                if self.swarm.transport_manager.transport_for_dialing(address) is None:
                    continue
            except Exception:
                continue
            if address not in usable:
                usable.append(address)
        return usable[:MOST_ADDRESSES]

    async def _race(self, peer: ID, addresses: list[multiaddr.Multiaddr]) -> INetConn:
        made: list[INetConn] = []
        errors: list[str] = []

        async def attempt(address: multiaddr.Multiaddr, failed: trio.Event) -> None:
            try:
                async with self.swarm._global_dial_limiter:
                    with trio.fail_after(ATTEMPT_TIMEOUT):
                        connection = await self.swarm._dial_addr_single_attempt(address, peer)
            except trio.TooSlowError:
                errors.append(f"{address}: no answer in {ATTEMPT_TIMEOUT:g} s")
                failed.set()
                return
            except Exception as error:
                cause = error.__cause__ or error
                errors.append(f"{address}: {cause}")
                failed.set()
                return
            made.append(connection)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            for address in addresses:
                failed = trio.Event()
                nursery.start_soon(attempt, address, failed)
                with trio.move_on_after(STAGGER):
                    await failed.wait()
        if not made:
            raise SwarmException(f"could not reach {peer}: {'; '.join(errors)}")
        # Two attempts may both have finished before the cancellation landed.
        for extra in made[1:]:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await extra.close()
        return made[0]
