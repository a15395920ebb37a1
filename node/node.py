"""The running node: wires the parts together on one libp2p host and trio.

- ``Directory`` (directory.py): our record in the DHT, our contacts' records.
- ``Courier`` and ``EnvelopeService`` (delivery.py): both sides of delivery.
- ``PresenceService`` (presence.py): who of our contacts is online.
- ``MailboxOwner`` (mailbox_owner.py): our mailboxes, as a recipient.
- ``MailboxPeer`` (mailbox.py): the mailbox role for others (``--mailbox``).
- ``Transfers`` (transfers.py): files sent and received, over WebRTC.
- ``Conversations`` (conversations.py): sessions, the outgoing queue and
  what arrives, over the database.

Each part gets what it needs at construction; none imports this module.  The
clock and randomness are parameters, so many nodes can run under one driver.
Every task the node starts runs inside an error boundary: it logs one line
and ends itself, never the daemon.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import multiaddr
import trio
from libp2p.abc import IHost, INotifee
from libp2p.identity.identify_push.identify_push import push_identify_to_peers
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.tools.anyio_service import background_trio_service

from pigeon.protocol import (
    AppMessage,
    ContactCode,
    Content,
    DeviceCertificate,
    DirectoryRecord,
    IdentityKeyPair,
    PigeonError,
    Random,
)
from pigeon.protocol.frames import AckStatus
from pigeon.protocol.keys import identity_id
from pigeon.protocol.records import Device, MailboxEntry, OneTimePrekey

from .addresses import published
from .contacts import KEY_CHANGE_WAIT, Contact
from .conversations import Accepted, Conversations
from .delivery import ENVELOPE_PROTOCOL, Courier, EnvelopeService
from .dialing import is_relayed
from .directory import DHT_PROTOCOL, RECORD_PROTOCOL, Directory, guard_dht, make_dht_validator
from .host import Wire, build_host, check_listening, close_host
from .limits import (
    DIALBACK_STREAMS,
    ENVELOPE_STREAMS,
    MAILBOX_STREAMS,
    NOTIFY_STREAMS,
    PRESENCE_STREAMS,
    RECORD_STREAMS,
    REFUSALS,
    Admission,
)
from .mailbox import MAILBOX_PROTOCOL, NOTIFY_PROTOCOL, MailboxPeer
from .mailbox_owner import MailboxOwner
from .mailbox_store import MailboxLimits, MailboxStore
from .presence import PRESENCE_PROTOCOL, PresenceService
from .reach import DIALBACK_PROTOCOL, PUBLIC, UNKNOWN, DialbackService, Reachability
from .relay import Relays
from .routing import RoutingUpkeep, remember_verified_envelopes, servers_only
from .storage import Database
from .transfers import Transfers

if TYPE_CHECKING:
    from pigeon.transfer.rtc import IceServer

log = logging.getLogger("pigeon.node")

# A record's signed prekey stays usable for two weeks after the record was
# issued (retired prekeys are kept that long), so a record lives two weeks.
RECORD_LIFETIME = 14 * 24 * 3600
EXPIRE_EVERY = 1.0  # seconds between looks for disappearing messages whose time is up
# One-time prekeys handed to a contact's device directly: marked as given to
# that contact (in place of a mailbox), at most this many outstanding each.
DIRECT_PREKEY_MARK = b"direct:"
DIRECT_PREKEYS = 8


@dataclass
class NodeConfig:
    listen: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    bootstrap: list[str] = field(default_factory=list)
    announce_presence: bool = True
    serve_mailbox: bool = False
    mailbox_count: int = 3
    mailbox_interval: float = 30.0  # seconds between mailbox collections and checks
    mailbox_limits: MailboxLimits = field(default_factory=MailboxLimits)
    downloads: Path | None = None  # where accepted files go: <home>/downloads if None
    ice_servers: list[IceServer] = field(default_factory=list)
    relay: bool = False  # relay for nodes behind NAT (relay.py)
    wire: Wire | None = None  # what the TCP transport counts and lets through


class Node:
    def __init__(
        self,
        db: Database,
        config: NodeConfig,
        *,
        clock: Callable[[], float] = time.time,
        random: Random = os.urandom,
    ) -> None:
        self.db = db
        self.config = config
        self.clock = clock
        self.conversations = conv = Conversations(db, random, clock)
        self.contacts = conv.contacts
        self.wire = config.wire or Wire()
        self.host: IHost = build_host(conv.device_seed, config.listen, self.wire, self._told)
        # A DHT server from the start when it is for this machine alone or
        # serves others (relay, mailbox); otherwise a client until peers
        # have connected back to it (_follow_reachability).
        # Listening on loopback addresses only, by name: a node for this machine alone.
        self.local_only = bool(_loopback_listen(config.listen))
        serving = self.local_only or config.relay or config.serve_mailbox
        self.dht = KadDHT(
            self.host, DHTMode.SERVER if serving else DHTMode.CLIENT, strict_validation=True
        )
        make_dht_validator(self.dht, clock)
        RoutingUpkeep(self.dht, random).install()
        servers_only(self.dht)
        remember_verified_envelopes()
        # Before the host runs, so that no stream reaches the library's own handler.
        self._dht_handler = self._guarded(guard_dht(self.dht))
        if serving:
            self.host.set_stream_handler(DHT_PROTOCOL, self._dht_handler)
        self.dialback = DialbackService(self.host)
        self.reach = Reachability(self.host, self._listen_port, lambda: self.local_only)
        self.started = clock()
        self.stats = {"received": 0, "sent": 0, "refused": 0, "deposited": 0}
        self._nursery: trio.Nursery | None = None
        self._new_messages = trio.Event()
        self._listeners: list[Callable[[Accepted], Awaitable[None]]] = []

        self.directory = Directory(
            self.host,
            self.dht,
            self.contacts,
            conv.identity.public_key,
            self.record,
            clock,
            give_prekey=self._give_prekey,
        )
        previous = conv.previous_identity
        if previous is not None:
            # After a rotation, the identity we moved from goes on publishing a
            # record, signed by its key, that names the new one and lists this
            # device, so that a contact holding only the old key learns where
            # we went.  No mailboxes: nothing should be left for it.
            self.directory.also_publish(
                previous.public_key, functools.partial(self._record, previous, ())
            )
        self.presence = PresenceService(
            self.host,
            self.contacts.for_peer,
            self._contact_in_touch,
            announce=config.announce_presence,
        )
        self.courier = Courier(
            conv, self.host, self.directory, clock, self.spawn, self.presence.greet, self.stats
        )
        self.envelopes = EnvelopeService(self.accept, self._frame_from)
        self.owner = MailboxOwner(
            db,
            self.host,
            self.dht,
            conv.prekeys,
            functools.partial(self.accept, via="mailbox"),
            self.directory.republish,
            count=config.mailbox_count,
            interval=config.mailbox_interval,
            random=random,
            clock=clock,
        )
        conv.issue_token = self.owner.issue_token
        self.transfers = Transfers(
            db,
            conv,
            self._send_to,
            self.spawn,
            downloads=config.downloads or db.path.parent / "downloads",
            ice_servers=config.ice_servers,
            host_addresses=_loopback_listen(config.listen),
            is_online=lambda key: self.is_online(self.contacts.get(key)),
            random=random,
        )
        # Relays and hole punching: for a node others may reach from elsewhere
        # (one on loopback only has no NAT to get through).
        self.relays: Relays | None = None
        if config.relay or not self.local_only:
            self.relays = Relays(
                self.host, self.dht, self.reach, self.directory.republish, serve=config.relay
            )
            self.relays.install_dialing()
        self.mailbox: MailboxPeer | None = None
        if config.serve_mailbox:
            self.mailbox = MailboxPeer(
                self.host,
                self.dht,
                MailboxStore(db, config.mailbox_limits),
                config.mailbox_limits,
                config.mailbox_interval,
                clock,
                random,
                self.spawn,
            )

    # -- lifecycle ------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Node]:
        listen = [multiaddr.Multiaddr(a) for a in self.config.listen]
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run(listen_addrs=listen))
            await check_listening(self.host, listen)
            await stack.enter_async_context(background_trio_service(self.dht))
            stack.push_async_callback(close_host, self.host)
            handlers = {
                ENVELOPE_PROTOCOL: (self.envelopes.handle, ENVELOPE_STREAMS),
                PRESENCE_PROTOCOL: (self.presence.handle, PRESENCE_STREAMS),
                NOTIFY_PROTOCOL: (self.owner.handle_notice, NOTIFY_STREAMS),
                RECORD_PROTOCOL: (self.directory.handle_record, RECORD_STREAMS),
                DIALBACK_PROTOCOL: (self.dialback.handle, DIALBACK_STREAMS),
            }
            if self.mailbox is not None:
                handlers[MAILBOX_PROTOCOL] = (self.mailbox.service.handle, MAILBOX_STREAMS)
            # Contacts' devices and our mailboxes are counted apart from
            # strangers, whose identities cost nothing (limits.py).
            admission = Admission(
                lambda peer: (
                    self.contacts.for_peer(peer.to_bytes()) is not None
                    or self.owner.is_mailbox(peer)
                )
            )
            for protocol, (handler, limit) in handlers.items():
                guarded = self._guarded(admission.guard(protocol, limit, handler))
                self.host.set_stream_handler(protocol, guarded)
            nursery = await stack.enter_async_context(trio.open_nursery())
            self._nursery = nursery
            self.host.get_network().register_notifee(_Connections(self))
            await stack.enter_async_context(self.transfers.running())
            await self._bootstrap()
            self.spawn(self.directory.run)
            self.spawn(self.transfers.run)
            self.spawn(self.courier.run)
            self.spawn(self.owner.run)
            self.spawn(self._expire_messages)
            self.spawn(self.reach.run)
            if self.relays is not None:
                self.spawn(self.relays.run)
            self.spawn(self._follow_reachability)
            if self.mailbox is not None:
                self.spawn(self.mailbox.run)
            try:
                yield self
            finally:
                # connection events still come while the host shuts down
                # after the nursery: they start nothing
                self._nursery = None
                nursery.cancel_scope.cancel()

    def spawn(self, task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """Start a task in the node's nursery, inside an error boundary."""
        if self._nursery is not None:
            self._nursery.start_soon(self._guarded(task), *args)

    @staticmethod
    def _guarded(task: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
        name = getattr(task, "__qualname__", repr(task))

        @functools.wraps(task)
        async def guarded(*args: Any) -> None:
            try:
                await task(*args)
            except trio.Cancelled:
                raise
            except Exception as error:
                log.error("task %s failed: %s: %s", name, type(error).__name__, error)

        return guarded

    async def _bootstrap(self) -> None:
        reached = 0
        for address in self.config.bootstrap:
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                with trio.fail_after(10):
                    await self.host.connect(info)
                await self.dht.add_peer(info.peer_id)
                reached += 1
                log.info("bootstrap peer=%s connected", info.peer_id)
            except Exception as error:
                log.warning("bootstrap address=%s failed: %s", address, error)
        if not self.config.bootstrap:
            log.warning(
                "no bootstrap peer given: this node knows no other node, so it finds"
                " contacts only through the addresses in their contact codes"
                " (start it with --bootstrap ADDRESS of any running node)"
            )
        elif not reached:
            log.warning(
                "could not reach any bootstrap peer: this node is alone until a contact"
                " connects to it (check the --bootstrap addresses and the network)"
            )

    # -- identity -------------------------------------------------------------------

    @property
    def addresses(self) -> list[str]:
        """Where others can reach us (``addresses.py``), each with ``/p2p``,
        then through the relays we hold a slot at."""
        relayed = self.relays.addresses() if self.relays is not None else []
        return [str(a) for a in self.host.get_addrs()] + relayed

    def _told(self) -> list[str]:
        host = getattr(self, "host", None)  # asked once while the host is being built
        if host is None:
            return []
        return published(host.get_transport_addrs()) + self.reach.public

    def _listen_port(self) -> int | None:
        ports = [int(str(a).split("/")[4]) for a in self.host.get_transport_addrs()]
        return ports[0] if ports else None

    async def _follow_reachability(self) -> None:
        """Others learn a newly found public address (or its loss) at once,
        and our DHT serves others only while they can connect to us: behind
        NAT a DHT server would only have peers' lookups stall on an address
        that goes nowhere.  Peers learn of the change by an identify push
        (py-libp2p keeps a peer in its table only while it offers the DHT)."""
        while True:
            await self.reach.changed.wait()
            self.directory.republish()
            if self.reach.state == UNKNOWN:
                continue
            server = self.reach.state == PUBLIC
            if server == (self.dht.mode == DHTMode.SERVER):
                continue
            await self.dht.switch_mode(DHTMode.SERVER if server else DHTMode.CLIENT)
            if server:  # the library put back its own handler: ours goes first
                self.host.set_stream_handler(DHT_PROTOCOL, self._dht_handler)
            with contextlib.suppress(Exception):
                await push_identify_to_peers(self.host)
            log.info("DHT: %s", "serving others" if server else "a client only (behind NAT)")

    def contact_code(self) -> str:
        conv = self.conversations
        return ContactCode(conv.identity.public_key, conv.name, tuple(self.addresses)).to_uri()

    def record(self) -> bytes:
        conv = self.conversations
        return self._record(
            conv.identity,
            tuple(
                MailboxEntry(peer_id, self.owner.mailbox_id, tuple(addresses))
                for peer_id, addresses in self.owner.my_mailboxes()
            ),
        )

    def _record(self, identity: IdentityKeyPair, mailboxes: tuple[MailboxEntry, ...]) -> bytes:
        conv = self.conversations
        now = int(self.clock())
        cert = DeviceCertificate.issue(identity, self.host.get_id().to_bytes(), now)
        record = DirectoryRecord(
            identity_key=identity.public_key,
            name=conv.name,
            sequence=conv.next_record_sequence(),
            issued_at=now,
            expires_at=now + RECORD_LIFETIME,
            signed_prekey=conv.prekeys.current_signed(),
            devices=(Device(cert, tuple(self.addresses)),),
            mailboxes=mailboxes,
            rotation=conv.rotation,
        )
        return record.sign(identity)

    # -- contacts -------------------------------------------------------------------------

    async def add_contact(self, code: ContactCode, alias: str | None) -> tuple[Contact, bool]:
        """Add a contact (or find it already there), then look up its record
        and say hello to its devices."""
        contact, added = self.conversations.add_contact(code, alias)
        with trio.move_on_after(15):
            record = await self.directory.refresh(contact.identity_key)
            for device in record.devices if record else ():
                self.spawn(self.presence.greet, ID(device.certificate.peer_id))
        return self.contacts.get(contact.identity_key), added

    async def accept_request(self, key: bytes) -> Contact:
        """A stranger's request accepted: a contact now, looked up and greeted."""
        self.conversations.accept_request(key)
        self.courier.wake(key, now=True)  # the receipt for what it sent
        with trio.move_on_after(15):
            record = await self.directory.refresh(key)
            for device in record.devices if record else ():
                self.spawn(self.presence.greet, ID(device.certificate.peer_id))
        return self.contacts.get(key)

    async def accept_key(self, contact: Contact, new: bytes) -> Contact:
        """The contact is ``new`` from now on (its signed move, or a request
        the user vouches for): looked up, greeted, and its queue sent."""
        moved = self.conversations.accept_key(contact.identity_key, new)
        self.courier.wake(new, now=True)
        with trio.move_on_after(15):
            record = await self.directory.refresh(new)
            for device in record.devices if record else ():
                self.spawn(self.presence.greet, ID(device.certificate.peer_id))
        return self.contacts.get(moved.identity_key)

    def _give_prekey(self, peer: ID) -> OneTimePrekey | None:
        """A new one-time prekey for a contact's device that asks us directly
        (to start a session: no mailbox, no proof of work), at most
        ``DIRECT_PREKEYS`` outstanding per contact; strangers get none (they
        pay a mailbox with work)."""
        key = self.contacts.for_peer(peer.to_bytes())
        if key is None:
            return None
        given_to = DIRECT_PREKEY_MARK + identity_id(key)
        prekeys = self.conversations.prekeys
        if prekeys.outstanding(given_to) >= DIRECT_PREKEYS:
            return None
        (prekey,) = prekeys.new_one_time(1, given_to)
        return prekey

    def is_online(self, contact: Contact) -> bool:
        """Online: a live connection to one of its devices, which announced itself."""
        if contact.record is None:
            return False
        return any(
            self.presence.is_present(ID(device.certificate.peer_id))
            for device in contact.record.devices
        )

    def connection(self, contact: Contact) -> str | None:
        """How we are connected to the contact's devices: "direct" when any
        connection is, "relayed" when all go through relays, None when none."""
        if contact.record is None:
            return None
        network = self.host.get_network()
        kinds = {
            "relayed" if any(is_relayed(a) for a in conn.get_transport_addresses()) else "direct"
            for device in contact.record.devices
            for conn in network.get_connections(ID(device.certificate.peer_id))
        }
        return "direct" if "direct" in kinds else "relayed" if kinds else None

    def _contact_in_touch(self, key: bytes) -> None:
        """A contact's device said hello: it is reachable and accepts us now."""
        self.contacts.saw(key, int(self.clock()))
        # Its record may have changed while we were apart (a new address, a
        # move to a new identity): one request to the device, once per
        # connection (a device says hello once per connection).
        self.spawn(self._refresh_record, key)
        self.conversations.retry_failed(key)
        self.courier.wake(key, now=True)
        self.transfers.contact_in_touch(key)

    async def _expire_messages(self) -> None:
        """Disappearing messages go when their time is up (one indexed query
        a tick when none is due)."""
        while True:
            expired = self.conversations.expire()
            if expired:
                log.info("deleted %d disappearing message(s)", expired)
            await trio.sleep(EXPIRE_EVERY)

    async def _refresh_record(self, key: bytes) -> None:
        await self.directory.refresh(key)

    async def peer_connected(self, peer: ID) -> None:
        """A peer connected: a contact's queue goes now; a mailbox of ours is
        collected.  Neither connection is pruned when the node holds many."""
        network = self.host.get_network()
        if self.owner.is_mailbox(peer):
            network.protect(peer, "pigeon")
            self.owner.collect_now.set()
        key = self.contacts.for_peer(peer.to_bytes())
        if key is None:
            return
        network.protect(peer, "pigeon")
        self.courier.wake(key, now=True)
        await self.presence.greet(peer)

    def _frame_from(self, peer: ID) -> None:
        self.spawn(self.presence.greet, peer)

    # -- messages ----------------------------------------------------------------------------

    def send(self, contact: Contact, content: Content) -> AppMessage:
        """The one way to send any kind of content to a contact."""
        app = self.conversations.send(contact.identity_key, content)
        self.courier.wake(contact.identity_key, now=True)
        return app

    def _send_to(self, key: bytes, content: Content, shown: str | None = None) -> AppMessage:
        app = self.conversations.send(key, content, shown=shown)
        self.courier.wake(key, now=True)
        return app

    def send_text(self, contact: Contact, text: str) -> AppMessage:
        if contact.blocked:
            raise PigeonError(
                f"{contact.label} is blocked: nothing goes to them (pigeon unblock"
                f" {contact.identity_id[:8]} first)"
            )
        with self.db.transaction():  # queued and, with a session, encrypted: one commit
            app = self.conversations.send_text(contact.identity_key, text)
            if contact.moved_to is not None:
                self.conversations.note_waiting(contact.identity_key, KEY_CHANGE_WAIT)
            else:
                self.conversations.encrypt_if_ready(contact.identity_key)
        self.courier.wake(contact.identity_key, now=True)
        return app

    def set_timer(self, contact: Contact, seconds: int) -> None:
        if contact.blocked:
            raise PigeonError(f"{contact.label} is blocked: nothing goes to them")
        self.conversations.set_timer(contact.identity_key, seconds)
        self.courier.wake(contact.identity_key, now=True)

    def mark_read(self, contact: Contact) -> int:
        count = self.conversations.mark_read(contact.identity_key)
        self.courier.wake(contact.identity_key, now=True)
        return count

    def on_message(self, listener: Callable[[Accepted], Awaitable[None]]) -> None:
        """Call ``listener`` for every new incoming message, after it is stored."""
        self._listeners.append(listener)

    def accept(self, envelopes: list[bytes], peer: object, via: str = "direct") -> list[AckStatus]:
        """Store envelopes that arrived directly or (``via="mailbox"``) from our mailboxes."""
        statuses = []
        for result in self.conversations.accept_envelopes(envelopes, via):
            if isinstance(result, PigeonError):
                self.stats["refused"] += 1
                REFUSALS.refused(peer, "peer=%s envelope refused", peer)
                statuses.append(AckStatus.REFUSED)
            elif result.app is None:
                statuses.append(AckStatus.DUPLICATE)
            else:
                statuses.append(AckStatus.STORED)
                if result.new:
                    self.stats["received"] += 1
                    for listener in self._listeners:
                        self.spawn(listener, result)
        if AckStatus.STORED in statuses:
            self._new_messages.set()
            self._new_messages = trio.Event()
        self.courier.wake()  # receipts or a reset may be queued
        return statuses

    async def wait_for_messages(self) -> None:
        await self._new_messages.wait()

    def metrics(self) -> dict[str, object]:
        """Counters for monitoring and simulations (docs/CONTROL.md)."""
        return {
            "wire_sent": self.wire.sent,
            "wire_received": self.wire.received,
            "dht_lookups_ms": [round(ms, 2) for ms in self.directory.lookup_ms],
            "connections": len(self.host.get_network().connections),
            **self.stats,
        }

    def status(self) -> dict[str, object]:
        mailbox: dict[str, object] = {}
        if self.mailbox is not None:
            mailbox["mailbox_serving"] = self.mailbox.store.usage()
            mailbox.update({f"mailbox_{k}": v for k, v in self.mailbox.service.stats.items()})
        return {
            "identity_id": self.conversations.identity.identity_id.hex(),
            "peer_id": str(self.host.get_id()),
            "addresses": self.addresses,
            "reachability": self.reach.state,
            "reachability_why": self.reach.reason,
            "contacts_connected": {
                contact.label: kind
                for contact in self.contacts.all()
                if (kind := self.connection(contact)) is not None
            },
            "uptime_s": round(self.clock() - self.started, 1),
            "connections": len(self.host.get_network().connections),
            "dht_peers": self.dht.get_routing_table_size(),
            "outbox": self.db.one("SELECT count(*) FROM outbox")[0],
            "mailboxes": [ID(peer).pretty() for peer, _ in self.owner.my_mailboxes()],
            **mailbox,
            "messages": self.db.one("SELECT count(*) FROM messages")[0],
            **self.stats,
        }


def _loopback_listen(listen: list[str]) -> list[str] | None:
    """The addresses listened on, when all are loopback ones (a node for this
    machine alone), else None.  WebRTC offers them as its host candidates
    (aioice never gathers loopback addresses itself); any other node offers
    what aioice finds."""
    hosts = {ipaddress.ip_address(str(multiaddr.Multiaddr(a)).split("/")[2]) for a in listen}
    if all(ip.is_loopback for ip in hosts):
        return sorted(str(ip) for ip in hosts)
    return None


class _Connections(INotifee):
    """py-libp2p's connection events, forwarded to the node."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def connected(self, network: object, conn: Any) -> None:
        self.node.spawn(self.node.peer_connected, conn.muxed_conn.peer_id)

    async def disconnected(self, network: object, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        self.node.presence.disconnected(peer)
        if self.node.relays is not None:
            self.node.relays.disconnected(peer)

    async def opened_stream(self, network: object, stream: object) -> None:
        return None

    async def closed_stream(self, network: object, stream: object) -> None:
        return None

    async def listen(self, network: object, multiaddr: object) -> None:
        return None

    async def listen_close(self, network: object, multiaddr: object) -> None:
        return None
