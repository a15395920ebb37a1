"""Circuit relay v2: relaying for others (``--relay``), reserving a slot at
relays while we are behind NAT, dialling a peer through its relay, and
DCUtR hole punching over relayed connections (docs/NETWORK.md).

py-libp2p 0.8.1 has the protocols but not the glue, and some of what it
has does not work as it says:

- ``host.connect`` refuses a peer whose only addresses are relayed ones; a
  relayed address must be dialled with the relay transport's own ``dial``.
  ``install_relay_dialing`` puts that behind ``host.connect``, so every
  caller (delivery, record requests, presence, mailboxes) reaches a peer
  behind NAT without knowing how.
- A reservation's relayed address is published by no one: identify cuts
  an address at its first ``/p2p`` and appends our own ID, so a relayed
  address given to it comes out as the relay's address under our ID.  Ours
  go into the directory record and the contact code, not identify.
- The relay enforces only its ``RelayLimits`` (circuit time and bytes, and
  reservations and circuits in all); the per-address and bandwidth limits
  of ``HopConfig`` are never read.  Ours are below.
- Its reservation refresher never notices a relay that went away; here a
  reservation is renewed on a timer and a relay we lost the connection to
  is replaced.

DCUtR runs on every node that is not for this machine alone: both ends of a
relayed connection try to punch a direct one (about 2 s through two
port-preserving NATs), and streams then go over the direct connection.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL
from libp2p.relay.circuit_v2.protocol import CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

from .dialing import is_relayed
from .reach import BEHIND_NAT, Reachability
from .routing import find_providers, known_serving

log = logging.getLogger("pigeon.relay")

# Relays announce themselves as providers of this DHT key, as mailboxes do.
RELAY_KEY = "1220" + hashlib.sha256(b"pigeon/relays/v1").hexdigest()
PROVIDE_EVERY = 30 * 60.0

# What a relay gives (--relay).  A relayed connection carries messages,
# receipts, presence and records, never file data (files go over WebRTC):
# a circuit lasts at most CIRCUIT_SECONDS and carries at most CIRCUIT_BYTES,
# after which it is closed and dialled again when needed.
CIRCUIT_SECONDS = 10 * 60
CIRCUIT_BYTES = 1 << 20
CIRCUITS_PER_RESERVATION = 16  # relayed connections to one reserving peer at once
RESERVATIONS = 128  # peers holding a slot at once

RELAYS_WANTED = 2  # relays we hold a slot at while behind NAT
RENEW_EVERY = 10 * 60.0  # a reservation is renewed this often (py-libp2p's relay keeps one 1 h)
CHECK_EVERY = 30.0  # seconds between looks at our reservations
LOST_PAUSE = 60.0  # seconds a relay we lost is not asked for a slot (others are)
FAILED_PAUSE = 5 * 60.0  # seconds a relay that refused us or did not answer is not asked
SEARCH_EVERY = 5 * 60.0  # seconds between searches for more relays while we hold one
SLOW_RELAY = 3.0  # seconds before one more relay is asked alongside a slow one
DIRECT_HEAD_START = 2.0  # seconds a direct dial has before the relay is tried too
RELAYED_DIAL_TIMEOUT = 5.0  # seconds for one dial through a relay


def relayed_address(relay_address: str, relay: ID, us: ID) -> str:
    return f"{relay_address}/p2p/{relay}/p2p-circuit/p2p/{us}"


class Relays:
    """The relay protocols of one node, its reservations while it is behind
    NAT, and relayed dialling (``install_dialing``)."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        reach: Reachability,
        republish: Callable[[], None],
        *,
        serve: bool,
    ) -> None:
        self.host = host
        self.dht = dht
        self.reach = reach
        self.republish = republish
        self.serve = serve
        limits = RelayLimits(
            duration=CIRCUIT_SECONDS,
            data=CIRCUIT_BYTES,
            max_circuit_conns=CIRCUITS_PER_RESERVATION,
            max_reservations=RESERVATIONS,
        )
        self.protocol = CircuitV2Protocol(host, limits=limits, allow_hop=serve)
        # STOP only: a dial through a relay must not reserve a slot for us.
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP))
        self.dcutr = DCUtRProtocol(host)
        self._held: dict[ID, tuple[str, float]] = {}  # relay -> (its address, renewed at)
        self._lost = trio.Event()  # a relay we hold a slot at went away
        self._failed: dict[ID, float] = {}  # relay -> not asked again before then
        self._searched = -SEARCH_EVERY  # when the DHT was last asked for relays
        self._told: set[ID] = set()  # the relays our record names

    def addresses(self) -> list[str]:
        """Our relayed addresses, one per relay we hold a slot at."""
        us = self.host.get_id()
        return [relayed_address(address, relay, us) for relay, (address, _) in self._held.items()]

    async def run(self) -> None:
        async with (
            background_trio_service(self.protocol),
            background_trio_service(self.dcutr),
            trio.open_nursery() as nursery,
        ):
            if self.serve:
                nursery.start_soon(self._announce)
            nursery.start_soon(self._keep_slots)

    async def _announce(self) -> None:
        while True:
            try:
                await self.dht.provide(RELAY_KEY)
            except Exception as error:
                log.warning("advertising the relay failed: %s", error)
            await trio.sleep(PROVIDE_EVERY if self.dht.get_routing_table_size() else 10.0)

    def disconnected(self, peer: ID) -> None:
        """A connection closed: when it was to a relay we hold a slot at,
        the slot went with it, and the upkeep replaces it now."""
        if peer in self._held:
            self._lost.set()

    async def _keep_slots(self) -> None:
        while True:
            try:
                await self._tend()
            except Exception as error:
                log.warning("relay upkeep failed: %s", error)
            self._tell_if_changed()
            with trio.move_on_after(CHECK_EVERY):
                async with trio.open_nursery() as nursery:
                    for event in (self.reach.changed, self._lost):
                        nursery.start_soon(_wait_then_cancel, event, nursery.cancel_scope)
            self._lost = trio.Event()

    async def _tend(self) -> None:
        if self.reach.state != BEHIND_NAT:
            self._held.clear()  # reachable directly (or not known yet): no relay needed
            return
        network = self.host.get_network()
        now = trio.current_time()
        # A relay forgets a slot when the connection that reserved it closes.
        gone = {relay for relay in self._held if not network.get_connections(relay)}
        for relay in gone:
            del self._held[relay]
            self._failed[relay] = now + LOST_PAUSE  # it may come back, but others are asked first
        self._failed = {relay: until for relay, until in self._failed.items() if until > now}
        due = [
            PeerInfo(relay, [multiaddr.Multiaddr(address)])
            for relay, (address, renewed) in self._held.items()
            if now - renewed >= RENEW_EVERY
        ]
        async with trio.open_nursery() as nursery:
            for info in due:
                nursery.start_soon(self._renew, info)
        if len(self._held) >= RELAYS_WANTED:
            return

        # Relays we know of already (identify said what they serve, and the
        # peer store keeps it), connected ones first; then those the DHT names.
        # Not those that failed us lately, nor one we just lost.
        def askable(info: PeerInfo) -> bool:
            peer = info.peer_id
            return (
                peer not in self._held and peer not in self._failed and peer != self.host.get_id()
            )

        known = known_serving(self.host, str(HOP_PROTOCOL))
        await self._reserve_enough(list(filter(askable, known)))
        self._tell_if_changed()  # before a search, which may take a while
        # A search for more is a DHT walk: done at once when we hold no
        # slot, and not more often than SEARCH_EVERY while we hold one.
        if not self._held or (
            len(self._held) < RELAYS_WANTED and now - self._searched >= SEARCH_EVERY
        ):
            self._searched = now
            found = await find_providers(self.dht, bytes.fromhex(RELAY_KEY), RELAYS_WANTED + 2)
            await self._reserve_enough(list(filter(askable, found)))

    def _tell_if_changed(self) -> None:
        if set(self._held) != self._told:
            self._told = set(self._held)
            log.info("relayed addresses: %s", self.addresses() or "none")
            self.republish()

    async def _reserve_enough(self, candidates: list[PeerInfo]) -> None:
        """Ask candidates in turn until we hold RELAYS_WANTED slots: as many
        at once as slots are missing, and one more whenever one fails or
        has been slow for SLOW_RELAY seconds."""
        finished = trio.Event()
        asking = 0

        async def ask(info: PeerInfo) -> None:
            nonlocal asking, finished
            try:
                await self._reserve(info)
            finally:
                asking -= 1
                finished.set()
                finished = trio.Event()

        async with trio.open_nursery() as nursery:
            for info in candidates:
                if len(self._held) >= RELAYS_WANTED:
                    break
                asking += 1
                nursery.start_soon(ask, info)
                with trio.move_on_after(SLOW_RELAY):  # then one more alongside
                    while asking and len(self._held) + asking >= RELAYS_WANTED:
                        await finished.wait()

    async def _renew(self, info: PeerInfo) -> None:
        if not await self._reserve(info):
            self._held.pop(info.peer_id, None)

    async def _reserve(self, info: PeerInfo) -> bool:
        direct = [a for a in info.addrs if not is_relayed(a)]
        if not direct:
            return False
        try:
            with trio.fail_after(10):
                await self.host.connect(PeerInfo(info.peer_id, direct))
                stream = await self.host.new_stream(info.peer_id, [HOP_PROTOCOL])
                try:
                    reserved = await self.transport._make_reservation(stream, info.peer_id)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await stream.close()
        except Exception as error:
            log.info("reserving a slot at relay %s failed: %s", info.peer_id, error or "timed out")
            self._failed[info.peer_id] = trio.current_time() + FAILED_PAUSE
            return False
        if not reserved:
            log.info("relay %s refused us a slot", info.peer_id)
            self._failed[info.peer_id] = trio.current_time() + FAILED_PAUSE
            return False
        self._held[info.peer_id] = (self._address_of(info.peer_id, direct), trio.current_time())
        return True

    def _address_of(self, relay: ID, known: list[multiaddr.Multiaddr]) -> str:
        """The relay's address others should dial it at: the one our own
        connection to it reached (it surely works), else the first known."""
        for conn in self.host.get_network().get_connections(relay):
            for address in conn.get_transport_addresses():
                if not is_relayed(address) and "/tcp/" in str(address):
                    return str(address).split("/p2p/")[0]
        return str(known[0]).split("/p2p/")[0]

    def install_dialing(self) -> None:
        """``host.connect`` that also reaches peers through their relays: a
        direct dial first, the relayed addresses too once it failed or has
        had DIRECT_HEAD_START seconds; the first connection made wins."""
        host = self.host
        direct_connect = host.connect

        async def connect(info: PeerInfo) -> None:
            # A relayed address may come without its last /p2p (py-libp2p's
            # PeerInfo parsing takes it off as the peer's ID): put it back.
            relayed = [
                a
                if str(a).endswith(f"/p2p/{info.peer_id}")
                else a.encapsulate(f"/p2p/{info.peer_id}")
                for a in info.addrs
                if is_relayed(a)
            ]
            if not relayed:
                await direct_connect(info)
            elif not host.get_network().get_connections(info.peer_id):
                await self._connect_either(info, relayed, direct_connect)

        host.connect = connect  # type: ignore[method-assign,assignment]

    async def _connect_either(
        self, info: PeerInfo, relayed: list[multiaddr.Multiaddr], direct_connect: Any
    ) -> None:
        direct = [a for a in info.addrs if not is_relayed(a)]
        errors: list[str] = []
        connected = False
        try_relay = trio.Event()

        async def dial_direct(scope: trio.CancelScope) -> None:
            nonlocal connected
            try:
                await direct_connect(PeerInfo(info.peer_id, direct))
            except Exception as error:
                errors.append(f"direct: {error}")
                try_relay.set()
                return
            connected = True
            scope.cancel()

        async def dial_relayed(scope: trio.CancelScope) -> None:
            nonlocal connected
            with trio.move_on_after(DIRECT_HEAD_START):
                await try_relay.wait()
            for address in relayed:
                try:
                    with trio.fail_after(RELAYED_DIAL_TIMEOUT):
                        await self.transport.dial(address)
                except Exception as error:
                    errors.append(f"{address}: {error}")
                    continue
                connected = True
                scope.cancel()
                return

        async with trio.open_nursery() as nursery:
            if direct:
                nursery.start_soon(dial_direct, nursery.cancel_scope)
            else:
                try_relay.set()
            nursery.start_soon(dial_relayed, nursery.cancel_scope)
        if not connected:
            raise SwarmException(f"could not reach {info.peer_id}: {'; '.join(errors)}")


async def _wait_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
