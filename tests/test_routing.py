"""The node's routing-table upkeep and its memory of verified peer records
(node/routing.py): unit tests with py-libp2p's own key and envelope types,
and a real DHT that uses them.  Then what keeps a node's idle work flat as
the network grows: the mailbox search's backoff, the provider search, our
record reaching new closest peers as they appear, and connections in use
kept from pruning (real nodes on 127.0.0.1 where it matters)."""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.envelope import Envelope, seal_record
from libp2p.peer.id import ID
from libp2p.peer.peer_record import PeerRecord
from libp2p.peer.peerinfo import PeerInfo
from multiaddr import Multiaddr

from pigeon.node import routing
from pigeon.node.conversations import Conversations
from pigeon.node.host import close_host
from pigeon.node.node import Node, NodeConfig
from pigeon.node.routing import RoutingUpkeep, remember_verified_envelopes
from pigeon.node.storage import Database
from pigeon.protocol.keys import identity_id


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


# -- idle upkeep that stays flat as the network grows ---------------------------------


def test_the_mailbox_search_backs_off_exponentially_up_to_a_cap() -> None:
    from pigeon.node.mailbox_owner import (
        SEARCH_AGAIN,
        SEARCH_FIRST,
        SEARCH_JITTER,
        SEARCH_MAX,
        SEARCH_MAX_NONE,
        search_delay,
    )

    # Holding some (fewer than wanted): ten seconds, doubling, up to half an hour.
    delays = [search_delay(searches, 2, 0.0) for searches in range(20)]
    assert delays[:5] == [SEARCH_AGAIN, SEARCH_AGAIN, 20.0, 40.0, 80.0]
    assert delays == sorted(delays)
    assert delays[-1] == SEARCH_MAX == 30 * 60
    # Holding none: seconds at first, and never more than five minutes apart.
    none = [search_delay(searches, 0, 0.0) for searches in range(20)]
    assert none[:4] == [SEARCH_FIRST, SEARCH_FIRST, 10.0, 20.0]
    assert none[-1] == SEARCH_MAX_NONE == 5 * 60
    # Jitter shortens a wait by at most a quarter, never lengthens it.
    assert search_delay(19, 2, 1.0) == SEARCH_MAX * (1 - SEARCH_JITTER)
    assert search_delay(3, 2, 0.5) == 40.0 * (1 - SEARCH_JITTER / 2)
    assert search_delay(10**6, 2, 0.0) == SEARCH_MAX  # no overflow


class Owner:
    """A ``MailboxOwner`` whose mailboxes are a list and whose search counts."""

    def __init__(self, held: list[int], found: bool = False) -> None:
        import os
        import time

        from pigeon.node.mailbox_owner import MailboxOwner

        self.held = held
        self.searches: list[float] = []
        self.found = found
        owner = MailboxOwner(
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            lambda envelopes, peer: [],
            lambda: None,
            count=3,
            interval=30.0,
            random=os.urandom,
            clock=time.time,
        )
        owner.my_mailboxes = lambda retired=False: [(bytes([i]), []) for i in self.held]  # type: ignore[method-assign]
        owner._ensure_mailboxes = self._search  # type: ignore[method-assign]
        self.owner = owner

    async def _search(self) -> bool:
        self.searches.append(trio.current_time())
        if self.found:
            self.held.append(len(self.held))
        return self.found

    async def run_for(self, seconds: float, every: float = 1.0) -> None:
        """Call ``_search`` as often as the owner's loop could (every wake-up)."""
        end = trio.current_time() + seconds
        while trio.current_time() < end:
            await self.owner._search()
            await trio.sleep(every)


def test_a_node_short_of_mailboxes_searches_rarely_and_one_with_enough_never() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> None:
        # Two of the three wanted, and no other mailbox in the network: woken
        # every second for two hours, it searches about ten times, not 240.
        short = Owner([0, 1])
        await short.run_for(2 * 3600)
        assert 7 <= len(short.searches) <= 12, len(short.searches)
        gaps = [b - a for a, b in itertools.pairwise(short.searches)]
        assert 0.75 * 10 - 1 <= gaps[0] <= 11
        assert max(gaps) <= 30 * 60 + 1
        assert gaps[-1] >= 0.75 * 30 * 60 - 1
        # Losing a mailbox starts again at once.
        short.held.pop()
        before = len(short.searches)
        await short.run_for(2)
        assert len(short.searches) == before + 1
        # Holding enough, it never searches.
        enough = Owner([0, 1, 2])
        await enough.run_for(3600)
        assert enough.searches == []
        # Holding none, it looks again within seconds, and at least every five minutes.
        none = Owner([])
        await none.run_for(3600)
        gaps = [b - a for a, b in itertools.pairwise(none.searches)]
        assert gaps[0] <= 5 + 1 and max(gaps) <= 5 * 60 + 1
        # A search that found one starts the schedule again (more may have started).
        growing = Owner([], found=True)
        await growing.run_for(200)
        assert len(growing.searches) == 3
        assert growing.searches[2] - growing.searches[1] <= 61

    trio.run(main, clock=clock)


class ProviderNetwork:
    """Stands in for a DHT: 20 peers closest to the key, each naming the
    providers it was told of; our own store holds an old copy."""

    def __init__(
        self,
        named: list[PeerInfo],
        kept: list[PeerInfo],
        stuck: bool = False,
        table: list[ID] | None = None,
    ) -> None:
        self.local_peer_id = peer(0)
        self.asked: list[ID] = []
        self.walks = 0
        self.named = named
        self.kept = kept
        self.stuck = stuck  # the walk to the closest peers never ends
        # the closest peers of our routing table (by default, the closest)
        self.table = [peer(i) for i in range(1, 21)] if table is None else table
        self.peer_routing = self
        self.provider_store = self
        self.routing_table = self

    async def find_closest_peers_network(self, key: bytes) -> list[ID]:
        self.walks += 1
        if self.stuck:
            await trio.sleep_forever()
        return [peer(i) for i in range(1, 21)]

    def find_local_closest_peers(self, key: bytes, count: int) -> list[ID]:
        return self.table[:count]

    def get_providers(self, key: bytes) -> list[PeerInfo]:
        return self.kept

    async def _get_providers_from_peer_with_closers(
        self, who: ID, key: bytes
    ) -> tuple[list[PeerInfo], list[ID]]:
        self.asked.append(who)
        # peers far from the key (not among the 20 closest) were told of no provider
        return (self.named if _closest(who) else []), []


def _closest(who: ID) -> bool:
    return who in {peer(i) for i in range(1, 21)}


def peer(i: int) -> ID:
    return ID.from_pubkey(create_new_key_pair(bytes([100 + i]) * 32).public_key)


def test_providers_are_asked_of_the_closest_peers_and_only_of_a_few() -> None:
    """py-libp2p's ``find_providers`` answers from what it found before (a
    provider that started after a node's first search was never found by
    it), and otherwise asks until it holds as many as it was asked for: with
    fewer in the network, every peer it heard of."""
    from pigeon.node.routing import find_providers

    address = [Multiaddr("/ip4/127.0.0.1/tcp/4001")]
    old, new = PeerInfo(peer(50), address), PeerInfo(peer(51), address)
    network = ProviderNetwork([old, new], [old])
    found = trio.run(find_providers, network, b"key", 4)
    assert {info.peer_id for info in found} == {old.peer_id, new.peer_id}
    # The closest five, then five more that named no new one: not all twenty.
    assert sorted(map(str, network.asked)) == sorted(str(peer(i)) for i in range(1, 11))
    # Enough known after the first five: no more asked.
    network = ProviderNetwork([old, new], [])
    assert len(trio.run(find_providers, network, b"key", 2)) == 2
    assert len(network.asked) == 5
    # Enough of our own: no request at all.
    network = ProviderNetwork([], [old, new])
    assert len(trio.run(find_providers, network, b"key", 2)) == 2
    assert network.asked == []


def test_a_provider_search_asks_the_closest_peers_of_its_table_before_any_walk() -> None:
    """Every node walked the DHT for each search, though its routing table
    held peers close enough to name the providers: as a network of 100
    started, those walks were most of what its one event loop did."""
    from pigeon.node.routing import find_providers

    address = [Multiaddr("/ip4/127.0.0.1/tcp/4001")]
    box = PeerInfo(peer(50), address)
    network = ProviderNetwork([box], [])
    assert [i.peer_id for i in trio.run(find_providers, network, b"key", 3)] == [box.peer_id]
    assert network.walks == 0
    # A table that holds only far peers: they name none, so the walk is made,
    # and the closest it finds are asked (not those asked already).
    far = [peer(i) for i in range(30, 36)]
    network = ProviderNetwork([box], [], table=far)
    assert [i.peer_id for i in trio.run(find_providers, network, b"key", 3)] == [box.peer_id]
    assert network.walks == 1
    assert set(network.asked[: len(far)]) == set(far)
    assert set(network.asked[len(far) :]) == {peer(i) for i in range(1, 11)}


def test_a_provider_search_whose_walk_does_not_end_asks_the_closest_peers_it_knows() -> None:
    """A search has a time limit of its own, and a walk that does not end in
    half of it leaves the closest peers of our routing table to ask: the
    providers they name are found in time.  (Before, the walk took the
    owner's whole 20 s, and the search failed with nothing found.)"""
    from pigeon.node.routing import PROVIDERS_SEARCH, find_providers

    address = [Multiaddr("/ip4/127.0.0.1/tcp/4001")]
    box = PeerInfo(peer(50), address)
    network = ProviderNetwork([box], [], stuck=True)

    async def main() -> None:
        started = trio.current_time()
        found = await find_providers(network, b"key", 3)  # type: ignore[arg-type]
        assert [info.peer_id for info in found] == [box.peer_id]
        assert trio.current_time() - started <= PROVIDERS_SEARCH

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_providers_are_found_at_the_closest_peers_of_a_real_dht() -> None:
    """The same with py-libp2p's DHT on 127.0.0.1: the request it makes is
    one of the library's own methods, which must still answer as expected."""
    from libp2p.tools.anyio_service import background_trio_service

    from pigeon.node.host import build_host
    from pigeon.node.routing import find_providers

    key = bytes.fromhex("1220" + "ab" * 32)

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            dhts = []
            for i in range(6):
                host = build_host(bytes([40 + i]) * 32, ["/ip4/127.0.0.1/tcp/0"], None)
                dht = KadDHT(host, DHTMode.SERVER)
                RoutingUpkeep(dht).install()
                await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                await stack.enter_async_context(background_trio_service(dht))
                if dhts:
                    first = dhts[0].host
                    await host.connect(PeerInfo(first.get_id(), first.get_addrs()))
                    await dht.add_peer(first.get_id())
                dhts.append(dht)
            for dht in dhts[1:]:
                await dht.peer_routing.find_closest_peers_network(dht.local_peer_id.to_bytes())
            searcher = dhts[5]
            assert await dhts[1].provide(key)
            found = await find_providers(searcher, key, 3)
            assert [info.peer_id for info in found] == [dhts[1].local_peer_id]
            assert await dhts[2].provide(key)
            found = await find_providers(searcher, key, 3)
            assert {info.peer_id for info in found} == {
                dhts[1].local_peer_id,
                dhts[2].local_peer_id,
            }
            for dht in dhts:
                stack.push_async_callback(close_host, dht.host)

    trio.run(main)


def _dht_node(root: Path, name: str, bootstrap: Node | None, **config: Any) -> Node:
    """A node that only takes part in the DHT (no presence, no mailboxes),
    unless ``config`` says otherwise."""
    db = Database.create(root / name, "pw", fast_kdf=True)
    Conversations.initialise(db, name, os.urandom)
    settings: dict[str, Any] = {"announce_presence": False, "mailbox_count": 0, **config}
    return Node(db, NodeConfig(bootstrap=[bootstrap.addresses[0]] if bootstrap else [], **settings))


async def _run_node(
    node: Node, stop: trio.Event, ended: trio.Event, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    try:
        async with node.running():
            task_status.started()
            await stop.wait()
    finally:
        node.db.close()
        ended.set()


@contextlib.asynccontextmanager
async def dht_nodes(root: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """``start(name, bootstrap, **config)`` runs a node until the block ends."""
    async with trio.open_nursery() as nursery:
        stops: list[trio.Event] = []

        async def start(name: str, bootstrap: Node | None, **config: Any) -> Node:
            started = _dht_node(root, name, bootstrap, **config)
            stops.append(trio.Event())
            await nursery.start(_run_node, started, stops[-1], trio.Event())
            return started

        try:
            yield start
        finally:
            for stop in stops:
                stop.set()


def test_a_record_published_by_two_nodes_reaches_the_closest_peers_as_the_network_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two nodes publish while they are the whole network; six more join;
    the first two leave.  A node that joins then finds both records: they
    went to the new closest peers when those appeared, not at the next
    republish (an hour away here)."""
    from pigeon.node import directory
    from pigeon.protocol import DirectoryRecord, dht_key

    monkeypatch.setattr(directory, "REPUBLISH_EVERY", 3600)
    monkeypatch.setattr(directory, "WATCH_EVERY", 0.5)
    monkeypatch.setattr(directory, "SPREAD_AFTER", 0.5)
    monkeypatch.setattr(directory, "SPREAD_GAP", 2.0)

    def holders(nodes: list[Node], of: Node) -> int:
        key = dht_key(of.conversations.identity.public_key).encode()
        return sum(n.dht.value_store.get(key) is not None for n in nodes)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stops: dict[Node, trio.Event] = {}
            ended: dict[Node, trio.Event] = {}

            async def start(name: str, bootstrap: Node | None) -> Node:
                started = _dht_node(tmp_path, name, bootstrap)
                stops[started], ended[started] = trio.Event(), trio.Event()
                await nursery.start(_run_node, started, stops[started], ended[started])
                return started

            a = await start("a", None)
            b = await start("b", a)
            with trio.fail_after(20):
                while holders([a], b) == 0:  # b's record, published to a
                    await trio.sleep(0.2)
            grown = [b]
            for i in range(6):
                grown.append(await start(f"n{i}", grown[-1]))
            newcomers = grown[1:]
            with trio.move_on_after(30):
                while min(holders(newcomers, a), holders(newcomers, b)) < 4:
                    await trio.sleep(0.5)
            for gone in (a, b):
                stops[gone].set()
                await ended[gone].wait()
            c = await start("c", grown[-1])
            for gone in (a, b):
                key = gone.conversations.identity.public_key
                copies = await directory.lookup(c.dht, key)
                assert copies, f"{gone.conversations.name}'s record was not found"
                for copy in copies:
                    DirectoryRecord.verify(copy, now=int(time.time()), key_id=identity_id(key))
            # They went there when those peers appeared, not at a republish.
            assert a.directory.spreads >= 1 and b.directory.spreads >= 1
            for stop in stops.values():
                stop.set()

    trio.run(main)


def test_a_changed_record_goes_to_its_holders_without_a_walk(tmp_path: Path) -> None:
    """A record that only changed (a new mailbox, a new address) is stored
    where the last one went, with no new walk of the DHT: that walk was a
    third of a starting node's DHT requests (it changes its record once for
    each mailbox it registers with)."""
    from pigeon.protocol import DirectoryRecord, dht_key

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            a = await start("a", None)
            b = await start("b", a)  # its first publish walks to a
            key = b.conversations.identity.public_key

            def sequence_at(node: Node) -> int:
                held = node.dht.value_store.get(dht_key(key).encode())
                if held is None:
                    return -1
                now = int(time.time())
                return DirectoryRecord.verify(held.value, now=now, identity_key=key).sequence

            with trio.fail_after(20):
                while sequence_at(a) < 0:
                    await trio.sleep(0.2)
            walks: list[bytes] = []
            walk = b.dht.peer_routing.find_closest_peers_network

            async def counted(key_bytes: bytes) -> list[ID]:
                walks.append(key_bytes)
                return await walk(key_bytes)

            b.dht.peer_routing.find_closest_peers_network = counted  # type: ignore[method-assign]
            before = sequence_at(a)
            b.directory.republish()
            with trio.fail_after(20):
                while sequence_at(a) <= before:
                    await trio.sleep(0.2)
            assert walks == []

    trio.run(main)


def test_a_lookup_asks_the_peers_it_knows_then_those_they_name_and_never_walks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup asks the closest peers of its routing table, then the closer
    ones they name, and stops at the record: no walk to the closest peers
    before the first request that can find it.  (Under the churn
    simulation's load a walk took most of a lookup's 10 s, and a lookup whose
    walk did not end found nothing.)  Here the record's only holder is not in
    the asking node's table: a peer that is names it."""
    from pigeon.node import directory
    from pigeon.protocol import dht_key

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            a = await start("a", None)
            b = await start("b", a)
            key = b.conversations.identity.public_key
            held = dht_key(key).encode()
            with trio.fail_after(20):  # b's record, published to a
                while a.dht.value_store.get(held) is None:
                    await trio.sleep(0.2)
            c = await start("c", a)
            with trio.fail_after(20):  # a knows b, to name it
                while not a.dht.routing_table.peer_in_table(b.host.get_id()):
                    await trio.sleep(0.2)
            for node in (a, c):  # b's own copy is the only one left
                node.dht.value_store.remove(held)
            c.dht.routing_table.remove_peer(b.host.get_id())

            async def no_walk(key_bytes: bytes) -> list[ID]:
                raise AssertionError("the lookup walked the DHT")

            monkeypatch.setattr(c.dht.peer_routing, "find_closest_peers_network", no_walk)
            asked: list[ID] = []
            get = c.dht.value_store._get_from_peer

            async def counted(peer: ID, *args: Any, **kwargs: Any) -> Any:
                asked.append(peer)
                return await get(peer, *args, **kwargs)

            monkeypatch.setattr(c.dht.value_store, "_get_from_peer", counted)
            with trio.fail_after(directory.LOOKUP_TIMEOUT):
                copies = await directory.lookup(c.dht, key)
            assert copies, "the peer a named was not asked"
            assert asked == [a.host.get_id(), b.host.get_id()]

    trio.run(main)


def test_a_peer_that_does_not_answer_holds_up_no_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup keeps its requests under way: a peer that never answers (gone,
    or too busy) holds up one of them, not a round, so the peer another one
    names is asked at once; and a lookup that holds a copy once every peer
    has been asked ends then, not when the silent one's request times out
    (before, each round waited for its slowest peer, 5 s)."""
    from pigeon.node import directory
    from pigeon.protocol import dht_key

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            a = await start("a", None)
            b = await start("b", a)
            silent = await start("d", a)
            key = b.conversations.identity.public_key
            held = dht_key(key).encode()
            c = await start("c", a)
            d = silent.host.get_id()
            await c.host.connect(PeerInfo(d, silent.host.get_addrs()))
            with trio.fail_after(20):
                while not (
                    a.dht.routing_table.peer_in_table(b.host.get_id())
                    and c.dht.routing_table.peer_in_table(d)
                    and a.dht.value_store.get(held) is not None
                ):
                    await c.dht.add_peer(d)  # once identify has told c that d serves the DHT
                    await trio.sleep(0.2)
            for node in (a, c, silent):  # b's own copy is the only one left
                node.dht.value_store.remove(held)
            c.dht.routing_table.remove_peer(b.host.get_id())
            get = c.dht.value_store._get_from_peer

            async def one_never_answers(peer: ID, *args: Any, **kwargs: Any) -> Any:
                if peer == d:
                    await trio.sleep_forever()
                return await get(peer, *args, **kwargs)

            monkeypatch.setattr(c.dht.value_store, "_get_from_peer", one_never_answers)
            started = trio.current_time()
            copies = await directory.lookup(c.dht, key)
            assert copies, "b, named by a, was not asked"
            assert trio.current_time() - started < directory.LOOKUP_TIMEOUT / 4

    trio.run(main)


def test_an_owner_proves_its_registration_once_for_every_mailbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registering costs a proof of work that binds only the owner's mailbox
    key, so it is done once and kept: a second mailbox, and a mailbox
    registered with again, cost none.  (In a simulation every node's proofs
    queue on one worker; three each held the timeline back for minutes.)"""
    from pigeon.node import mailbox_owner

    proofs: list[bytes] = []
    prove = mailbox_owner.prove

    async def counted(*args: Any) -> bytes:
        work = await prove(*args)
        proofs.append(work)
        return work

    monkeypatch.setattr(mailbox_owner, "prove", counted)

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            a = await start("a", None, serve_mailbox=True)
            await start("b", a, serve_mailbox=True)
            owner = await start("owner", a, mailbox_count=2, mailbox_interval=1.0)
            with trio.fail_after(30):
                while len(owner.owner.my_mailboxes()) < 2:
                    await trio.sleep(0.2)
            assert len(proofs) == 1
            with owner.db.transaction():  # both forget us: we register again
                owner.db.execute("DELETE FROM my_mailboxes")
            owner.owner.collect_now.set()
            with trio.fail_after(30):
                while len(owner.owner.my_mailboxes()) < 2:
                    await trio.sleep(0.2)
            assert len(proofs) == 1

    trio.run(main)


def test_an_owner_registers_with_mailboxes_it_knows_without_a_search(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mailbox peer the owner is connected to (identify said it serves the
    mailbox protocol: often the bootstrap peer) is registered with even when
    the DHT search finds no provider, as in a network that grew since the
    mailbox last advertised."""
    from pigeon.node import mailbox_owner

    searches: list[int] = []

    async def finds_nothing(*args: Any) -> list[Any]:
        searches.append(1)
        return []

    monkeypatch.setattr(mailbox_owner, "find_providers", finds_nothing)

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            box = await start("box", None, serve_mailbox=True)
            owner = await start("owner", box, mailbox_count=2, mailbox_interval=1.0)
            with trio.fail_after(30):
                while not owner.owner.my_mailboxes():
                    await trio.sleep(0.2)
            ((peer, _),) = owner.owner.my_mailboxes()
            assert peer == box.host.get_id().to_bytes()
            # Still one short of two: the search goes on (and finds none).
            with trio.fail_after(30):
                while not searches:
                    await trio.sleep(0.2)

    trio.run(main)


def test_a_mailbox_advertises_again_when_new_peers_become_closest_to_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mailbox advertised while the network was small; peers that joined
    since and became the closest to the key get the advertisement too,
    without waiting for the 10-minute renewal (a search asks them), and
    without a walk of the DHT for it."""
    from pigeon.node import mailbox

    monkeypatch.setattr(mailbox, "PROVIDE_TO", 2)
    monkeypatch.setattr(mailbox, "RESPREAD_GAP", 0.5)
    key = bytes.fromhex(mailbox.PROVIDER_KEY)

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            box = await start("box", None, serve_mailbox=True, mailbox_interval=0.2)
            first = await start("n0", box)
            walks = 0
            provide = box.dht.provide

            async def counted(key: str) -> bool:
                nonlocal walks
                walks += 1
                return await provide(key)

            box.dht.provide = counted  # type: ignore[method-assign]
            nodes = [first]
            for n in range(1, 8):
                nodes.append(await start(f"n{n}", first))
            by_id = {node.host.get_id(): node for node in nodes}

            def told() -> bool:
                closest = box.dht.routing_table.find_local_closest_peers(key, 2)
                return len(closest) == 2 and all(
                    box.host.get_id()
                    in {i.peer_id for i in by_id[p].dht.provider_store.get_providers(key)}
                    for p in closest
                )

            with trio.fail_after(30):
                while not told():
                    await trio.sleep(0.2)
            assert walks <= 1  # the advertisement at start, if it came after the wrapper

    trio.run(main)


class Connection:
    """What py-libp2p's pruner reads of a connection."""

    def __init__(self, created: float, used: float | None) -> None:
        self._created_at = created
        if used is not None:
            self._pigeon_used_at = used


def test_a_connection_used_recently_is_not_pruned() -> None:
    import time

    from libp2p.network.connection_pruner import ConnectionPruner

    from pigeon.node.host import KEEP_USED_FOR

    pruner = ConnectionPruner(None)  # type: ignore[arg-type]
    old = time.time() - 3600
    now = time.monotonic()
    spared = pruner._is_connection_within_grace_period
    assert spared(Connection(old, now - 5), 20.0)  # type: ignore[arg-type]
    assert not spared(Connection(old, now - KEEP_USED_FOR - 1), 20.0)  # type: ignore[arg-type]
    assert not spared(Connection(old, None), 20.0)  # type: ignore[arg-type]
    assert spared(Connection(time.time(), None), 20.0)  # type: ignore[arg-type]  # new: grace


def test_a_real_connection_notes_its_streams() -> None:
    import time

    from libp2p.custom_types import TProtocol

    from pigeon.node.host import build_host, used_recently

    protocol = TProtocol("/pigeon-test/1.0.0")

    async def main() -> None:
        hosts = [build_host(bytes([60 + i]) * 32, ["/ip4/127.0.0.1/tcp/0"]) for i in range(2)]
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                stack.push_async_callback(close_host, host)
                host.set_stream_handler(protocol, lambda stream: stream.close())
            a, b = hosts
            await a.connect(PeerInfo(b.get_id(), b.get_addrs()))
            (connection,) = a.get_network().get_connections(b.get_id())
            before = getattr(connection, "_pigeon_used_at", 0.0)
            await trio.sleep(0.05)
            stream = await a.new_stream(b.get_id(), [protocol])
            await stream.close()
            assert used_recently(connection)
            assert connection._pigeon_used_at > before  # type: ignore[attr-defined]
            assert not used_recently(connection, now=time.monotonic() + 3600)

    trio.run(main)


def test_a_node_between_its_connection_bounds_dials_no_one() -> None:
    """py-libp2p dialled towards the middle of the bounds after every
    disconnect, while the pruner trimmed towards the lower one: above the
    upper bound's worth of nodes, connections churned while idle."""
    from pigeon.node.host import CONNECTIONS_LOW, build_host

    async def main() -> None:
        hosts = [build_host(bytes([90 + i]) * 32, ["/ip4/127.0.0.1/tcp/0"]) for i in range(22)]
        async with contextlib.AsyncExitStack() as stack:
            for host in hosts:
                await stack.enter_async_context(host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]))
                stack.push_async_callback(close_host, host)
            a, *others = hosts
            for other in others:  # a knows every one of them
                a.get_peerstore().add_addrs(other.get_id(), other.get_addrs(), 3600)
            for other in others[:12]:
                await a.connect(PeerInfo(other.get_id(), other.get_addrs()))
            network = a.get_network()
            await network.auto_connector.maybe_connect()
            await trio.sleep(0.5)
            assert network.get_total_connections() == 12

            for other in others[:7]:  # below the floor: it dials again
                for connection in network.get_connections(other.get_id()):
                    await connection.close()
            with trio.fail_after(15):
                while network.get_total_connections() < CONNECTIONS_LOW:
                    await network.auto_connector.maybe_connect()
                    await trio.sleep(0.1)

    trio.run(main)


def test_only_peers_that_serve_the_dht_enter_the_routing_table() -> None:
    """py-libp2p adds any peer that opens a DHT stream to us ("it must be a
    server"); a client behind NAT asks too, and in others' tables it made
    their lookups stall.  Only a peer identify says serves the DHT is added."""
    from libp2p.kad_dht.common import PROTOCOL_ID

    from pigeon.node.routing import servers_only

    protocols = {peer(1): [str(PROTOCOL_ID), "/pigeon/envelope/1.0.0"], peer(2): ["/ipfs/id/1.0.0"]}
    added: list[ID] = []

    class Peerstore:
        def get_protocols(self, who: ID) -> list[str]:
            if who not in protocols:
                raise KeyError(who)  # not identified yet
            return protocols[who]

    class Host:
        def get_peerstore(self) -> Peerstore:
            return Peerstore()

    class DHT:
        host = Host()

        async def add_peer(self, who: ID, *, skip_server_mode_check: bool = False) -> bool:
            added.append(who)
            return True

    dht = DHT()
    servers_only(dht)  # type: ignore[arg-type]

    async def main() -> None:
        assert await dht.add_peer(peer(1), skip_server_mode_check=True)
        assert not await dht.add_peer(peer(2), skip_server_mode_check=True)  # a client
        assert not await dht.add_peer(peer(3), skip_server_mode_check=True)  # not identified

    trio.run(main)
    assert added == [peer(1)]


def test_a_connection_event_after_the_node_stopped_starts_nothing(tmp_path: Path) -> None:
    """The host still reports connections while it shuts down, after the
    node's nursery has closed: that raised "Nursery is closed to new
    arrivals" from the connection callback at every stop."""
    node = _dht_node(tmp_path, "a", None)
    started: list[str] = []

    async def task() -> None:
        started.append("ran")

    async def main() -> None:
        async with node.running():
            pass
        node.spawn(task)
        await trio.sleep(0)

    try:
        trio.run(main)
    finally:
        node.db.close()
    assert started == []
