"""Delivery of sealed envelopes: both sides of ``/pigeon/envelope/1.0.0``
(docs/protocol/delivery.md).

``Courier`` (sending): per contact, encrypt what is queued (starting a session
from a current directory record when there is none), deliver the outbox to
one of the contact's devices, and when none answers leave it with the
contact's mailboxes; retry with backoff.  An envelope leaves the outbox only
when a peer answered for it: stored (``sent``), or refused by the contact's
node (``failed``, with the reason).

``EnvelopeService`` (receiving): commit each Deliver frame, then answer it
with an Ack naming every envelope in order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from pigeon.protocol.frames import (
    MAX_ACK_FRAME,
    MAX_BATCH,
    MAX_DELIVER_FRAME,
    Ack,
    AckEntry,
    AckStatus,
    Deliver,
    digest,
)

from .contacts import Contact, UnknownContact, is_current, short_id
from .conversations import Conversations
from .directory import Directory
from .framing import frame, read_frame, serve_frames
from .mailbox import deposit, take_prekey

log = logging.getLogger("pigeon.delivery")

ENVELOPE_PROTOCOL = TProtocol("/pigeon/envelope/1.0.0")
STREAM_IDLE = 2.0  # seconds a delivery stream waits for more before closing
MAX_BACKOFF = 60.0
WAITING_FOR_RECORD = "waiting for the contact's directory record (none current is known)"
NO_MAILBOX = "the contact's node could not be reached and it lists no mailbox; sent when it is back"
UNREACHABLE = "neither the contact's node nor its mailboxes could be reached; trying again"

Accept = Callable[[list[bytes], object], list[AckStatus]]


class EnvelopeService:
    def __init__(self, accept: Accept, on_frame: Callable[[ID], None]) -> None:
        self.accept = accept
        self.on_frame = on_frame

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id

        def answer(data: bytes) -> bytes:
            envelopes = Deliver.decode(data).envelopes
            statuses = self.accept(list(envelopes), peer)
            self.on_frame(peer)
            entries = (AckEntry(digest(e), s) for e, s in zip(envelopes, statuses, strict=True))
            return Ack(tuple(entries)).encode()

        await serve_frames(stream, MAX_DELIVER_FRAME, answer, "envelope")


def batches(pending: list[tuple[bytes, bytes]]) -> list[list[tuple[bytes, bytes]]]:
    """Split (digest, envelope) pairs into Deliver frames under both limits."""
    out: list[list[tuple[bytes, bytes]]] = [[]]
    size = 0
    for item in pending:
        if len(out[-1]) >= MAX_BATCH or (out[-1] and size + len(item[1]) > MAX_DELIVER_FRAME // 2):
            out.append([])
            size = 0
        out[-1].append(item)
        size += len(item[1]) + 8
    return [b for b in out if b]


class Courier:
    def __init__(
        self,
        conversations: Conversations,
        host: IHost,
        directory: Directory,
        clock: Callable[[], float],
        spawn: Callable[..., None],
        greet: Callable[[ID], Awaitable[None]],
        stats: dict[str, int],
    ) -> None:
        self.conv = conversations
        self.host = host
        self.directory = directory
        self.clock = clock
        self.spawn = spawn
        self.greet = greet
        self.stats = stats
        self._wakeup = trio.Event()
        self._contact_wakeup: dict[bytes, trio.Event] = {}
        self._delivering: set[bytes] = set()
        self._backoff: dict[bytes, tuple[int, float]] = {}

    def wake(self, key: bytes | None = None, *, now: bool = False) -> None:
        """Something is queued (for ``key``, or anyone); ``now`` forgets the backoff."""
        if now and key is not None:
            self._backoff.pop(key, None)
        self._wakeup.set()
        for k in list(self._contact_wakeup) if key is None else [key]:
            event = self._contact_wakeup.get(k)
            if event is not None:
                event.set()

    async def run(self) -> None:
        last_expiry = -math.inf
        while True:
            now = trio.current_time()
            if now - last_expiry > 3600:
                last_expiry = now
                expired = self.conv.expire_undelivered()
                if expired:
                    log.warning("gave up on %d message(s) not delivered within 30 days", expired)
            for key in self.conv.contacts_with_work():
                not_before = self._backoff.get(key, (0, 0.0))[1]
                if key not in self._delivering and now >= not_before:
                    self._delivering.add(key)
                    self.spawn(self._deliver, key)
            with trio.move_on_after(1.0):
                await self._wakeup.wait()
            self._wakeup = trio.Event()

    async def _deliver(self, key: bytes) -> None:
        try:
            await self._encrypt(key)
            contact = self.conv.contacts.get(key)
            delivered = await self._deliver_to(contact)
            if not delivered:
                await self.directory.refresh(key)
                contact = self.conv.contacts.get(key)
                delivered = await self._deliver_to(contact)
            if not delivered and contact.record is not None and contact.record.mailboxes:
                await self._deposit(contact)
            elif not delivered:
                self.conv.note_waiting(key, NO_MAILBOX)
        except UnknownContact:
            return  # removed meanwhile
        except Exception as error:  # one contact's trouble must not stop the others
            log.warning("delivery to contact %s failed: %s", short_id(key), error)
        finally:
            self._delivering.discard(key)
            if not self.conv.has_work(key):
                self._backoff.pop(key, None)
            else:
                attempts = self._backoff.get(key, (0, 0.0))[0] + 1
                delay = min(MAX_BACKOFF, 0.5 * math.pow(2, attempts))
                self._backoff[key] = (attempts, trio.current_time() + delay)
                log.info("delivery to contact %s waits, retry in %.1fs", short_id(key), delay)
            self._wakeup.set()

    async def _encrypt(self, key: bytes) -> None:
        """Encrypt what is queued; start a session first when there is none,
        from a record that is current (looked up again when it is old or
        expired; never one that has expired).  Without one, the messages wait
        and say so."""
        if not self.conv.needs_session(key):
            self.conv.encrypt_queued(key)
            return
        # First the contact's own node: its record and a one-time prekey in
        # one request, no proof of work (a mailbox asks one of strangers).
        one_time_prekey = await self.directory.ask_prekey(key)
        source = "from its node"
        record = self.conv.contacts.get(key).record
        if one_time_prekey is None and (
            not is_current(record, self.clock()) or not (record and record.mailboxes)
        ):
            # also when it lists no mailbox: a newer one may, with a one-time
            # prekey to take and somewhere to leave envelopes.  Its devices
            # were just asked: only the DHT is left.
            record = await self.directory.refresh(key, asked=True)
        if record is None or record.expires_at <= self.clock():
            self.conv.note_waiting(key, WAITING_FOR_RECORD)
            log.info("no current directory record for contact %s yet", short_id(key))
            return
        if one_time_prekey is None:
            token = self.conv.deposit_token(key)
            one_time_prekey = await take_prekey(self.host, record, token, self.clock)
            source = "from a mailbox"
        log.info(
            "starting a session with contact %s %s a one-time prekey%s",
            short_id(key),
            "with" if one_time_prekey else "without",
            f" ({source})" if one_time_prekey else "",
        )
        self.conv.encrypt_queued(key, record, one_time_prekey)

    def _peers_for(self, contact: Contact) -> list[PeerInfo]:
        infos: list[PeerInfo] = []
        if contact.record is not None:
            for device in contact.record.devices:
                peer = ID(device.certificate.peer_id)
                addrs = [multiaddr.Multiaddr(a) for a in device.addresses]
                infos.append(PeerInfo(peer, addrs))
        for hint in self.conv.contacts.hint_addresses(contact.identity_key):
            try:
                infos.append(info_from_p2p_addr(multiaddr.Multiaddr(hint)))
            except Exception:
                continue
        return infos

    async def _deliver_to(self, contact: Contact) -> bool:
        key = contact.identity_key
        if not self.conv.pending_envelopes(key, limit=1):
            return True
        for info in self._peers_for(contact):
            try:
                with trio.fail_after(10):
                    if info.addrs:
                        await self.host.connect(info)
                    stream = await self.host.new_stream(info.peer_id, [ENVELOPE_PROTOCOL])
            except Exception as error:
                log.debug("dial %s failed: %s", info.peer_id, error)
                continue
            try:
                # Keep the stream while messages keep coming: opening one costs
                # more than sending a batch on it.
                while True:
                    self._contact_wakeup[key] = trio.Event()
                    await self._push(stream, contact)
                    self.conv.contacts.saw(key, int(self.clock()))
                    self.spawn(self.greet, info.peer_id)
                    with trio.move_on_after(STREAM_IDLE):
                        await self._contact_wakeup[key].wait()
                    await self._encrypt(key)
                    if not self.conv.pending_envelopes(key, limit=1):
                        return True
            except Exception as error:
                log.info("delivery stream to contact %s broke: %s", short_id(key), error)
            finally:
                self._contact_wakeup.pop(key, None)
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await stream.close()
        return False

    async def _push(self, stream: INetStream, contact: Contact) -> None:
        """Send every pending envelope in frames, pipelined, and settle each
        by its acknowledgement."""
        key = contact.identity_key
        while True:
            pending = self.conv.pending_envelopes(key)
            if not pending:
                return
            frames = batches(pending)
            for batch in frames:
                deliver = Deliver(tuple(envelope for _, envelope in batch))
                await stream.write(frame(deliver.encode()))
            for batch in frames:
                ack = Ack.decode(await read_frame(stream, MAX_ACK_FRAME))
                ack.check_answers([envelope for _, envelope in batch])
                refused = [e.digest for e in ack.entries if e.status == AckStatus.REFUSED]
                stored = [e.digest for e in ack.entries if e.status != AckStatus.REFUSED]
                self.conv.stored(stored)
                self.stats["sent"] += len(stored)
                if refused:
                    log.warning(
                        "contact %s's node refused %d envelope(s)", short_id(key), len(refused)
                    )
                    self.conv.refused(
                        refused,
                        f"refused by {contact.label}'s node (not added you yet, or could not"
                        " read it); sent again when they are next in touch",
                    )

    async def _deposit(self, contact: Contact) -> None:
        """Leave every pending envelope with every mailbox the contact lists;
        an envelope counts as sent once at least one mailbox stored it."""
        assert contact.record is not None
        key = contact.identity_key
        pending = self.conv.pending_envelopes(key, limit=MAX_BATCH)
        token = self.conv.deposit_token(key)
        now = int(self.clock())
        ttls = {
            d: max(1, at - now) for d, at in self.conv.expiries([d for d, _ in pending]).items()
        }
        stored, refusals = await deposit(self.host, contact.record, pending, token, ttls)
        if stored:
            self.conv.stored(list(stored))
            self.stats["deposited"] += len(stored)
        elif refusals:
            self.conv.note_waiting(key, f"the contact's mailboxes refused it: {refusals[0]}")
        else:
            self.conv.note_waiting(key, UNREACHABLE)
