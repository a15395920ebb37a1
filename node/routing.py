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
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable

from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.envelope import Envelope

log = logging.getLogger("pigeon.routing")

# Envelopes whose signature was found good, remembered by digest (32 bytes
# each, so about 200 KiB): a network's worth of peers several times over.
VERIFIED_ENVELOPES = 4096


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
