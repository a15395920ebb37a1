"""The node's routing-table upkeep and its memory of verified peer records
(node/routing.py): unit tests with py-libp2p's own key and envelope types,
and a real DHT that uses them."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.envelope import Envelope, seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from multiaddr import Multiaddr

from pigeon.node import routing
from pigeon.node.routing import RoutingUpkeep, remember_verified_envelopes


class Lookups:
    """Stands in for ``dht.peer_routing``: records each lookup's key."""

    def __init__(self, fail: bool = False) -> None:
        self.keys: list[bytes] = []
        self.fail = fail

    async def find_closest_peers_network(self, key: bytes) -> list[ID]:
        self.keys.append(key)
        if self.fail:
            raise TimeoutError("no answer")
        return []


class Dht:
    def __init__(self, lookups: Lookups) -> None:
        self.peer_routing = lookups
        self.local_peer_id = ID.from_pubkey(create_new_key_pair(b"\x01" * 32).public_key)


def test_the_first_refresh_looks_up_our_own_id_and_later_ones_a_random_key_too() -> None:
    lookups = Lookups()
    dht = Dht(lookups)
    keys = iter([b"\xaa" * 32, b"\xbb" * 32])
    upkeep = RoutingUpkeep(dht, lambda n: next(keys))  # type: ignore[arg-type]
    upkeep.install()
    own = dht.local_peer_id.to_bytes()
    trio.run(dht.refresh_routing_table)  # type: ignore[attr-defined]
    assert lookups.keys == [own]
    trio.run(dht.refresh_routing_table)  # type: ignore[attr-defined]
    trio.run(dht.refresh_routing_table)  # type: ignore[attr-defined]
    assert lookups.keys == [own, own, b"\xaa" * 32, own, b"\xbb" * 32]


def test_a_failed_lookup_does_not_end_the_refresh() -> None:
    lookups = Lookups(fail=True)
    dht = Dht(lookups)
    upkeep = RoutingUpkeep(dht, lambda n: b"\xcc" * n)  # type: ignore[arg-type]
    trio.run(upkeep.refresh)
    trio.run(upkeep.refresh)  # both keys tried although the first failed
    assert len(lookups.keys) == 3


def test_a_real_dht_refreshes_through_the_upkeep() -> None:
    from pigeon.node.host import build_host

    host = build_host(b"\x02" * 32, ["/ip4/127.0.0.1/tcp/0"], None)
    dht = KadDHT(host, DHTMode.SERVER)
    upkeep = RoutingUpkeep(dht)
    upkeep.install()
    trio.run(dht.refresh_routing_table)  # an empty table: the lookup finds nobody
    assert upkeep.refreshes == 1


def envelope(seed: bytes) -> Envelope:
    keys = create_new_key_pair(seed)
    record = PeerRecord(ID.from_pubkey(keys.public_key), [Multiaddr("/ip4/127.0.0.1/tcp/4001")])
    return seal_record(record, keys.private_key)


class CountingKey:
    """A public key that counts its signature checks."""

    def __init__(self, key: object) -> None:
        self.key = key
        self.checks = 0

    def verify(self, data: bytes, signature: bytes) -> bool:
        self.checks += 1
        return self.key.verify(data, signature)  # type: ignore[attr-defined]

    def serialize(self) -> bytes:
        return self.key.serialize()  # type: ignore[attr-defined]


@pytest.fixture
def remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Envelope, "validate", Envelope.validate)
    monkeypatch.setattr(routing, "_verified", type(routing._verified)())
    remember_verified_envelopes()
    remember_verified_envelopes()  # idempotent: one layer, not two


def test_a_good_envelope_is_checked_once(remembered: None) -> None:
    good = envelope(b"\x03" * 32)
    domain = PeerRecord().domain()
    counting = CountingKey(good.public_key)
    good.public_key = counting  # type: ignore[assignment]
    good.validate(domain)
    good.validate(domain)
    assert counting.checks == 1
    # Another domain is another check.
    with pytest.raises(ValueError):
        good.validate("another-domain")
    assert counting.checks == 2


def test_a_bad_signature_raises_every_time_and_is_never_remembered(remembered: None) -> None:
    domain = PeerRecord().domain()
    good = envelope(b"\x04" * 32)
    bad = Envelope(
        good.public_key,
        good.payload_type,
        good.raw_payload,
        bytes([good.signature[0] ^ 1]) + good.signature[1:],
    )
    for _ in range(3):
        with pytest.raises(ValueError, match="Invalid envelope signature"):
            bad.validate(domain)
    assert len(routing._verified) == 0
    # Another record under the good one's signature is refused too.
    payload = good.raw_payload + b"\x00"
    forged = Envelope(good.public_key, good.payload_type, payload, good.signature)
    good.validate(domain)
    with pytest.raises(ValueError):
        forged.validate(domain)


def test_the_memory_is_bounded(remembered: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routing, "VERIFIED_ENVELOPES", 3)
    domain = PeerRecord().domain()
    for i in range(5):
        envelope(bytes([10 + i]) * 32).validate(domain)
    assert len(routing._verified) == 3
