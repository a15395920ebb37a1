"""The DHT directory: each identity's signed record under ``/pigeon/<id>``.

The validator is strict: a record must be signed by the identity whose ID the
key names and must not be expired; ``select`` keeps the highest sequence.
Lookups ask the network every time (py-libp2p answers from its local copy
first, which may be stale) and keep the newest valid answer.
"""

from __future__ import annotations

import logging
import time

import trio
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.records.validator import Validator

from pigeon.protocol import DirectoryRecord, ProtocolError, dht_key
from pigeon.protocol.records import DHT_NAMESPACE, newest

log = logging.getLogger("pigeon.directory")
LOOKUP_TIMEOUT = 10.0


def _key_id(key: str) -> bytes:
    prefix = f"/{DHT_NAMESPACE}/"
    if not key.startswith(prefix) or len(key) != len(prefix) + 40:
        raise ValueError("not a pigeon directory key")
    try:
        return bytes.fromhex(key[len(prefix) :])
    except ValueError:
        raise ValueError("not a pigeon directory key") from None


class RecordValidator(Validator):  # type: ignore[misc]
    """py-libp2p's hook: raise to refuse, return the index of the best."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            DirectoryRecord.verify(value, now=int(time.time()), key_id=_key_id(key))
        except ProtocolError as error:
            log.info("refused directory record for %s: %s", key, error)
            raise ValueError(str(error)) from None

    def select(self, key: str, values: list[bytes]) -> int:
        records = []
        for value in values:
            try:
                records.append(DirectoryRecord.verify(value, now=int(time.time())))
            except ProtocolError:
                records.append(None)
        valid = [i for i, r in enumerate(records) if r is not None]
        if not valid:
            return 0
        best = newest([records[i] for i in valid])  # type: ignore[misc]
        return valid[best]


def make_dht_validator(dht: KadDHT) -> None:
    dht.register_validator(DHT_NAMESPACE, RecordValidator())


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

        async def ask(peer: object) -> None:
            try:
                with trio.move_on_after(LOOKUP_TIMEOUT / 2):
                    result = await dht.value_store._get_from_peer(
                        peer, key_bytes, return_record=True
                    )
                    if result is not None and getattr(result, "value", None):
                        found.append(result.value)
            except Exception as error:  # a peer's failure is not ours
                log.debug("lookup at %s failed: %s", peer, error)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                if peer != dht.local_peer_id:
                    nursery.start_soon(ask, peer)
    return found
