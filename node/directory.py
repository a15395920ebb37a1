"""The DHT directory: each identity's signed record under ``/pigeon/<id>``.

The validator is strict: a record must be signed by the identity whose ID the
key names and must not be expired; ``select`` keeps the highest sequence.
A contact's record is asked of the contact itself first (``RECORD_PROTOCOL``),
then of the DHT (py-libp2p answers from its local copy first, which may be
stale, so a lookup asks the closest peers: ``lookup``) and the newest valid
answer kept.

``guard_dht`` puts limits around what py-libp2p's KadDHT serves to others.
What the library lacks, and what is wrapped here: it serves at most 12 inbound
streams at once in total, with no limit per peer and no deadline on a stream
waiting for its next request, so one stranger holding 12 idle streams blinds a
node's DHT; it reads a request of up to 4 MiB (a module constant, no option);
and its value store keeps up to 50,000 records from anyone and then evicts the
oldest, with no account of who stored what, so throwaway identities can fill
it and push out genuine records.  We re-register the KAD protocol with a
handler that limits streams per peer and in total, takes back the oldest
stream when all are held, and gives each one a deadline, around the library's
own per-stream loop; set the request limit to what our records need; and wrap
the value store's ``put_record`` (called only for records peers PUT to us) to
bound how many new keys each peer, and everyone together, can store.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from collections.abc import Callable, Collection
from contextvars import ContextVar
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht import kad_dht as kad_dht_module
from libp2p.kad_dht.common import PROTOCOL_ID
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.pb.kademlia_pb2 import Record
from libp2p.kad_dht.utils import sort_peer_ids_by_distance
from libp2p.kad_dht.value_store import ValueStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import Validator
from multiaddr import Multiaddr

from pigeon.protocol import DirectoryRecord, ProtocolError, dht_key
from pigeon.protocol.frames import (
    MAX_RECORD_ANSWER_FRAME,
    MAX_RECORD_REQUEST_FRAME,
    RecordAnswer,
    RecordRequest,
)
from pigeon.protocol.keys import identity_id
from pigeon.protocol.records import DHT_NAMESPACE, MAX_RECORD_SIZE, OneTimePrekey, newest

from .contacts import ContactBook, is_current, short_id
from .framing import frame, read_frame, serve_frames
from .limits import REFUSALS, Handler, RefusalLog, Slots, StreamLimit, refuse, reset

log = logging.getLogger("pigeon.directory")
LOOKUP_TIMEOUT = 10.0
LOOKUP_AT_ONCE = 5  # closest peers asked for the record together
LOOKUP_COPIES = 3  # copies from peers after which a lookup asks no more of them
LOOKUP_CLOSEST = 20  # a lookup ends when the closest this many it knows were asked (Kademlia's k)
# A contact's record is looked up in the DHT at most this often while the one
# we hold is current: a courier retrying an offline contact, and everything
# else that wants the record meanwhile, is answered from what we hold.
LOOKUP_AGAIN_AFTER = 60.0
LOOKUP_SAMPLES = 1000  # lookups remembered for `metrics`
# Our record is published again this often, with a new sequence number, to the
# peers closest to its key.  A peer that lost it (evicted, restarted, or new
# among the closest) holds it again within this time, and a lookup meanwhile
# still finds it at the others and at our own node.
REPUBLISH_EVERY = 10 * 60
# A changed record is published this long after the change (more changes in
# that time go with it).
REPUBLISH_SETTLE = 2.0
# Peers closest to the record's key that are given a copy: enough that a
# lookup, which asks the closest five first and stops at three copies, finds
# three while some of them are away.
PUBLISH_COPIES = 8
# Between republishing, our record also goes to peers that became closest to
# its key as the network changed: every WATCH_EVERY seconds the peers closest
# to the key in our routing table are looked at (no request), and when one of
# them is a peer we did not know there (neither among those the last
# lookup of the key found, nor among those that took the record), the record
# is given, after SPREAD_AFTER seconds (peers join in bursts), to those of the
# closest that do not hold it: a store at each newcomer, no lookup, at most
# once every SPREAD_GAP seconds.  A network that does not change costs
# nothing more.
WATCH_EVERY = 5.0
SPREAD_AFTER = 5.0
SPREAD_GAP = 60.0

# A node's own record, asked of the node itself (docs/protocol/delivery.md).
RECORD_PROTOCOL = TProtocol("/pigeon/record/1.0.0")
ASK_TIMEOUT = 5.0  # seconds to dial a contact's device and have its answer

DHT_PROTOCOL = PROTOCOL_ID  # the protocol guard_dht's handler serves

# Inbound DHT streams at once.  py-libp2p opens one stream per request and
# closes it after the answer, so a genuine stream lives milliseconds; 8 per
# peer covers a peer's lookups, publishing and table refresh overlapping.  16
# in all: the library caps its handlers at 12 to keep the one event loop
# responsive, and ours spend most of their time waiting, not working.
DHT_STREAMS = StreamLimit(per_peer=8, total=16)
# A stream is reset this long after it opened: a client waits at most 10 s for
# an answer (py-libp2p's QUERY_TIMEOUT), so a stream older than that serves no
# one, and an idle one must not hold its place.
DHT_STREAM_DEADLINE = 10.0
# When all places are held, the oldest stream, if it is at least this old, is
# reset to make room: genuine ones are long done by then.
DHT_PREEMPT_AFTER = 1.0
# Largest DHT request read (py-libp2p: 4 MiB).  The largest genuine one is a
# PUT_VALUE carrying one of our records (at most MAX_RECORD_SIZE) and the
# sender's signed peer record; everything else is smaller.
DHT_MAX_REQUEST = 8 * MAX_RECORD_SIZE
# New keys a peer may store with us.  A node PUTs its own record (one key) and
# nothing else; 32 leaves room for several identities behind one peer.
DHT_RECORDS_PER_PEER = 32
# Records held in all (py-libp2p: 50,000, then the oldest is evicted).  At most
# about 9 KiB each in memory, so 4,096 are about 36 MiB.  A node holds the
# records whose keys are closest to it: about 20 x (users) / (nodes), far
# fewer than this in a network where most users run a node.  When it is full,
# new keys are refused and nothing is evicted: what was stored stays until it
# expires (24 hours), and records already held are still updated.
DHT_RECORDS_TOTAL = 4096

# The peer whose DHT stream is being served, for the value store's guard: the
# library's handler calls ``put_record`` in the stream's own task.
_storing_peer: ContextVar[ID | None] = ContextVar("storing_peer", default=None)


def _key_id(key: str) -> bytes:
    prefix = f"/{DHT_NAMESPACE}/"
    if not key.startswith(prefix) or len(key) != len(prefix) + 40:
        raise ValueError("not a pigeon directory key")
    try:
        return bytes.fromhex(key[len(prefix) :])
    except ValueError:
        raise ValueError("not a pigeon directory key") from None


class RecordValidator(Validator):
    """py-libp2p's hook: raise to refuse, return the index of the best."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock

    def validate(self, key: str, value: bytes) -> None:
        try:
            DirectoryRecord.verify(value, now=int(self.clock()), key_id=_key_id(key))
        except ProtocolError as error:
            log.info("refused directory record for %s: %s", key, error)
            raise ValueError(str(error)) from None

    def select(self, key: str, values: list[bytes]) -> int:
        records: list[DirectoryRecord | None] = []
        for value in values:
            try:
                records.append(DirectoryRecord.verify(value, now=int(self.clock())))
            except ProtocolError:
                records.append(None)
        valid = [i for i, r in enumerate(records) if r is not None]
        if not valid:
            return 0
        best = newest([record for record in records if record is not None])
        return valid[best]


def make_dht_validator(dht: KadDHT, clock: Callable[[], float] = time.time) -> None:
    dht.register_validator(DHT_NAMESPACE, RecordValidator(clock))


async def publish(
    dht: KadDHT, record: bytes, identity_key: bytes, holders: Collection[ID] = ()
) -> tuple[set[ID], list[ID]]:
    """Store our record with us and at those of the ``PUBLISH_COPIES`` peers
    closest to its key that are not among ``holders``, all at once: (the
    peers that took it, the closest peers the lookup found).

    Not py-libp2p's ``put_value``: that stores at every one of the 20 closest
    (in a network of 30, two thirds of it) while a lookup stops after three
    copies, and it marks the key as one the library republishes itself, so
    each start of a node published the record twice.  We republish
    (``Directory.run``), so the key is not left in the library's list."""
    key = dht_key(identity_key).encode()
    peers = await dht.peer_routing.find_closest_peers_network(key)
    closest = [p for p in peers if p != dht.local_peer_id][:PUBLISH_COPIES]
    stored = await store_at(dht, record, identity_key, [p for p in closest if p not in holders])
    return stored, peers


async def store_at(
    dht: KadDHT, record: bytes, identity_key: bytes, peers: Collection[ID]
) -> set[ID]:
    """Store our record with us and at ``peers``, all at once: those that took it."""
    key = dht_key(identity_key).encode()
    dht.value_store.put(key, record)
    dht.value_store.local_keys.discard(key)
    stored: set[ID] = set()

    async def store(peer: ID) -> None:
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT):
                if await dht.value_store._store_at_peer(peer, key, record):
                    stored.add(peer)
        except Exception as error:  # a peer's failure is not ours
            log.debug("storing our record at %s failed: %s", peer, error)

    async with trio.open_nursery() as nursery:
        for peer in peers:
            if peer != dht.local_peer_id:
                nursery.start_soon(store, peer)
    return stored


async def lookup(dht: KadDHT, identity_key: bytes) -> list[bytes]:
    """Copies of the record: our local one, and those of the peers closest to
    its key, until ``LOOKUP_COPIES`` of them answered with one (a publisher
    stores it at all of the closest, so more copies would mostly repeat these,
    at a request each).

    A Kademlia value lookup that stops as soon as it has them: the closest
    peers we know (our routing table first) are asked, ``LOOKUP_AT_ONCE``
    requests under way at a time; each answers with the record or with the
    peers it knows closest to the key, which join those we know, and each
    answer (or failure) starts a request to the closest not asked yet, until
    the ``LOOKUP_CLOSEST`` closest we know have all been asked.  No walk to
    the closest peers comes first (py-libp2p's
    ``find_closest_peers_network``, a dozen requests and more): where our
    table already holds a record's holders, the first requests find it, and
    otherwise answers lead closer.  A peer that is slow to answer (gone, or
    busy) holds up one request, not a round, and once every peer left has
    been asked, a lookup that holds a copy does not wait for the slow ones."""
    key = dht_key(identity_key)
    key_bytes = key.encode()
    found: list[bytes] = []
    local = dht.value_store.get(key_bytes)
    if local is not None:
        found.append(local.value)
    copies = 0
    known = set(dht.routing_table.find_local_closest_peers(key_bytes, LOOKUP_CLOSEST))
    asked = {dht.local_peer_id}
    under_way: set[ID] = set()
    answered = trio.Event()

    async def ask(peer: ID) -> None:
        nonlocal copies
        try:
            with trio.move_on_after(LOOKUP_TIMEOUT / 2):
                answer = await dht.value_store._get_from_peer(
                    peer, key_bytes, return_record=True, return_closer_peers=True
                )
                # (a Record or None, the closer peers), though typed as any of
                # the method's return shapes.
                record, closer = answer if isinstance(answer, tuple) else (None, [])
                value = getattr(record, "value", None)
                if value:
                    found.append(value)
                    copies += 1
                known.update(closer)
        except Exception as error:  # a peer's failure is not ours
            log.debug("lookup at %s failed: %s", peer, error)
        finally:
            under_way.discard(peer)
            answered.set()

    with trio.move_on_after(LOOKUP_TIMEOUT):
        async with trio.open_nursery() as nursery:
            while copies < LOOKUP_COPIES:
                closest = sort_peer_ids_by_distance(key_bytes, list(known))[:LOOKUP_CLOSEST]
                waiting = [peer for peer in closest if peer not in asked]
                if not waiting and (copies or not under_way):
                    break  # no one left to ask; a copy in hand is not held up by stragglers
                for peer in waiting[: LOOKUP_AT_ONCE - len(under_way)]:
                    asked.add(peer)
                    under_way.add(peer)
                    nursery.start_soon(ask, peer)
                await answered.wait()
                answered = trio.Event()
            nursery.cancel_scope.cancel()  # the lookup is over: requests under way are not needed
    return found


class RecordQuota:
    """Bounds the new keys each peer, and everyone together, store in a
    py-libp2p value store through PUT_VALUE.

    A key counts against the peer that first stored it, until it leaves the
    store (expired); a newer record for a key already held replaces it and
    costs nothing, since it takes no more room.
    """

    def __init__(
        self,
        store: ValueStore,
        per_peer: int = DHT_RECORDS_PER_PEER,
        total: int = DHT_RECORDS_TOTAL,
        refusals: RefusalLog = REFUSALS,
    ) -> None:
        self.store = store
        self.per_peer = per_peer
        self.total = total
        self.refusals = refusals
        self._keys: dict[ID, set[bytes]] = {}
        self._owner: dict[bytes, ID] = {}
        self._swept = -float("inf")

    def install(self) -> None:
        """Check every record a peer PUTs before the store takes it."""
        put_record = self.store.put_record

        def guarded_put_record(key: bytes, record: Record) -> None:
            peer = _storing_peer.get()
            if peer is not None:  # None: not from a peer's PUT (our own lookups)
                self.admit(peer, key)
            put_record(key, record)

        self.store.put_record = guarded_put_record  # type: ignore[method-assign]

    def admit(self, peer: ID, key: bytes) -> None:
        """Raise ValueError (the library then resets the stream) when ``peer``
        may not store ``key`` now; otherwise count it."""
        held = self.store.store
        if key in held:
            return
        keys = self._keys[peer] = {k for k in self._keys.get(peer, ()) if k in held}
        if len(keys) >= self.per_peer:
            self._refuse(peer, f"it stored {len(keys)} records (limit {self.per_peer})")
        if len(held) >= self.total:
            self._sweep()
        if len(held) >= self.total:
            self._refuse(peer, f"the store holds {len(held)} records (limit {self.total})")
        previous = self._owner.get(key)
        if previous is not None and previous in self._keys:
            self._keys[previous].discard(key)
        self._owner[key] = peer
        keys.add(key)
        if len(self._owner) > 2 * self.total:
            self._sweep()

    def _refuse(self, peer: ID, why: str) -> None:
        self.refusals.refused(peer, "peer=%s DHT record refused: %s", peer, why)
        raise ValueError(f"record refused: {why}")

    def _sweep(self) -> None:
        """Forget keys that left the store, and expired records (at most once a
        minute: it walks the whole store)."""
        now = time.monotonic()
        if now - self._swept < 60:
            return
        self._swept = now
        self.store.cleanup_expired()
        held = self.store.store
        self._owner = {k: p for k, p in self._owner.items() if k in held}
        self._keys = {}
        for key, peer in self._owner.items():
            self._keys.setdefault(peer, set()).add(key)


def guard_dht(dht: KadDHT, refusals: RefusalLog = REFUSALS) -> Handler:
    """Limit what ``dht`` serves to other peers (see the module's docstring);
    returns the handler to register for ``DHT_PROTOCOL`` in place of the
    library's own."""
    # These lean on two of the library's internals; a version without them
    # must fail here, at start, not leave the DHT unguarded.
    if not hasattr(kad_dht_module, "MAX_DHT_MESSAGE_SIZE") or not hasattr(dht, "_do_handle_stream"):
        raise RuntimeError("this py-libp2p's KadDHT has changed: the DHT cannot be guarded")
    # The library's handler reads this module global at each request.
    kad_dht_module.MAX_DHT_MESSAGE_SIZE = DHT_MAX_REQUEST
    RecordQuota(dht.value_store, refusals=refusals).install()
    slots: Slots[ID] = Slots(
        DHT_STREAMS.per_peer, DHT_STREAMS.total, preempt_after=DHT_PREEMPT_AFTER
    )

    async def handle_dht_stream(stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        slot = slots.take(peer)
        if slot is None:
            await refuse(stream, "DHT stream", slots, refusals)
            return
        storing = _storing_peer.set(peer)
        try:
            slot.cancel_scope.deadline = trio.current_time() + DHT_STREAM_DEADLINE
            with slot, slot.cancel_scope:
                # The library's per-stream loop, without its own admission
                # (12 in all, nothing per peer): ours above replaces it.
                await dht._do_handle_stream(stream)
        finally:
            _storing_peer.reset(storing)
        if slot.cancel_scope.cancelled_caught:
            await reset(stream)

    return handle_dht_stream


@dataclass
class Published:
    """One of our records as last published, and where it went."""

    record: bytes
    holders: set[ID]  # peers that took it
    known: set[ID] = field(default_factory=set)  # peers seen closest to its key since


class Directory:
    """Our record in the DHT (published at start, when asked, every
    ``REPUBLISH_EVERY``, and to new closest peers as they appear) and our
    contacts' records (looked up on demand, newest kept)."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        contacts: ContactBook,
        identity_key: bytes,
        build_record: Callable[[], bytes],
        clock: Callable[[], float],
        give_prekey: Callable[[ID], OneTimePrekey | None] | None = None,
    ) -> None:
        self.host = host
        # A fresh one-time prekey of ours for the peer asking, or None (not a
        # contact's device, or it has enough of them outstanding).
        self.give_prekey = give_prekey
        self.dht = dht
        self.contacts = contacts
        self.identity_key = identity_key
        self.build_record = build_record
        self.clock = clock
        self._republish = trio.Event()
        # Other identities this node publishes and answers for (the one it
        # moved from): key -> how to build its record.
        self._others: dict[bytes, Callable[[], bytes]] = {}
        self._published: dict[bytes, Published] = {}  # identity key -> our record
        self._publishing = trio.Lock()
        self.spreads = 0  # times the record went to new closest peers (for tests)
        self._looked_up: dict[bytes, float] = {}  # key -> when its last lookup ended
        self._looking: dict[bytes, trio.Event] = {}  # key -> set when its refresh ends
        # How long the latest lookups in the DHT took, for `metrics`.
        self.lookup_ms: collections.deque[float] = collections.deque(maxlen=LOOKUP_SAMPLES)

    def republish(self) -> None:
        self._republish.set()

    def also_publish(self, identity_key: bytes, build_record: Callable[[], bytes]) -> None:
        """Publish, and answer for, another identity's record too."""
        self._others[identity_key] = build_record

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            walk = True
            while True:
                await self.publish(walk=walk)
                walk = True
                with trio.move_on_after(REPUBLISH_EVERY):
                    await self._republish.wait()
                    walk = False
                    # what changed often changes again at once (registering
                    # with three mailboxes, one after the other): one publish
                    await trio.sleep(REPUBLISH_SETTLE)
                self._republish = trio.Event()

    async def publish(self, *, walk: bool = True) -> None:
        """Publish our records: to the closest peers a walk of the DHT finds
        (at start, and every ``REPUBLISH_EVERY``), or, when only the record
        changed (``walk`` false), to the peers that took the last one and the
        closest in our routing table, with no walk, unless none of those
        holders takes it."""
        async with self._publishing:
            for key, build in ((self.identity_key, self.build_record), *self._others.items()):
                try:
                    record = build()
                    last = self._published.get(key)
                    if not walk and last is not None and last.holders:
                        stored = await store_at(
                            self.dht, record, key, last.holders | set(self._closest(key))
                        )
                        if stored & last.holders:
                            self._published[key] = Published(record, stored, last.known)
                            log.info("directory record %s updated", short_id(key))
                            continue
                    stored, peers = await publish(self.dht, record, key)
                    self._published[key] = Published(record, stored)
                    self._seen(key, peers)
                    log.info(
                        "published directory record %s (%d copies)", short_id(key), len(stored)
                    )
                except Exception as error:
                    log.warning("publishing the directory record failed: %s", error)

    def _closest(self, key: bytes) -> list[ID]:
        """The peers closest to our record's key in our routing table."""
        table = self.dht.routing_table
        return table.find_local_closest_peers(dht_key(key).encode(), PUBLISH_COPIES)

    def _seen(self, key: bytes, peers: Collection[ID]) -> None:
        published = self._published[key]
        published.known |= {*peers, *self._closest(key), *published.holders}

    def newcomers(self) -> list[bytes]:
        """Our records with a peer among the closest to their key in our
        routing table that we did not know there."""
        return [
            key
            for key, published in self._published.items()
            if any(peer not in published.known for peer in self._closest(key))
        ]

    async def _watch(self) -> None:
        """Give our record to new closest peers as the network changes."""
        last = -math.inf
        while True:
            await trio.sleep(WATCH_EVERY)
            if not self.newcomers():
                continue
            await trio.sleep(max(SPREAD_AFTER, last + SPREAD_GAP - trio.current_time()))
            last = trio.current_time()
            await self.spread()

    async def spread(self) -> None:
        """Store each record that has newcomers among its closest peers at
        those of the closest that do not hold it (the same record: nothing
        changed in it).  No walk of the DHT: the newcomers are in our routing
        table already, and the walk, repeated by every node as a network
        starts or churns, cost more than all the stores together."""
        async with self._publishing:
            for key in self.newcomers():
                published = self._published[key]
                closest = [p for p in self._closest(key) if p not in published.holders]
                try:
                    stored = await store_at(self.dht, published.record, key, closest)
                except Exception as error:
                    log.info("spreading the directory record failed: %s", error)
                    continue
                published.holders |= stored
                self._seen(key, ())
                self.spreads += 1
                log.info(
                    "directory record %s given to %d new closest peer(s)",
                    short_id(key),
                    len(stored),
                )

    async def refresh(self, key: bytes, *, asked: bool = False) -> DirectoryRecord | None:
        """Find a contact's newest record; the newest we now hold.

        First from the contact itself, over a connection we already have to
        one of its devices (one request, and no copy is newer).  Without one,
        when the record we hold is not current: by dialing where its devices
        were (its last record, its contact code), since a node that just
        started may be in no one's routing table yet.  Otherwise, or when
        that fails, in the DHT, though not again within
        ``LOOKUP_AGAIN_AFTER`` while what we hold is current.  ``asked``:
        the caller has just asked (and dialled) the contact's devices, so
        only the DHT is left.  Callers asking while a refresh is under way
        wait for that one.
        """
        running = self._looking.get(key)
        if running is not None:
            await running.wait()
            return self.contacts.get(key).record
        done = self._looking[key] = trio.Event()
        try:
            current = not asked and (await self._ask_contact(key, dial=False))[0]
            if current:
                return self.contacts.get(key).record
            record = self.contacts.get(key).record
            if not asked and not is_current(record, self.clock()):
                current, _ = await self._ask_contact(key, dial=True)
                if current:
                    return self.contacts.get(key).record
            last = self._looked_up.get(key)
            if (
                last is None
                or trio.current_time() - last >= LOOKUP_AGAIN_AFTER
                or not is_current(record, self.clock())
            ):
                await self._look_up(key)
                self._looked_up[key] = trio.current_time()
            return self.contacts.get(key).record
        finally:
            del self._looking[key]
            done.set()

    async def _look_up(self, key: bytes) -> bool:
        """Look the record up in the DHT and keep every valid copy; whether
        one was found."""
        started = trio.current_time()
        found = await lookup(self.dht, key)
        self.lookup_ms.append((trio.current_time() - started) * 1000)
        valid = False
        for data in found:
            try:
                self.contacts.store_record(key, data, int(self.clock()))
                valid = True
            except ProtocolError as error:
                log.warning("refused a directory record for %s: %s", short_id(key), error)
        return valid

    async def probe(self, key: bytes) -> tuple[float, bool]:
        """One lookup of a contact's record in the DHT, whatever this node
        holds or is connected to: how long the DHT took (ms, as counted in
        ``lookup_ms``) and whether a valid copy was found.  For ``pigeon
        sim`` and monitoring: a node that reaches its contacts directly may
        otherwise never look one up."""
        found = await self._look_up(key)
        return self.lookup_ms[-1], found

    async def ask_prekey(self, key: bytes) -> OneTimePrekey | None:
        """A one-time prekey from the contact's own node (with its record,
        which is kept), over a connection we have or make within
        ``ASK_TIMEOUT``: no mailbox and no proof of work.  None when no device
        gave one (offline, or it does not know us as its contact yet)."""
        return (await self._ask_contact(key, dial=True, prekey=True))[1]

    async def _ask_contact(
        self, key: bytes, *, dial: bool, prekey: bool = False
    ) -> tuple[bool, OneTimePrekey | None]:
        """Ask the contact's devices for its record (and, with ``prekey``, a
        one-time prekey): those we are connected to, or (``dial``) every
        address we know.  Whether a device answered and we now hold a current
        record, and the prekey given (verified against the contact's identity
        key)."""
        record = self.contacts.get(key).record
        where: dict[ID, list[Multiaddr]] = {}  # each device, with every address we know
        for device in record.devices if record is not None else ():
            addresses = where.setdefault(ID(device.certificate.peer_id), [])
            addresses += [Multiaddr(a) for a in device.addresses]
        for hint in self.contacts.hint_addresses(key):
            with contextlib.suppress(Exception):
                found = info_from_p2p_addr(Multiaddr(hint))
                where.setdefault(found.peer_id, []).extend(found.addrs)
        network = self.host.get_network()
        for peer, addresses in where.items():
            connected = bool(network.get_connections(peer))
            if not connected and not (dial and addresses):
                continue
            info = PeerInfo(peer, addresses)
            try:
                with trio.fail_after(ASK_TIMEOUT):
                    if not connected:
                        await self.host.connect(info)
                        await self.dht.add_peer(info.peer_id)
                    stream = await self.host.new_stream(info.peer_id, [RECORD_PROTOCOL])
                    try:
                        request = RecordRequest(identity_id(key), prekey)
                        await stream.write(frame(request.encode()))
                        answer = RecordAnswer.decode(
                            await read_frame(stream, MAX_RECORD_ANSWER_FRAME, ASK_TIMEOUT)
                        )
                    finally:
                        with trio.CancelScope(shield=True), trio.move_on_after(2):
                            await stream.close()
                if answer.record is not None:
                    self.contacts.store_record(key, answer.record, int(self.clock()))
                if answer.prekey is not None and prekey:
                    one_time = OneTimePrekey.decode(answer.prekey)
                    one_time.verify(key)
                    return is_current(self.contacts.get(key).record, self.clock()), one_time
            except ProtocolError as error:  # forged: a record, a move in one, a prekey
                log.warning("refused what %s's device gave: %s", short_id(key), error)
                continue
            except Exception as error:
                log.debug("asking %s for its record failed: %s", info.peer_id, error)
                continue
            if not prekey and is_current(self.contacts.get(key).record, self.clock()):
                return True, None
        return False, None

    async def handle_record(self, stream: INetStream) -> None:
        """Answer ``RECORD_PROTOCOL``: our record, to whoever names our identity
        (what anyone who knows it can read in the DHT anyway), and a one-time
        prekey of ours when asked and ``give_prekey`` gives one to this peer."""
        peer = stream.muxed_conn.peer_id
        ours = identity_id(self.identity_key)
        builders = {
            identity_id(key): build
            for key, build in ((self.identity_key, self.build_record), *self._others.items())
        }

        def answer(data: bytes) -> bytes:
            request = RecordRequest.decode(data)
            build = builders.get(request.identity_id)
            given = None
            if request.prekey and request.identity_id == ours and self.give_prekey is not None:
                given = self.give_prekey(peer)
            return RecordAnswer(
                None if build is None else build(), given.encode() if given else None
            ).encode()

        await serve_frames(stream, MAX_RECORD_REQUEST_FRAME, answer, "record")
