"""Mailboxes on the network: the mailbox role (``pigeon daemon --mailbox``)
and the client calls senders make.  See docs/protocol/mailbox.md.

The role answers ``/pigeon/mailbox/1.0.0`` (mailbox_service.py) over what it
stores (mailbox_store.py), advertises itself in the DHT, expires old
envelopes and owners, and tells a connected owner when something arrives.
A sender pays for what it asks with the owner's deposit token when it holds
one, and with proof of work otherwise (done in a worker thread, off the
event loop).  A mailbox never sees a sender or a plaintext: only sealed
envelopes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import struct
from collections import OrderedDict
from collections.abc import Callable

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.kad_dht.provider_store import ProviderStore
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from pigeon.protocol import DirectoryRecord, OneTimePrekey, Random
from pigeon.protocol.frames import MailboxNotice
from pigeon.protocol.mailbox import (
    MAX_RESPONSE_SIZE,
    TAKE_PREKEY_WORK_BITS,
    Op,
    Request,
    Response,
    deposit_work_bits,
)

from .framing import frame, read_frame
from .mailbox_service import MailboxService
from .mailbox_store import MailboxLimits, MailboxStore
from .work import prove

log = logging.getLogger("pigeon.mailbox")

MAILBOX_PROTOCOL = TProtocol("/pigeon/mailbox/1.0.0")
NOTIFY_PROTOCOL = TProtocol("/pigeon/mailbox-notify/1.0.0")
# Mailbox peers announce themselves as providers of this DHT key (a sha2-256
# multihash, hex, of "pigeon/mailboxes/v1").
PROVIDER_KEY = "1220" + hashlib.sha256(b"pigeon/mailboxes/v1").hexdigest()
MAX_NOTIFIED = 1_000  # owners we remember telling, to send one notice at a time


def addrs(addresses: list[str] | tuple[str, ...]) -> list[multiaddr.Multiaddr]:
    """Multiaddrs to dial, without the /p2p/ suffix the peer ID already gives."""
    return [multiaddr.Multiaddr(a.split("/p2p/")[0]) for a in addresses]


async def call(host: IHost, peer: PeerInfo, requests: list[Request]) -> list[Response]:
    """Send requests to a mailbox on one stream, pipelined; responses in order."""
    with trio.fail_after(20):
        if peer.addrs:
            await host.connect(peer)
        stream = await host.new_stream(peer.peer_id, [MAILBOX_PROTOCOL])
    try:
        with trio.fail_after(20 + len(requests) / 10):
            await stream.write(b"".join(frame(request.encode()) for request in requests))
            return [Response.decode(await read_frame(stream, MAX_RESPONSE_SIZE)) for _ in requests]
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stream.close()


class MailboxStream:
    """Requests to one mailbox on one stream kept open from call to call
    (an owner's collection: several calls, each waiting on the one before);
    the stream is opened at the first call, and again after one that failed."""

    def __init__(self, host: IHost, peer: PeerInfo) -> None:
        self.host = host
        self.peer = peer
        self._stream: INetStream | None = None

    async def call(self, requests: list[Request]) -> list[Response]:
        """As ``call``: requests pipelined, responses in order."""
        try:
            if self._stream is None:
                with trio.fail_after(20):
                    if self.peer.addrs:
                        await self.host.connect(self.peer)
                    self._stream = await self.host.new_stream(self.peer.peer_id, [MAILBOX_PROTOCOL])
            stream = self._stream
            with trio.fail_after(20 + len(requests) / 10):
                await stream.write(b"".join(frame(request.encode()) for request in requests))
                return [
                    Response.decode(await read_frame(stream, MAX_RESPONSE_SIZE)) for _ in requests
                ]
        except BaseException:
            await self.close()  # a response may be missing: never read it as the next one's
            raise

    async def close(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()


def mailbox_peer(peer_id: bytes, addresses: list[str] | tuple[str, ...]) -> PeerInfo:
    return PeerInfo(ID(peer_id), addrs(addresses))


async def take_prekey(
    host: IHost, record: DirectoryRecord, token: bytes, clock: Callable[[], float]
) -> OneTimePrekey | None:
    """Ask the contact's mailboxes for one of its one-time prekeys (paying
    with its deposit token, or with work); without one, X3DH runs with three
    DHs.  The work is done once for all of them (they share the contact's
    mailbox ID), and again only when its minute has passed."""
    paid: dict[bytes, Request] = {}  # mailbox ID -> a request paid with work
    for entry in record.mailboxes:
        info = mailbox_peer(entry.peer_id, entry.addresses)
        try:
            if token:
                request = Request(Op.TAKE_PREKEY, entry.mailbox_id, token=token)
            else:
                window = int(clock() // 60)
                request = paid.get(entry.mailbox_id) or Request(Op.TAKE_PREKEY)
                if request.window < window - 1:  # none yet, or its minute is over
                    work = await prove(
                        Op.TAKE_PREKEY,
                        entry.mailbox_id,
                        struct.pack(">Q", window),
                        TAKE_PREKEY_WORK_BITS,
                        _start(),
                    )
                    request = Request(Op.TAKE_PREKEY, entry.mailbox_id, work=work, window=window)
                    paid[entry.mailbox_id] = request
            with trio.fail_after(5):
                (reply,) = await call(host, info, [request])
            if reply.ok and reply.prekey:
                prekey = OneTimePrekey.decode(reply.prekey)
                prekey.verify(record.identity_key)
                return prekey
            if not reply.ok:
                log.info("mailbox %s gave no one-time prekey: %s", info.peer_id, reply.error)
        except Exception as error:
            log.info("no one-time prekey from mailbox %s: %s", info.peer_id, error)
    return None


def _start() -> int:
    """Where to start counting work: random, so that two senders doing the
    same work do not find the same nonce."""
    return int.from_bytes(os.urandom(6), "big")


async def _with_work(box: bytes, envelope: bytes) -> Request:
    work = await prove(Op.DEPOSIT, box, envelope, deposit_work_bits(len(envelope)), _start())
    return Request(Op.DEPOSIT, box, envelope=envelope, work=work)


async def deposit(
    host: IHost,
    record: DirectoryRecord,
    pending: list[tuple[bytes, bytes]],
    token: bytes,
    ttls: dict[bytes, int] | None = None,
) -> tuple[set[bytes], list[str]]:
    """Leave every pending (digest, envelope) with every mailbox the record
    lists: (digests at least one stored, the mailboxes' refusals).  With a
    deposit token the deposits are free; a refused token, or none, means
    proof of work for each envelope (done once: it is valid at every one of
    the recipient's mailboxes, which share its mailbox ID)."""
    stored: set[bytes] = set()
    refusals: list[str] = []
    paid: dict[bytes, Request] = {}  # digest -> a deposit paid for with work
    for entry in record.mailboxes:
        info = mailbox_peer(entry.peer_id, entry.addresses)
        box = entry.mailbox_id
        requests = [
            paid.get(d) or Request(Op.DEPOSIT, box, envelope=e, token=token) for d, e in pending
        ]
        if not token:
            for (d, e), request in zip(pending, requests, strict=True):
                if not request.work:
                    paid[d] = await _with_work(box, e)
            requests = [paid[d] for d, _ in pending]
        if ttls:  # disappearing messages: the mailbox keeps them no longer than that
            requests = [
                dataclasses.replace(r, ttl_s=ttls[d]) if d in ttls else r
                for (d, _), r in zip(pending, requests, strict=True)
            ]
        try:
            replies = await call(host, info, requests)
            again = [
                i
                for i, reply in enumerate(replies)
                if not reply.ok and reply.error.startswith("deposit token refused")
            ]
            if again:  # the token expired or was not taken: pay with work instead
                for i in again:
                    d, e = pending[i]
                    paid[d] = paid.get(d) or await _with_work(box, e)
                retried = await call(
                    host,
                    info,
                    [
                        dataclasses.replace(paid[pending[i][0]], ttl_s=requests[i].ttl_s)
                        for i in again
                    ],
                )
                for i, reply in zip(again, retried, strict=True):
                    replies[i] = reply
        except Exception as error:
            log.info("mailbox %s unreachable: %s", info.peer_id, error)
            continue
        for (envelope_digest, _), reply in zip(pending, replies, strict=True):
            if reply.ok:
                stored.add(envelope_digest)
            else:
                refusals.append(reply.error)
                log.info("mailbox %s refused a deposit: %s", info.peer_id, reply.error)
    return stored, refusals


# A mailbox peer announces itself in the DHT at start and then this often (each
# time a lookup and a request to each of the 20 peers closest to the key, who
# keep it for 48 hours); expired envelopes are deleted every minute.
PROVIDE_EVERY = 10 * 60
# Between those, to each peer we did not know there that joined the closest to
# the key in our routing table (the network grew or changed: a search asks
# those), directly, with no lookup: at once while fewer than PROVIDE_TO were
# known, then at most every RESPREAD_GAP seconds.
RESPREAD_GAP = 60.0
PROVIDE_TO = 20
PROVIDE_TIMEOUT = 5.0  # seconds for one peer to take the announcement


class MailboxPeer:
    """The mailbox role (``--mailbox``): answer requests, advertise in the
    DHT, expire old envelopes, and tell a connected owner when one arrives."""

    def __init__(
        self,
        host: IHost,
        dht: KadDHT,
        store: MailboxStore,
        limits: MailboxLimits,
        interval: float,
        clock: Callable[[], float],
        random: Random,
        spawn: Callable[..., None],
    ) -> None:
        self.host = host
        self.dht = dht
        self.store = store
        self.interval = interval
        self.clock = clock
        self.spawn = spawn
        self.service = MailboxService(store, limits, clock, random)
        self.service.on_deposit = self._notify_owner
        self._pushing: OrderedDict[object, float] = OrderedDict()

    async def run(self) -> None:
        provided = spread = -math.inf
        told: set[ID] = set()  # the closest peers when we last advertised
        key = bytes.fromhex(PROVIDER_KEY)
        while True:
            closest = set(self.dht.routing_table.find_local_closest_peers(key, PROVIDE_TO))
            now = trio.current_time()
            # at once while we knew fewer peers than should hold it (at start: none)
            soon = len(told) < PROVIDE_TO or now - spread >= RESPREAD_GAP
            try:
                if now - provided >= PROVIDE_EVERY:
                    await self.dht.provide(PROVIDER_KEY)  # a walk, then the closest it found
                    provided = spread = now
                    told = closest
                elif closest - told and soon:
                    await self._tell(key, closest - told)
                    spread = now
                    told = closest
            except Exception as error:
                log.warning("advertising the mailbox failed: %s", error)
            expired = self.store.expire(int(self.clock()))
            if expired:
                log.info("deleted %d expired envelopes", expired)
            await trio.sleep(min(60.0, self.interval))

    async def _tell(self, key: bytes, peers: set[ID]) -> None:
        """Advertise to peers newly closest to the key in our routing table,
        with no walk: they are known already (every node of a starting
        network walking for each of them cost more than the requests)."""
        store = self.dht.provider_store
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self._tell_one, store, key, peer)

    @staticmethod
    async def _tell_one(store: ProviderStore, key: bytes, peer: ID) -> None:
        with trio.move_on_after(PROVIDE_TIMEOUT):
            await store._send_add_provider(peer, key)  # logs and returns False on failure

    def _notify_owner(self, box: bytes, peer: object) -> None:
        now = trio.current_time()
        if self._pushing.get(peer, -1.0) > now - 0.2:
            return  # a notice is already on its way; the owner collects everything
        self._pushing[peer] = now
        self._pushing.move_to_end(peer)
        while len(self._pushing) > MAX_NOTIFIED:
            self._pushing.popitem(last=False)
        if isinstance(peer, ID) and self.host.get_network().get_connections(peer):
            self.spawn(self._push_notice, peer, box)

    async def _push_notice(self, peer: ID, box: bytes) -> None:
        try:
            with trio.fail_after(5):
                stream = await self.host.new_stream(peer, [NOTIFY_PROTOCOL])
                await stream.write(frame(MailboxNotice(box).encode()))
                await stream.close()
        except Exception as error:
            log.debug("mailbox notice to %s failed: %s", peer, error)
