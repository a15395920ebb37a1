"""The DHT directory: each identity's signed record under ``/pigeon/<id>``.

The validator is strict: a record must be signed by the identity whose ID the
key names and must not be expired; ``select`` keeps the highest sequence.
Lookups ask the network every time (py-libp2p answers from its local copy
first, which may be stale) and keep the newest valid answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.records.validator import Validator
from multiaddr import Multiaddr

from pigeon.protocol import DirectoryRecord, ProtocolError, dht_key
from pigeon.protocol.records import DHT_NAMESPACE, newest

from .contacts import ContactBook, is_current, short_id

log = logging.getLogger("pigeon.directory")
LOOKUP_TIMEOUT = 10.0
REPUBLISH_EVERY = 30 * 60


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


async def publish(dht: KadDHT, record: bytes, identity_key: bytes) -> None:
    await dht.put_value(dht_key(identity_key), record)


async def lookup(dht: KadDHT, identity_key: bytes) -> list[bytes]:
    """Every copy of the record we can find: local and from the closest peers."""
    key = dht_key(identity_key)
    key_bytes = key.encode()
    found: list[bytes] = []
    local = dht.value_store.get(key_bytes)
    if local is not None:
        found.append(local.value)
    with trio.move_on_after(LOOKUP_TIMEOUT):
        peers = await dht.peer_routing.find_closest_peers_network(key_bytes)

        async def ask(peer: ID) -> None:
            try:
                with trio.move_on_after(LOOKUP_TIMEOUT / 2):
                    result = await dht.value_store._get_from_peer(
                        peer, key_bytes, return_record=True
                    )
                    # A Record (return_record=True) or None, though typed as any of
                    # the method's return shapes.
                    value = getattr(result, "value", None)
                    if value:
                        found.append(value)
            except Exception as error:  # a peer's failure is not ours
                log.debug("lookup at %s failed: %s", peer, error)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer != dht.local_peer_id:
                    nursery.start_soon(ask, peer)
    return found


class Directory:
    """Our record in the DHT (published at start, when asked, and every 30
    minutes) and our contacts' records (looked up on demand, newest kept)."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        contacts: ContactBook,
        identity_key: bytes,
        build_record: Callable[[], bytes],
        clock: Callable[[], float],
    ) -> None:
        self.host = host
        self.dht = dht
        self.contacts = contacts
        self.identity_key = identity_key
        self.build_record = build_record
        self.clock = clock
        self._republish = trio.Event()

    def republish(self) -> None:
        self._republish.set()

    async def run(self) -> None:
        while True:
            await self.publish()
            with trio.move_on_after(REPUBLISH_EVERY):
                await self._republish.wait()
            self._republish = trio.Event()

    async def publish(self) -> None:
        try:
            await publish(self.dht, self.build_record(), self.identity_key)
            log.info("published directory record")
        except Exception as error:
            log.warning("publishing the directory record failed: %s", error)

    async def refresh(self, key: bytes) -> DirectoryRecord | None:
        """Ask the network for a contact's record; the newest we now hold.

        When that is not current and we know where the contact's devices
        were (its last record, its contact code), dial them and ask again:
        a node holds its own record, and a node that just started may know no
        other peer to ask.
        """
        await self._look_up(key)
        contact = self.contacts.get(key)
        if is_current(contact.record, self.clock()):
            return contact.record
        if await self._dial_known(key, contact.record):
            await self._look_up(key)
        return self.contacts.get(key).record

    async def _look_up(self, key: bytes) -> None:
        for data in await lookup(self.dht, key):
            try:
                self.contacts.store_record(key, data, int(self.clock()))
            except ProtocolError as error:
                log.info("ignored a directory record for %s: %s", short_id(key), error)

    async def _dial_known(self, key: bytes, record: DirectoryRecord | None) -> bool:
        infos = [
            PeerInfo(ID(device.certificate.peer_id), [Multiaddr(a) for a in device.addresses])
            for device in (record.devices if record is not None else ())
            if device.addresses
        ]
        for hint in self.contacts.hint_addresses(key):
            with contextlib.suppress(Exception):
                infos.append(info_from_p2p_addr(Multiaddr(hint)))
        reached = False
        for info in infos:
            try:
                with trio.fail_after(5):
                    await self.host.connect(info)
                    await self.dht.add_peer(info.peer_id)
                reached = True
            except Exception as error:
                log.debug("dial %s for a record failed: %s", info.peer_id, error)
        return reached
