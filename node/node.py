"""The running node: a libp2p host, the DHT directory, direct delivery of
sealed envelopes, presence, mailboxes (as owner and, with ``--mailbox``, as
server) and the conversations database, wired together on trio.  The wire
protocols are in docs/protocol/delivery.md and docs/protocol/mailbox.md.

Delivery protocol ``/pigeon/envelope/1.0.0`` (docs/protocol/delivery.md): the
sender writes frames ``Deliver {1: envelope (repeated)}``; the receiver
commits the whole frame in one transaction, then answers with
``Ack {1: entry (repeated) {1: SHA-256(envelope), 2: status}}`` (status 0
stored, 1 duplicate, 2 refused).  The sender keeps each envelope in its outbox
until acknowledged and retries with backoff.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream, INotifee
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from pigeon.protocol import (
    ContactCode,
    DeviceCertificate,
    DirectoryRecord,
    OneTimePrekey,
    PigeonError,
    ProtocolError,
)
from pigeon.protocol.crypto import sha256
from pigeon.protocol.envelope import MAX_ENVELOPE
from pigeon.protocol.mailbox import Op, Request
from pigeon.protocol.records import Device, MailboxEntry
from pigeon.protocol.wire import Fields, Writer

from . import directory
from .conversations import Contact, Conversations, NoRoute
from .framing import ACK_DUPLICATE, ACK_REFUSED, ACK_STORED, StreamClosed, frame, read_frame
from .host import build_host, close_host
from .mailbox import (
    MAILBOX_PROTOCOL,
    NOTIFY_PROTOCOL,
    PROVIDER_KEY,
    MailboxLimits,
    MailboxService,
    MailboxStore,
    addrs,
)
from .mailbox import call as mailbox_call
from .mailbox_owner import MailboxOwner
from .storage import Database

log = logging.getLogger("pigeon.node")

ENVELOPE_PROTOCOL = TProtocol("/pigeon/envelope/1.0.0")
PRESENCE_PROTOCOL = TProtocol("/pigeon/presence/1.0.0")
MAX_FRAME = 2 * MAX_ENVELOPE
MAX_BATCH = 128  # envelopes per frame
STREAM_IDLE = 2.0  # seconds a delivery stream waits for more before closing
RECORD_LIFETIME = 24 * 3600
REPUBLISH_EVERY = 30 * 60


@dataclass
class NodeConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    announce_presence: bool = True
    serve_mailbox: bool = False
    mailbox_count: int = 3
    mailbox_interval: float = 30.0  # seconds between mailbox collections and checks
    mailbox_limits: MailboxLimits = field(default_factory=MailboxLimits)


class Node:
    def __init__(self, db: Database, config: NodeConfig) -> None:
        self.db = db
        self.config = config
        self.conversations = Conversations(db, os.urandom)
        self.host: IHost = build_host(self.conversations.device_seed, config.listen)
        self.dht = KadDHT(self.host, DHTMode.SERVER, strict_validation=True)
        directory.make_dht_validator(self.dht)
        self.started = time.time()
        self._outbox_wakeup = trio.Event()
        self._contact_wakeup: dict[bytes, trio.Event] = {}
        self._delivering: set[bytes] = set()
        self._new_messages = trio.Event()
        self._backoff: dict[bytes, tuple[int, float]] = {}
        self._nursery: trio.Nursery | None = None
        self._present: set[ID] = set()  # contact devices that announced themselves
        self._greeted: set[ID] = set()  # contact devices we announced ourselves to
        self.stats = {"received": 0, "sent": 0, "refused": 0, "deposited": 0}
        self.mailbox_service: MailboxService | None = None
        if config.serve_mailbox:
            store = MailboxStore(db, config.mailbox_limits)
            self.mailbox_service = MailboxService(store, config.mailbox_limits)
        self.owner = MailboxOwner(self)
        self._republish = trio.Event()
        self._pushing: dict[Any, float] = {}

    # -- lifecycle ------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen]
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run(listen_addrs=listen))
            await stack.enter_async_context(background_trio_service(self.dht))
            stack.push_async_callback(close_host, self.host)
            self.host.set_stream_handler(ENVELOPE_PROTOCOL, self._handle_envelopes)
            self.host.set_stream_handler(PRESENCE_PROTOCOL, self._handle_presence)
            self.host.set_stream_handler(NOTIFY_PROTOCOL, self.owner.handle_notify)
            if self.mailbox_service is not None:
                self.host.set_stream_handler(MAILBOX_PROTOCOL, self.mailbox_service.handle)
                self.mailbox_service.on_deposit = self._notify_owner
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery = nursery
            self.host.get_network().register_notifee(_Connections(self))
            await self._bootstrap()
            nursery.start_soon(self._publish_loop)
            nursery.start_soon(self._outbox_loop)
            nursery.start_soon(self.owner.run)
            if self.mailbox_service is not None:
                nursery.start_soon(self._mailbox_service_loop)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    async def _bootstrap(self) -> None:
        for address in self.config.bootstrap:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                with trio.fail_after(10):
                    await self.host.connect(info)
                await self.dht.add_peer(info.peer_id)
                log.info("bootstrap peer=%s connected", info.peer_id)
            except Exception as error:
                log.warning("bootstrap address=%s failed: %s", address, error)

    # -- identity -------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()]

    def contact_code(self) -> str:
        return ContactCode(
            self.conversations.identity.public_key, self.conversations.name, tuple(self.addresses)
        ).to_uri()

    def record(self) -> bytes:
        conv = self.conversations
        now = int(time.time())
        cert = DeviceCertificate.issue(conv.identity, self.host.get_id().to_bytes(), now)
        record = DirectoryRecord(
            identity_key=conv.identity.public_key,
            name=conv.name,
            sequence=conv.next_record_sequence(),
            issued_at=now,
            expires_at=now + RECORD_LIFETIME,
            signed_prekey=conv.current_signed_prekey(),
            devices=(Device(cert, tuple(self.addresses)),),
            mailboxes=tuple(
                MailboxEntry(peer_id, self.owner.mailbox_id, tuple(addresses))
                for peer_id, addresses in self.owner.my_mailboxes()
            ),
        )
        return record.sign(conv.identity)

    async def _publish_loop(self) -> None:
        while True:
            await self.publish()
            with trio.move_on_after(REPUBLISH_EVERY):
                await self._republish.wait()
            self._republish = trio.Event()

    async def publish(self) -> None:
        try:
            await directory.publish(self.dht, self.record(), self.conversations.identity.public_key)
            log.info("published directory record")
        except Exception as error:
            log.warning("publishing the directory record failed: %s", error)

    def _notify_owner(self, box: bytes, peer: Any) -> None:
        """As a mailbox: tell a connected owner that something arrived for it."""
        if self._pushing.get(peer, 0.0) > time.monotonic() - 0.2:
            return  # a push is already on its way; the owner collects everything
        self._pushing[peer] = time.monotonic()
        if self.host.get_network().get_connections(peer):
            self.spawn(self._push_notice, peer, box)

    async def _push_notice(self, peer: ID, box: bytes) -> None:
        try:
            with trio.fail_after(5):
                stream = await self.host.new_stream(peer, [NOTIFY_PROTOCOL])
                await stream.write(frame(Writer().bytes_(1, box).finish()))
                await stream.close()
        except Exception as error:
            log.debug("mailbox push to %s failed: %s", peer, error)

    async def _take_one_time_prekey(self, record: DirectoryRecord) -> OneTimePrekey | None:
        """Ask the contact's mailboxes for a one-time prekey; without one, X3DH
        runs with three DHs."""
        for entry in record.mailboxes:
            info = PeerInfo(ID(entry.peer_id), addrs(entry.addresses))
            try:
                with trio.fail_after(5):
                    (reply,) = await mailbox_call(
                        self.host, info, [Request(Op.TAKE_PREKEY, entry.mailbox_id)]
                    )
                if reply.ok and reply.prekey:
                    prekey = OneTimePrekey.decode(reply.prekey)
                    prekey.verify(record.identity_key)
                    return prekey
            except Exception as error:
                log.info("no one-time prekey from mailbox %s: %s", info.peer_id, error)
        return None

    # -- mailboxes: serving others ----------------------------------------------------------

    async def _mailbox_service_loop(self) -> None:
        assert self.mailbox_service is not None
        while True:
            try:
                await self.dht.provide(PROVIDER_KEY)
            except Exception as error:
                log.warning("advertising the mailbox failed: %s", error)
            expired = self.mailbox_service.store.expire(int(time.time()))
            if expired:
                log.info("deleted %d expired envelopes", expired)
            await trio.sleep(min(60.0, self.config.mailbox_interval))

    # -- contacts -------------------------------------------------------------------------

    async def refresh_record(self, key: bytes) -> DirectoryRecord | None:
        best = None
        for data in await directory.lookup(self.dht, key):
            try:
                record = self.conversations.store_record(key, data)
            except ProtocolError as error:
                log.info("ignored a directory record for %s: %s", key.hex()[:8], error)
                continue
            if record is not None and (best is None or record.sequence > best.sequence):
                best = record
        return best or self.conversations.contact(key).record

    def is_online(self, contact: Contact) -> bool:
        """Online: a live connection to one of its devices, which announced itself."""
        if contact.record is None:
            return False
        network = self.host.get_network()
        for device in contact.record.devices:
            peer = ID(device.certificate.peer_id)
            if peer in self._present and network.get_connections(peer):
                return True
        return False

    def contact_for_peer(self, peer: ID) -> bytes | None:
        raw = peer.to_bytes()
        for contact in self.conversations.contacts():
            if contact.record is not None and any(
                d.certificate.peer_id == raw for d in contact.record.devices
            ):
                return contact.identity_key
        return None

    async def peer_connected(self, peer: ID) -> None:
        """A contact's device is reachable: retry its queue now, and say hello."""
        if self.owner.is_mailbox(peer):
            self.owner.collect_now.set()  # reconnected to one of our mailboxes
        key = self.contact_for_peer(peer)
        if key is None:
            return
        self._backoff.pop(key, None)
        self.wake_outbox(key)
        await self.greet(peer)

    async def greet(self, peer: ID) -> None:
        """Tell a contact's device, once per connection, that we are online."""
        if not self.config.announce_presence or peer in self._greeted:
            return
        if self.contact_for_peer(peer) is None:
            return
        self._greeted.add(peer)
        try:
            with trio.fail_after(5):
                stream = await self.host.new_stream(peer, [PRESENCE_PROTOCOL])
                await stream.write(frame(Writer().uint(1, 1).finish()))
                if Fields(await read_frame(stream, 16, timeout=5)).uint(1, maximum=1):
                    self._present.add(peer)
                await stream.close()
        except Exception as error:
            self._greeted.discard(peer)
            log.debug("presence hello to %s failed: %s", peer, error)

    def peer_disconnected(self, peer: ID) -> None:
        self._present.discard(peer)
        self._greeted.discard(peer)

    async def _handle_presence(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            announce = Fields(await read_frame(stream, 16, timeout=5)).uint(1, maximum=1)
            key = self.contact_for_peer(peer)
            if key is not None and announce:
                self._present.add(peer)
                self.conversations.saw(key)
            # answer with our own presence, to contacts only
            ours = int(key is not None and self.config.announce_presence)
            await stream.write(frame(Writer().uint(1, ours).finish()))
        except Exception as error:
            log.info("peer=%s sent a bad presence frame: %s", peer, type(error).__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()

    # -- sending ----------------------------------------------------------------------------

    async def send_text(self, contact: Contact, text: str) -> bytes:
        record = contact.record
        one_time_prekey = None
        if self.conversations.needs_bundle(contact.identity_key):
            if record is None:
                record = await self.refresh_record(contact.identity_key)
            if record is None:
                raise NoRoute(
                    f"cannot find {contact.label}'s directory record: is the network reachable?"
                )
            one_time_prekey = await self._take_one_time_prekey(record)
            log.info(
                "starting a session with %s %s a one-time prekey",
                contact.label,
                "with" if one_time_prekey else "without",
            )
        app = self.conversations.send_text(contact.identity_key, text, record, one_time_prekey)
        self.wake_outbox(contact.identity_key)
        return app.message_id

    def wake_outbox(self, key: bytes | None = None) -> None:
        self._outbox_wakeup.set()
        keys = list(self._contact_wakeup) if key is None else [key]
        for k in keys:
            event = self._contact_wakeup.get(k)
            if event is not None:
                event.set()

    async def _outbox_loop(self) -> None:
        assert self._nursery is not None
        while True:
            now = trio.current_time()
            for key in self.conversations.contacts_with_pending():
                not_before = self._backoff.get(key, (0, 0.0))[1]
                if key not in self._delivering and now >= not_before:
                    self._delivering.add(key)
                    self._nursery.start_soon(self._deliver, key)
            with trio.move_on_after(1.0):
                await self._outbox_wakeup.wait()
            self._outbox_wakeup = trio.Event()

    async def _peers_for(self, contact: Contact) -> list[PeerInfo]:
        infos: list[PeerInfo] = []
        if contact.record is not None:
            for device in contact.record.devices:
                peer = ID(device.certificate.peer_id)
                addrs = [multiaddr.Multiaddr(a) for a in device.addresses]
                infos.append(PeerInfo(peer, addrs))
        for hint in self.conversations.hint_addresses(contact.identity_key):
            try:
                infos.append(info_from_p2p_addr(multiaddr.Multiaddr(hint)))
            except Exception:
                continue
        return infos

    async def _deliver(self, key: bytes) -> None:
        try:
            contact = self.conversations.contact(key)
            delivered = await self._deliver_to(contact)
            if not delivered:
                record = await self.refresh_record(key)
                if record is not None:
                    contact = self.conversations.contact(key)
                    delivered = await self._deliver_to(contact)
            if not delivered and contact.record is not None and contact.record.mailboxes:
                delivered = await self._deposit(contact)
            if delivered:
                self._backoff.pop(key, None)
            else:
                attempts = self._backoff.get(key, (0, 0.0))[0] + 1
                delay = min(60.0, 0.5 * math.pow(2, attempts))
                self._backoff[key] = (attempts, trio.current_time() + delay)
                log.info("delivery to %s failed, retry in %.1fs", contact.label, delay)
        finally:
            self._delivering.discard(key)
            self.wake_outbox()

    async def _deliver_to(self, contact: Contact) -> bool:
        for info in await self._peers_for(contact):
            try:
                with trio.fail_after(10):
                    if info.addrs:
                        await self.host.connect(info)
                    stream = await self.host.new_stream(info.peer_id, [ENVELOPE_PROTOCOL])
            except Exception as error:
                log.debug("dial %s failed: %s", info.peer_id, error)
                continue
            key = contact.identity_key
            try:
                # Keep the stream while messages keep coming: opening one costs
                # more than sending a batch on it.
                while True:
                    self._contact_wakeup[key] = trio.Event()
                    await self._push(stream, key)
                    self.conversations.saw(key)
                    self.spawn(self.greet, info.peer_id)
                    with trio.move_on_after(STREAM_IDLE):
                        await self._contact_wakeup[key].wait()
                    if not self.conversations.pending_envelopes(key, limit=1):
                        return True
            except Exception as error:
                log.info("delivery stream to %s broke: %s", contact.label, error)
            finally:
                self._contact_wakeup.pop(key, None)
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await stream.close()
        return False

    async def _deposit(self, contact: Contact) -> bool:
        """Leave every pending envelope with every mailbox the contact lists;
        an envelope counts as sent once at least one mailbox stored it."""
        assert contact.record is not None
        pending = self.conversations.pending_envelopes(contact.identity_key, limit=MAX_BATCH)
        stored: set[bytes] = set()
        for entry in contact.record.mailboxes:
            info = PeerInfo(ID(entry.peer_id), addrs(entry.addresses))
            requests = [Request(Op.DEPOSIT, entry.mailbox_id, envelope=e) for _, e in pending]
            try:
                replies = await mailbox_call(self.host, info, requests)
            except Exception as error:
                log.info("mailbox %s unreachable: %s", info.peer_id, error)
                continue
            for (digest, _), reply in zip(pending, replies, strict=True):
                if reply.ok:
                    stored.add(digest)
                else:
                    log.info("mailbox %s refused a deposit: %s", info.peer_id, reply.error)
        if stored:
            self.conversations.acknowledged(list(stored))
            self.stats["deposited"] += len(stored)
        return len(stored) == len(pending) and bool(pending)

    async def _push(self, stream: INetStream, key: bytes) -> None:
        """Send every pending envelope for ``key`` in batches, pipelined."""
        while True:
            pending = self.conversations.pending_envelopes(key)
            if not pending:
                return
            batches: list[list[bytes]] = [[]]
            size = 0
            for digest, envelope in pending:
                if len(batches[-1]) >= MAX_BATCH or size + len(envelope) > MAX_FRAME - 1024:
                    batches.append([])
                    size = 0
                batches[-1].append(digest)
                size += len(envelope) + 8
            envelopes = dict(pending)
            for batch in batches:
                w = Writer()
                w.repeated_bytes(1, (envelopes[d] for d in batch))
                await stream.write(frame(w.finish()))
            for batch in batches:
                ack = Fields(await read_frame(stream, 64 * MAX_BATCH), repeated=(1,))
                entries = [
                    Fields(raw) for raw in ack.repeated_bytes(1, max_count=MAX_BATCH, max_size=64)
                ]
                got = [entry.bytes_(1, size=32) for entry in entries]
                if got != batch:
                    raise ProtocolError("acknowledgement does not match what was sent")
                if any(entry.uint(2) == ACK_REFUSED for entry in entries):
                    log.warning("recipient refused an envelope; dropping it")
                self.conversations.acknowledged(got)
                self.stats["sent"] += len(got)

    # -- receiving ------------------------------------------------------------------------------

    async def _handle_envelopes(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        try:
            while True:
                try:
                    data = await read_frame(stream, MAX_FRAME)
                except StreamClosed:
                    return
                envelopes = Fields(data, repeated=(1,)).repeated_bytes(
                    1, max_count=MAX_BATCH, max_size=MAX_ENVELOPE
                )
                statuses = self.accept(envelopes, peer)
                self.spawn(self.greet, peer)
                ack = Writer().repeated_bytes(
                    1,
                    (
                        Writer().bytes_(1, sha256(e)).uint(2, status).finish()
                        for e, status in zip(envelopes, statuses, strict=True)
                    ),
                )
                await stream.write(frame(ack.finish()))
        except ProtocolError as error:
            log.warning("peer=%s sent a bad frame: %s", peer, error)
        except trio.TooSlowError:
            log.info("peer=%s stream idle, closed", peer)
        except Exception as error:
            log.info("peer=%s stream ended: %s", peer, type(error).__name__)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.close()

    def republish(self) -> None:
        self._republish.set()

    def accept(self, envelopes: list[bytes], peer: object) -> list[int]:
        """Store envelopes that arrived directly or from our mailboxes."""
        statuses = []
        for result in self.conversations.accept_envelopes(envelopes):
            if isinstance(result, PigeonError):
                self.stats["refused"] += 1
                log.warning("peer=%s envelope refused: %s", peer, result)
                statuses.append(ACK_REFUSED)
            elif result.duplicate:
                statuses.append(ACK_DUPLICATE)
            else:
                self.stats["received"] += 1
                statuses.append(ACK_STORED)
        if ACK_STORED in statuses:
            self._new_messages.set()
            self._new_messages = trio.Event()
            self.wake_outbox()  # delivery receipts are queued
        return statuses

    async def wait_for_messages(self) -> None:
        await self._new_messages.wait()

    def spawn(self, task: Any, *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(task, *args)

    def status(self) -> dict[str, object]:
        return {
            "identity_id": self.conversations.identity.identity_id.hex(),
            "peer_id": str(self.host.get_id()),
            "addresses": self.addresses,
            "uptime_s": round(time.time() - self.started, 1),
            "connections": len(self.host.get_network().connections),
            "dht_peers": self.dht.get_routing_table_size(),
            "outbox": self.db.one("SELECT count(*) FROM outbox")[0],
            "mailboxes": [ID(peer).pretty() for peer, _ in self.owner.my_mailboxes()],
            **(
                {
                    "mailbox_serving": self.mailbox_service.store.usage(),
                    **{f"mailbox_{k}": v for k, v in self.mailbox_service.stats.items()},
                }
                if self.mailbox_service is not None
                else {}
            ),
            "messages": self.db.one("SELECT count(*) FROM messages")[0],
            **self.stats,
        }


class _Connections(INotifee):  # type: ignore[misc]
    """py-libp2p's connection events, forwarded to the node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def connected(self, network: object, conn: Any) -> None:
        self.node.spawn(self.node.peer_connected, conn.muxed_conn.peer_id)

    async def disconnected(self, network: object, conn: Any) -> None:
        self.node.peer_disconnected(conn.muxed_conn.peer_id)

    async def opened_stream(self, network: object, stream: object) -> None:
        return None

    async def closed_stream(self, network: object, stream: object) -> None:
        return None

    async def listen(self, network: object, multiaddr: object) -> None:
        return None

    async def listen_close(self, network: object, multiaddr: object) -> None:
        return None
