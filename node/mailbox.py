"""Mailbox peers: store-and-forward of sealed envelopes for offline contacts.

Server side (``pigeon daemon --mailbox``): ``MailboxStore`` keeps envelopes
in the node's own encrypted database, committed with fsync before a deposit
is acknowledged; ``MailboxService`` answers ``/pigeon/mailbox/1.0.0`` with
per-owner quotas, a per-depositor rate limit, expiry, and owner-only pickup
proven over single-use challenges.  Client side: ``call`` makes one request.
The store never sees a sender or a plaintext: only sealed envelopes.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from pigeon.protocol import DecryptError, DirectoryRecord, OneTimePrekey, PigeonError
from pigeon.protocol.frames import MailboxNotice
from pigeon.protocol.keys import verify_signature
from pigeon.protocol.mailbox import (
    ITEM_ID_SIZE,
    MAX_ITEMS,
    MAX_PAGE_BYTES,
    MAX_REQUEST_SIZE,
    MAX_RESPONSE_SIZE,
    NONCE_SIZE,
    Item,
    Op,
    Request,
    Response,
    mailbox_id,
    proof_message,
)

from .framing import frame, read_frame, serve_frames
from .storage import Database

log = logging.getLogger("pigeon.mailbox")

MAILBOX_PROTOCOL = TProtocol("/pigeon/mailbox/1.0.0")
NOTIFY_PROTOCOL = TProtocol("/pigeon/mailbox-notify/1.0.0")
# Mailbox peers announce themselves as providers of this DHT key (a sha2-256
# multihash, hex, of "pigeon/mailboxes/v1").
PROVIDER_KEY = "1220" + hashlib.sha256(b"pigeon/mailboxes/v1").hexdigest()


@dataclass(frozen=True)
class MailboxLimits:
    default_ttl: int = 30 * 24 * 3600
    max_ttl: int = 30 * 24 * 3600
    quota_messages: int = 10_000
    quota_bytes: int = 256 * 1024 * 1024
    deposits_per_minute: int = 60
    challenge_ttl: float = 60.0


class MailboxRefused(PigeonError):
    """A mailbox said no; the message says why, for the sender to act on."""


class MailboxStore:
    def __init__(self, db: Database, limits: MailboxLimits) -> None:
        self.db = db
        self.limits = limits

    def register(self, public_key: bytes, now: int) -> bytes:
        box = mailbox_id(public_key)
        self.db.execute(
            "INSERT INTO mailbox_owners (mailbox_id, public_key, registered_at, quota_messages,"
            " quota_bytes) VALUES (?, ?, ?, ?, ?) ON CONFLICT (mailbox_id) DO NOTHING",
            (box, public_key, now, self.limits.quota_messages, self.limits.quota_bytes),
        )
        return box

    def owner_key(self, box: bytes) -> bytes | None:
        row = self.db.one("SELECT public_key FROM mailbox_owners WHERE mailbox_id = ?", (box,))
        return None if row is None else bytes(row[0])

    def deposit(self, box: bytes, envelope: bytes, ttl: int, now: int) -> bytes:
        """Store durably (the commit is fsynced) and return the item ID."""
        with self.db.transaction():
            owner = self.db.one(
                "SELECT quota_messages, quota_bytes FROM mailbox_owners WHERE mailbox_id = ?",
                (box,),
            )
            if owner is None:
                raise MailboxRefused("no such mailbox here")
            count, size = self.db.one(
                "SELECT count(*), coalesce(sum(size), 0) FROM mailbox_items WHERE mailbox_id = ?",
                (box,),
            )
            if count + 1 > owner[0] or size + len(envelope) > owner[1]:
                raise MailboxRefused("the recipient's mailbox is full; try again later")
            item_id = os.urandom(ITEM_ID_SIZE)
            ttl = min(ttl or self.limits.default_ttl, self.limits.max_ttl)
            self.db.execute(
                "INSERT INTO mailbox_items (id, mailbox_id, envelope, size, deposited_at,"
                " expires_at) VALUES (?, ?, ?, ?, ?, ?)",
                (item_id, box, envelope, len(envelope), now, now + ttl),
            )
        return item_id

    def fetch(self, box: bytes, limit: int) -> tuple[list[Item], bool]:
        """The oldest items, up to ``limit`` of them and MAX_PAGE_BYTES of
        envelopes (at least one), and whether more wait.  Sizes are read
        first, so no more than one page of envelopes is ever in memory."""
        chosen: list[bytes] = []
        total = 0
        more = False
        for item_id, size in self.db.all(
            "SELECT id, size FROM mailbox_items WHERE mailbox_id = ?"
            " ORDER BY deposited_at, rowid LIMIT ?",
            (box, limit + 1),
        ):
            if len(chosen) == limit or (chosen and total + size > MAX_PAGE_BYTES):
                more = True
                break
            chosen.append(bytes(item_id))
            total += size
        items = []
        for item_id in chosen:
            row = self.db.one(
                "SELECT envelope, deposited_at FROM mailbox_items WHERE id = ?", (item_id,)
            )
            if row is not None:
                items.append(Item(item_id, bytes(row[0]), row[1]))
        return items, more

    def delete(self, box: bytes, item_ids: tuple[bytes, ...]) -> None:
        with self.db.transaction():
            for item_id in item_ids:
                self.db.execute(
                    "DELETE FROM mailbox_items WHERE id = ? AND mailbox_id = ?", (item_id, box)
                )

    def add_prekeys(self, box: bytes, prekeys: tuple[bytes, ...]) -> int:
        with self.db.transaction():
            for raw in prekeys:
                prekey = OneTimePrekey.decode(raw)
                self.db.execute(
                    "INSERT OR IGNORE INTO mailbox_prekeys (mailbox_id, prekey_id, prekey)"
                    " VALUES (?, ?, ?)",
                    (box, prekey.prekey_id, raw),
                )
        return self.prekeys_left(box)

    def take_prekey(self, box: bytes) -> bytes:
        """Hand out one prekey and forget it in the same transaction: never twice."""
        with self.db.transaction():
            row = self.db.one(
                "SELECT prekey_id, prekey FROM mailbox_prekeys WHERE mailbox_id = ?"
                " ORDER BY prekey_id LIMIT 1",
                (box,),
            )
            if row is None:
                return b""
            self.db.execute(
                "DELETE FROM mailbox_prekeys WHERE mailbox_id = ? AND prekey_id = ?", (box, row[0])
            )
            return bytes(row[1])

    def prekeys_left(self, box: bytes) -> int:
        return int(
            self.db.one("SELECT count(*) FROM mailbox_prekeys WHERE mailbox_id = ?", (box,))[0]
        )

    def expire(self, now: int) -> int:
        with self.db.transaction():
            cursor = self.db.execute("DELETE FROM mailbox_items WHERE expires_at <= ?", (now,))
            return int(cursor.rowcount)

    def usage(self) -> list[dict[str, object]]:
        return [
            {"mailbox": bytes(r[0]).hex(), "messages": r[1], "bytes": r[2]}
            for r in self.db.all(
                "SELECT o.mailbox_id, count(i.id), coalesce(sum(i.size), 0) FROM mailbox_owners o"
                " LEFT JOIN mailbox_items i ON i.mailbox_id = o.mailbox_id GROUP BY o.mailbox_id"
            )
        ]


class MailboxService:
    """The protocol handler: one request, one response, per frame."""

    def __init__(
        self, store: MailboxStore, limits: MailboxLimits, clock: Callable[[], float] = time.time
    ) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self._challenges: dict[bytes, tuple[bytes, float]] = {}
        self._deposits: dict[object, collections.deque[float]] = {}
        # mailbox -> the peer that last proved it owns it: pushed to on deposits
        self.owners_seen: dict[bytes, object] = {}
        self.on_deposit: Callable[[bytes, object], None] | None = None
        self.stats = {"deposits": 0, "refused": 0, "fetched": 0}

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        await serve_frames(
            stream, MAX_REQUEST_SIZE, lambda data: self.answer(data, peer).encode(), "mailbox"
        )

    def answer(self, data: bytes, peer: object) -> Response:
        try:
            request = Request.decode(data)
            return self._answer(request, peer)
        except MailboxRefused as error:
            self.stats["refused"] += 1
            log.info("peer=%s mailbox request refused: %s", peer, error)
            return Response(ok=False, error=str(error))
        except DecryptError:
            self.stats["refused"] += 1
            log.warning("peer=%s mailbox proof refused", peer)
            return Response(ok=False, error="proof refused")

    def _answer(self, request: Request, peer: object) -> Response:
        now = self.clock()
        if request.op == Op.REGISTER:
            box = self.store.register(request.public_key, int(now))
            return Response(ok=True, item_id=box)
        if request.op == Op.DEPOSIT:
            self._rate_limit(peer, now)
            item_id = self.store.deposit(
                request.mailbox_id, request.envelope, request.ttl_s, int(now)
            )
            self.stats["deposits"] += 1
            owner = self.owners_seen.get(request.mailbox_id)
            if owner is not None and self.on_deposit is not None:
                self.on_deposit(request.mailbox_id, owner)
            return Response(ok=True, item_id=item_id)
        if request.op == Op.CHALLENGE:
            self._forget_old_challenges(now)
            nonce = os.urandom(NONCE_SIZE)
            self._challenges[nonce] = (request.mailbox_id, now + self.limits.challenge_ttl)
            return Response(ok=True, nonce=nonce)
        if request.op == Op.TAKE_PREKEY:
            self._rate_limit(peer, now)
            if self.store.owner_key(request.mailbox_id) is None:
                raise MailboxRefused("no such mailbox here")
            return Response(ok=True, prekey=self.store.take_prekey(request.mailbox_id))
        # the owner's operations: prove the mailbox key over a fresh, single-use challenge
        self._check_proof(request, now)
        box = request.mailbox_id
        self.owners_seen[box] = peer
        if request.op == Op.FETCH:
            items, more = self.store.fetch(box, request.limit or MAX_ITEMS)
            self.stats["fetched"] += len(items)
            return Response(
                ok=True, items=tuple(items), prekeys_left=self.store.prekeys_left(box), more=more
            )
        if request.op == Op.ADD_PREKEYS:
            return Response(ok=True, prekeys_left=self.store.add_prekeys(box, request.prekeys))
        self.store.delete(box, request.item_ids)
        return Response(ok=True)

    def _check_proof(self, request: Request, now: float) -> None:
        challenge = self._challenges.pop(request.nonce, None)
        key = self.store.owner_key(request.mailbox_id)
        if challenge is None or challenge[0] != request.mailbox_id or challenge[1] < now:
            raise DecryptError()
        if key is None:
            raise DecryptError()
        verify_signature(
            key,
            proof_message(
                request.op,
                request.mailbox_id,
                request.nonce,
                request.prekeys if request.op == Op.ADD_PREKEYS else request.item_ids,
            ),
            request.signature,
        )

    def _forget_old_challenges(self, now: float) -> None:
        if len(self._challenges) > 10_000:
            for nonce in [n for n, (_, t) in self._challenges.items() if t < now]:
                del self._challenges[nonce]
            if len(self._challenges) > 10_000:
                raise MailboxRefused("too many open challenges; try again later")

    def _rate_limit(self, peer: object, now: float) -> None:
        window = self._deposits.setdefault(peer, collections.deque())
        while window and window[0] < now - 60:
            window.popleft()
        if len(window) >= self.limits.deposits_per_minute:
            raise MailboxRefused(
                f"rate limit: at most {self.limits.deposits_per_minute} deposits a minute;"
                " retry later"
            )
        window.append(now)


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


def mailbox_peer(peer_id: bytes, addresses: list[str] | tuple[str, ...]) -> PeerInfo:
    return PeerInfo(ID(peer_id), addrs(addresses))


async def take_prekey(host: IHost, record: DirectoryRecord) -> OneTimePrekey | None:
    """Ask the contact's mailboxes for one of its one-time prekeys; without
    one, X3DH runs with three DHs."""
    for entry in record.mailboxes:
        info = mailbox_peer(entry.peer_id, entry.addresses)
        try:
            with trio.fail_after(5):
                (reply,) = await call(host, info, [Request(Op.TAKE_PREKEY, entry.mailbox_id)])
            if reply.ok and reply.prekey:
                prekey = OneTimePrekey.decode(reply.prekey)
                prekey.verify(record.identity_key)
                return prekey
        except Exception as error:
            log.info("no one-time prekey from mailbox %s: %s", info.peer_id, error)
    return None


async def deposit(
    host: IHost, record: DirectoryRecord, pending: list[tuple[bytes, bytes]]
) -> tuple[set[bytes], list[str]]:
    """Leave every pending (digest, envelope) with every mailbox the record
    lists: (digests at least one stored, the mailboxes' refusals)."""
    stored: set[bytes] = set()
    refusals: list[str] = []
    for entry in record.mailboxes:
        info = mailbox_peer(entry.peer_id, entry.addresses)
        requests = [Request(Op.DEPOSIT, entry.mailbox_id, envelope=e) for _, e in pending]
        try:
            replies = await call(host, info, requests)
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
        spawn: Callable[..., None],
    ) -> None:
        self.host = host
        self.dht = dht
        self.store = store
        self.interval = interval
        self.clock = clock
        self.spawn = spawn
        self.service = MailboxService(store, limits, clock)
        self.service.on_deposit = self._notify_owner
        self._pushing: dict[object, float] = {}

    async def run(self) -> None:
        while True:
            try:
                await self.dht.provide(PROVIDER_KEY)
            except Exception as error:
                log.warning("advertising the mailbox failed: %s", error)
            expired = self.store.expire(int(self.clock()))
            if expired:
                log.info("deleted %d expired envelopes", expired)
            await trio.sleep(min(60.0, self.interval))

    def _notify_owner(self, box: bytes, peer: object) -> None:
        now = trio.current_time()
        if self._pushing.get(peer, -1.0) > now - 0.2:
            return  # a notice is already on its way; the owner collects everything
        self._pushing[peer] = now
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
