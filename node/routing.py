"""How the node keeps py-libp2p's Kademlia routing table, and what it does
not verify twice.  Nothing here changes what goes on the wire.

py-libp2p refreshes the routing table as soon as the DHT starts, and every
10 minutes after: a lookup of our own ID and then one for every bucket that
holds a peer, one after the other.  Each bucket's key is drawn from the
bucket's range and then hashed again before distances are measured, so it
lands at a random point of the key space, not in its bucket: in a network of
100 that is eight lookups of 20 to 40 requests each, at every start, and a
node that restarts pays it all again (and its neighbours, in answers).
``RoutingUpkeep`` keeps the lookup of our own ID (it is how our neighbours
learn of us and we of them) and, on each later refresh, adds one lookup of a
random key, which discovers as much as any one of the eight did.

Every DHT message carries its sender's signed peer record, and every answer
to FIND_NODE carries the records of up to 20 others: py-libp2p checks each
signature every time it sees one, though the same few hundred records come
back again and again.  ``remember_verified_envelopes`` keeps the digests of
envelopes whose signature checked out, so the same bytes are checked once.

``find_providers`` stands in for ``KadDHT.find_providers``, which answers
from its own copy of what it found before whenever it holds one (so a node
never learns of a provider that started after its first search), and
otherwise asks peers until it holds as many providers as it was asked for:
fewer exist in a small network of mailboxes, so it asked every peer it heard
of, a request per node of the network at every search.

``known_serving`` answers without a search: the peers identify told us
serve a protocol (a relay, a mailbox), connected ones first.  A node's
bootstrap peers are often such servers, and a search in a network that
grew since the server last advertised may not find it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.envelope import Envelope
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

log = logging.getLogger("pigeon.routing")

# Envelopes whose signature was found good, remembered by digest (32 bytes
# each, so about 200 KiB): a network's worth of peers several times over.
VERIFIED_ENVELOPES = 4096
# Peers closest to a key asked for its providers together.  A provider
# announces itself to the 20 closest, so those are all that are asked.
PROVIDERS_AT_ONCE = 5
PROVIDERS_TIMEOUT = 5.0  # seconds for one peer's answer
PROVIDERS_SEARCH = 20.0  # seconds for a whole search; what was found by then is kept
PROVIDERS_FALLBACK = 20  # peers of the routing table asked when the walk does not end


class RoutingUpkeep:
    """Stands in for ``KadDHT.refresh_routing_table`` (see the module's docstring)."""

    def __init__(self, dht: KadDHT, random: Callable[[int], bytes] = os.urandom) -> None:
        self.dht = dht
        self.random = random
        self.refreshes = 0

    def install(self) -> None:
        self.dht.refresh_routing_table = self.refresh  # type: ignore[method-assign]

    async def refresh(self) -> None:
        """Our own ID; after the first time, a random key too."""
        lookup = self.dht.peer_routing.find_closest_peers_network
        keys = [self.dht.local_peer_id.to_bytes()]
        if self.refreshes:
            keys.append(self.random(32))
        self.refreshes += 1
        for key in keys:
            try:
                await lookup(key)
            except Exception as error:  # a failed refresh is retried at the next
                log.debug("refreshing the routing table failed: %s", error)


def servers_only(dht: KadDHT) -> None:
    """Only peers that serve the DHT enter our routing table.

    py-libp2p adds every peer that opens a DHT stream to us, on the grounds
    that it "must" be a server: a client asks too.  A node behind NAT is a
    client (node.py), and once in a server's table it was handed out to
    every lookup, whose walks then stalled dialling an address behind a NAT
    (15 s of a mailbox search in a three-node test).  Identify says what a
    peer serves; a peer not yet identified is added at a later request."""
    add = dht.add_peer
    peerstore = dht.host.get_peerstore()

    async def add_peer(peer_id: ID, *, skip_server_mode_check: bool = False) -> bool:
        try:
            protocols = peerstore.get_protocols(peer_id) or []
        except Exception:  # not in the peerstore yet
            return False
        if str(PROTOCOL_ID) not in protocols:
            return False
        return await add(peer_id, skip_server_mode_check=True)

    dht.add_peer = add_peer  # type: ignore[method-assign]


_verified: OrderedDict[bytes, None] = OrderedDict()


def _digest(envelope: Envelope, domain: str) -> bytes:
    h = hashlib.sha256()
    for part in (
        domain.encode(),
        envelope.public_key.serialize(),
        envelope.payload_type,
        envelope.raw_payload,
        envelope.signature,
    ):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def remember_verified_envelopes() -> None:
    """Check each signed envelope's signature once per process (idempotent)."""
    validate = Envelope.validate
    if getattr(validate, "remembers", False):
        return

    def validate_once(self: Envelope, domain: str) -> None:
        digest = _digest(self, domain)
        if digest in _verified:
            _verified.move_to_end(digest)
            return
        validate(self, domain)  # raises when the signature is bad: nothing remembered
        _verified[digest] = None
        if len(_verified) > VERIFIED_ENVELOPES:
            _verified.popitem(last=False)

    validate_once.remembers = True  # type: ignore[attr-defined]
    Envelope.validate = validate_once  # type: ignore[method-assign]


async def closest_peers(dht: KadDHT, key: bytes, within: float, fallback: int) -> list[ID]:
    """The peers closest to ``key``, ourselves left out: from a walk through
    the network given ``within`` seconds, or, when the walk does not end in
    time (a node just started, a busy network), the ``fallback`` closest our
    routing table knows, which may well hold what is sought."""
    peers: list[ID] = []
    with trio.move_on_after(within):
        peers = await dht.peer_routing.find_closest_peers_network(key)
    if not peers:
        peers = dht.routing_table.find_local_closest_peers(key, fallback)
    return [peer for peer in peers if peer != dht.local_peer_id]


async def find_providers(dht: KadDHT, key: bytes, enough: int) -> list[PeerInfo]:
    """Providers of ``key``: those that announced themselves to us, and those
    the peers closest to it name, asked nearest first, a few at a time,
    until ``enough`` distinct ones are known, or a few more peers named no
    new one (each of the closest holds every provider's announcement), or
    all the closest were asked.

    The closest peers of our routing table are asked first, with no walk of
    the DHT: in a table that has seen a few dozen peers they are among the
    closest of the network, and the walk was most of a search's cost (every
    node searching at once as a network starts).  Only when they name no
    provider at all does a walk find the closest peers to ask.  At most one
    lookup and 40 requests, and PROVIDERS_SEARCH seconds: what was found by
    then is returned.  As in ``lookup``, the walk gets half the time, and a
    walk that does not end leaves the closest peers of our routing table."""
    found: dict[ID, PeerInfo] = {}
    asked: set[ID] = {dht.local_peer_id}
    named = False  # whether any peer asked named a provider

    def add(providers: list[PeerInfo]) -> None:
        for info in providers:
            if info.peer_id not in found and info.addrs:
                found[info.peer_id] = info

    add(dht.provider_store.get_providers(key))

    async def ask(peer: ID) -> None:
        nonlocal named
        try:
            with trio.move_on_after(PROVIDERS_TIMEOUT):
                store = dht.provider_store
                providers, _ = await store._get_providers_from_peer_with_closers(peer, key)
                named = named or bool(providers)
                add(providers)
        except Exception as error:  # a peer's failure is not ours
            log.debug("asking %s for providers failed: %s", peer, error)

    async def ask_closest(peers: list[ID]) -> None:
        peers = [peer for peer in peers if peer not in asked]
        asked.update(peers)
        for start in range(0, len(peers), PROVIDERS_AT_ONCE):
            known = len(found)
            async with trio.open_nursery() as nursery:
                for peer in peers[start : start + PROVIDERS_AT_ONCE]:
                    nursery.start_soon(ask, peer)
            if len(found) >= enough or (start and len(found) == known):
                return

    if len(found) >= enough:
        return list(found.values())
    deadline = trio.current_time() + PROVIDERS_SEARCH
    with trio.move_on_at(deadline):
        await ask_closest(dht.routing_table.find_local_closest_peers(key, PROVIDERS_FALLBACK))
        if named or len(found) >= enough:
            return list(found.values())
    within = min(PROVIDERS_SEARCH / 2, deadline - trio.current_time())
    if within > 0:
        peers = await closest_peers(dht, key, within, PROVIDERS_FALLBACK)
        with trio.move_on_at(deadline):
            await ask_closest(peers)
    return list(found.values())


def known_serving(host: IHost, protocol: str) -> list[PeerInfo]:
    """Peers the peer store says serve ``protocol`` (identify told us), with
    their addresses: connected ones first."""
    peerstore = host.get_peerstore()
    connected = set(host.get_network().connections)
    serving = []
    for peer in peerstore.peer_ids():
        if peer == host.get_id():
            continue
        try:
            protocols = peerstore.get_protocols(peer)
            addresses = peerstore.addrs(peer)
        except Exception:  # not identified, or forgotten
            continue
        if protocol in (protocols or []) and addresses:
            serving.append(PeerInfo(peer, addresses))
    serving.sort(key=lambda info: info.peer_id not in connected)
    return serving
