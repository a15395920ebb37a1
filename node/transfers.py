"""File transfers: the offer in the conversation, the signalling in the
ratchet, the bytes over a WebRTC data channel.

- The sender builds the file's manifest (pigeon.transfer.manifest), keeps it
  with the file's path, and sends a ``FileOffer`` (the ``pigeon-file:`` URI,
  the file's key and its SHA-256) like any message: it waits in the contact's
  mailboxes if the contact is offline, and is sent again until confirmed.
- The receiver accepts (``pigeon accept``, or by its auto-accept setting) and
  from then on drives: it makes a WebRTC offer and sends its SDP as a
  ``WebRTCSignal`` in the ratchet; the sender answers the same way.  The SDPs
  carry the DTLS fingerprints, so the data channel is authenticated by the
  ratchet: nothing about a transfer travels in the clear.
- The bytes move as in pigeon.transfer.engine; an attempt that breaks leaves
  the transfer ``paused``, and the receiver tries again when the sender is
  next in touch, after a restart of either side, and every ``RETRY_EVERY``.
- A cancel, a refusal or a failure that trying again cannot cure is told to
  the other side in a ``WebRTCSignal`` bye (durable, so it arrives even if the
  other side is offline), with a one-line reason.

aiortc lives in its own thread (pigeon.transfer.rtc), started the first time
a transfer needs it, so a node that never moves a file never loads it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from pigeon.protocol import (
    AppMessage,
    Content,
    FileOffer,
    PigeonError,
    ProtocolError,
    Random,
    WebRTCSignal,
    fit_reason,
    identity_id,
)
from pigeon.protocol.messages import ByeReason, SignalType
from pigeon.transfer.engine import (
    Outcome,
    TransferError,
    file_sha256,
    receive_file,
    serve_file,
)
from pigeon.transfer.manifest import DEFAULT_CHUNK, HASH_SIZE, KEY_SIZE, ManifestBuilder
from pigeon.transfer.reference import FileRef, human_size, parse_uri, safe_name
from pigeon.transfer.wire import ErrorCode

from .contacts import Contact, UnknownContact, short_id
from .conversations import Conversations, Incoming
from .storage import Database

if TYPE_CHECKING:
    from pigeon.transfer.rtc import Channel, IceServer, RtcThread

log = logging.getLogger("pigeon.transfers")

STATES = ("offered", "transferring", "paused", "done", "failed", "refused", "cancelled")
FINAL = frozenset({"done", "failed", "refused", "cancelled"})
CONNECT_TIMEOUT = 20.0  # from our WebRTC offer to an open data channel
# An offer signal older than this is not answered: the receiver that made it
# gave up waiting long ago (it came late, from a mailbox, say).
STALE_SIGNAL_MS = int(CONNECT_TIMEOUT * 1000) + 30_000
RETRY_EVERY = 30.0  # seconds between tries of paused transfers from contacts online
PROGRESS_EVERY = 2.0  # seconds between writes of a running transfer's progress
MAX_BROKEN_ATTEMPTS = 3  # attempts in a row ended by a peer breaking the protocol
ID_PREFIX = 6  # hex digits a transfer ID can be shortened to, when unique


class TransferNotFound(PigeonError):
    pass


def offer_text(ref: FileRef) -> str:
    """How a file offer shows in the conversation."""
    return f"[file] {ref.name} ({human_size(ref.size)})"


def part_name(ref: FileRef, transfer_id: bytes) -> str:
    """The file's name while it is incomplete: hidden, and named apart from
    any other transfer of a file of the same name."""
    return f".{ref.name}.{transfer_id.hex()[:8]}.pigeon-part"


def place(part: Path, folder: Path, name: str) -> Path:
    """Give the finished file its name in ``folder`` without replacing any
    file there: ``name``, else ``name (1)``, ``name (2)``...  A hard link
    fails if the name is taken, where a rename would overwrite."""
    stem, dot, suffix = name.partition(".") if not name.startswith(".") else (name, "", "")
    for n in range(1000):
        candidate = folder / (name if n == 0 else f"{stem} ({n}){dot}{suffix}")
        if candidate.parent != folder:
            raise PigeonError(f"the file name {name!r} would leave the download folder")
        try:
            os.link(part, candidate)
        except FileExistsError:
            continue
        os.unlink(part)
        directory = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return candidate
    raise PigeonError(f"{folder} already holds 1000 files named like {name!r}")


@dataclass(frozen=True)
class Transfer:
    id: bytes
    direction: str
    contact: bytes
    ref: FileRef
    key: bytes
    sha256: bytes
    leaves: tuple[bytes, ...] | None
    state: str
    error: str | None
    source: Path | None
    folder: Path | None
    path: Path | None
    bytes_done: int
    bytes_sent: int
    offer_message: bytes | None

    COLUMNS = (
        "id, direction, contact, uri, file_key, sha256, leaves, state, error, source, folder,"
        " path, bytes_done, bytes_sent, offer_message"
    )

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Transfer:
        (id_, direction, contact, uri, key, sha256, raw, state, error, source, folder, path,
         done, sent, offer) = row  # fmt: skip
        leaves = None
        if raw is not None:
            raw = bytes(raw)
            leaves = tuple(raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE))
        return cls(
            id=bytes(id_),
            direction=str(direction),
            contact=bytes(contact),
            ref=parse_uri(str(uri)),
            key=bytes(key),
            sha256=bytes(sha256),
            leaves=leaves,
            state=str(state),
            error=None if error is None else str(error),
            source=None if source is None else Path(source),
            folder=None if folder is None else Path(folder),
            path=None if path is None else Path(path),
            bytes_done=int(done),
            bytes_sent=int(sent),
            offer_message=None if offer is None else bytes(offer),
        )


Send = Callable[[bytes, Content, str | None], AppMessage]  # (contact, content, shown as)


class Transfers:
    def __init__(
        self,
        db: Database,
        conversations: Conversations,
        send: Send,
        spawn: Callable[..., None],
        *,
        downloads: Path,
        ice_servers: Sequence[IceServer] = (),
        host_addresses: Sequence[str] | None = None,
        is_online: Callable[[bytes], bool] = lambda key: True,
        random: Random = os.urandom,
    ) -> None:
        self.db = db
        self.conversations = conversations
        self._send = send
        self.spawn = spawn
        self.downloads = downloads
        self.ice_servers = tuple(ice_servers)
        self.host_addresses = None if host_addresses is None else tuple(host_addresses)
        self.is_online = is_online
        self.random = random
        self._stack: AsyncExitStack | None = None
        self._rtc: RtcThread | None = None
        self._rtc_lock = trio.Lock()
        self._attempts: dict[bytes, trio.CancelScope] = {}
        self._answers: dict[bytes, trio.MemorySendChannel[str]] = {}
        self._progress: dict[bytes, int] = {}  # in memory, between writes
        self._written: dict[bytes, float] = {}  # when progress was last written
        self._broken: dict[bytes, int] = {}  # attempts in a row the peer broke the protocol
        self._changed = trio.Event()
        conversations.handle(FileOffer, self._on_offer)
        conversations.handle(WebRTCSignal, self._on_signal)

    # -- lifecycle ----------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Transfers]:
        """The transfers' lifetime (the node's): the aiortc thread, once
        started, ends with it, after every connection is closed."""
        async with AsyncExitStack() as stack:
            self._stack = stack
            try:
                yield self
            finally:
                for scope in list(self._attempts.values()):
                    scope.cancel()
                self._stack = None

    async def rtc(self) -> RtcThread:
        async with self._rtc_lock:
            if self._rtc is None:
                if self._stack is None:
                    raise PigeonError("the node is not running")
                # aiortc loads only when needed, and in a thread: importing it
                # takes about half a second the event loop must not wait out
                module = await trio.to_thread.run_sync(
                    importlib.import_module, "pigeon.transfer.rtc"
                )
                thread: RtcThread = module.RtcThread(self.ice_servers, self.host_addresses)
                await self._stack.enter_async_context(thread)
                self._rtc = thread
                return thread
            return self._rtc

    async def warm_up(self) -> None:
        """Have aiortc ready before a transfer needs it: an offer is usually
        followed by a connection, on both sides."""
        await self.rtc()

    async def run(self) -> None:
        """Resume what a restart interrupted, then keep trying paused ones."""
        self.db.execute(
            "UPDATE transfers SET state = 'paused' WHERE state = 'transferring'"
            " AND direction = 'out'"
        )
        for transfer in self._incoming(("transferring", "paused")):
            self.spawn(self._pull, transfer.id)
        while True:
            await trio.sleep(RETRY_EVERY)
            for transfer in self._incoming(("paused",)):
                if self.is_online(transfer.contact):
                    self.spawn(self._pull, transfer.id)

    def contact_in_touch(self, key: bytes) -> None:
        """The contact is reachable now: paused transfers from it go on."""
        for transfer in self._incoming(("paused",)):
            if transfer.contact == key:
                self.spawn(self._pull, transfer.id)

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # -- reading ------------------------------------------------------------------------

    def get(self, transfer_id: bytes) -> Transfer:
        row = self.db.one(f"SELECT {Transfer.COLUMNS} FROM transfers WHERE id = ?", (transfer_id,))
        if row is None:
            raise TransferNotFound(f"no transfer {transfer_id.hex()[:8]}")
        return Transfer.from_row(row)

    def find(self, text: str) -> bytes:
        """A transfer by its ID, or a unique prefix of at least 6 hex digits."""
        wanted = text.strip().lower()
        if len(wanted) < ID_PREFIX or any(c not in "0123456789abcdef" for c in wanted):
            raise TransferNotFound(
                f"{text!r} is not a transfer ID"
                f" (at least {ID_PREFIX} hex digits; see: pigeon files)"
            )
        matches = [
            bytes(r[0])
            for r in self.db.all("SELECT id FROM transfers")
            if bytes(r[0]).hex().startswith(wanted)
        ]
        if not matches:
            raise TransferNotFound(f"no transfer {wanted} (see: pigeon files)")
        if len(matches) > 1:
            raise TransferNotFound(f"{wanted} names {len(matches)} transfers: give more digits")
        return matches[0]

    def _incoming(self, states: tuple[str, ...]) -> list[Transfer]:
        marks = ", ".join("?" * len(states))
        return [
            Transfer.from_row(r)
            for r in self.db.all(
                f"SELECT {Transfer.COLUMNS} FROM transfers WHERE direction = 'in'"
                f" AND state IN ({marks})",
                states,
            )
        ]

    def describe(self, transfer: Transfer) -> dict[str, Any]:
        """What ``pigeon files --json`` prints for one transfer."""
        state, error = transfer.state, transfer.error
        if transfer.direction == "out" and state == "offered" and transfer.offer_message:
            # the offer itself could not be delivered: that is the transfer's fate too
            row = self.db.one(
                "SELECT status, reason FROM messages WHERE id = ?", (transfer.offer_message,)
            )
            if row is not None and row[0] == "failed":
                state, error = "refused", row[1]
        done = self._progress.get(transfer.id, transfer.bytes_done)
        sent = transfer.bytes_sent
        if transfer.direction == "out":
            sent = self._progress.get(transfer.id, sent)
            done = transfer.ref.size if state == "done" else min(sent, transfer.ref.size)
        contact = self._contact(transfer.contact)
        return {
            "id": transfer.id.hex(),
            "name": transfer.ref.name,
            "size": transfer.ref.size,
            "sha256": transfer.sha256.hex(),
            "direction": transfer.direction,
            "peer": identity_id(transfer.contact).hex(),
            "contact": None if contact is None else contact.label,
            "state": state,
            "bytes_done": done,
            "bytes_sent": sent,
            "error": error,
            "path": None if transfer.path is None else str(transfer.path),
            "uri": transfer.ref.to_uri(),
        }

    def list(self) -> list[dict[str, Any]]:
        rows = self.db.all(f"SELECT {Transfer.COLUMNS} FROM transfers ORDER BY created_at, id")
        return [self.describe(Transfer.from_row(r)) for r in rows]

    # -- sending ----------------------------------------------------------------------------

    async def offer(self, contact: bytes, source: Path) -> Transfer:
        """Offer a file to a contact: build its manifest (in a thread: it
        reads and hashes the whole file), keep it, send the offer."""
        if not source.is_absolute():
            raise PigeonError(f"{source} is not an absolute path")
        try:
            if not source.is_file():
                raise PigeonError(f"{source} is not a file")
            size = source.stat().st_size
        except OSError as error:
            raise PigeonError(f"cannot read {source}: {error.strerror}") from None
        key = self.random(KEY_SIZE)
        name = safe_name(source.name)
        self.spawn(self.warm_up)  # while the file is read and sealed

        def build() -> tuple[FileRef, tuple[bytes, ...], bytes]:
            builder = ManifestBuilder(name, size, DEFAULT_CHUNK, key)
            with source.open("rb") as f:
                while block := f.read(DEFAULT_CHUNK):
                    builder.add(block)
            manifest = builder.finish()
            return manifest.ref, manifest.leaves, builder.sha256()

        try:
            ref, leaves, sha256 = await trio.to_thread.run_sync(build)
        except OSError as error:
            raise PigeonError(f"cannot read {source}: {error.strerror}") from None
        except ProtocolError as error:
            # the file changed size while it was read
            raise PigeonError(f"{source} changed while it was read ({error}); try again") from None
        transfer_id = self.random(16)
        with self.db.transaction():
            offer = FileOffer(transfer_id, ref.to_uri(), key, sha256)
            app = self._send(contact, offer, offer_text(ref))
            now = self.conversations.now()
            self.db.execute(
                "INSERT INTO transfers (id, direction, contact, uri, file_key, sha256, leaves,"
                " state, source, offer_message, created_at, updated_at)"
                " VALUES (?, 'out', ?, ?, ?, ?, ?, 'offered', ?, ?, ?, ?)",
                (
                    transfer_id,
                    contact,
                    ref.to_uri(),
                    key,
                    sha256,
                    b"".join(leaves),
                    str(source),
                    app.message_id,
                    now,
                    now,
                ),
            )
            self.db.execute(
                "UPDATE messages SET transfer = ? WHERE id = ?", (transfer_id, app.message_id)
            )
        log.info(
            "transfer=%s offered to %s: %d bytes", transfer_id.hex()[:8], short_id(contact), size
        )
        self._touch()
        return self.get(transfer_id)

    async def _serve(self, transfer_id: bytes, sdp: str) -> None:
        """Answer the receiver's WebRTC offer and serve the file."""
        previous = self._attempts.get(transfer_id)
        if previous is not None:
            previous.cancel()  # the receiver started again: the old attempt is dead
        with trio.CancelScope() as scope:
            self._attempts[transfer_id] = scope
            try:
                await self._serve_once(transfer_id, sdp)
            finally:
                if self._attempts.get(transfer_id) is scope:
                    del self._attempts[transfer_id]
                self._write_progress(transfer_id, force=True)

    async def _serve_once(self, transfer_id: bytes, sdp: str) -> None:
        from pigeon.transfer.rtc import RtcError

        transfer = self.get(transfer_id)
        assert transfer.source is not None and transfer.leaves is not None
        rtc = await self.rtc()
        try:
            dialing, answer = await rtc.answer(sdp)
        except RtcError as error:
            log.warning("transfer=%s bad WebRTC offer: %s", transfer_id.hex()[:8], error)
            return
        try:
            self._signal(transfer, SignalType.ANSWER, payload=answer)
            channel = await dialing.connected(CONNECT_TIMEOUT)
        except RtcError as error:
            await dialing.close()
            self._set(transfer_id, "paused", f"could not connect: {error}")
            return
        self._set(transfer_id, "transferring", None)

        self._progress[transfer_id] = transfer.bytes_sent

        def sent(count: int) -> None:
            self._progress[transfer_id] += count
            self._write_progress(transfer_id)

        try:
            await serve_file(
                channel,
                transfer_id=transfer_id,
                ref=transfer.ref,
                key=transfer.key,
                source=transfer.source,
                leaves=transfer.leaves,
                on_sent=sent,
            )
        except TransferError as error:
            self._ended(transfer, error)
        else:
            self._set(transfer_id, "done", None)
            log.info("transfer=%s sent", transfer_id.hex()[:8])
        finally:
            await channel.close()

    # -- receiving -------------------------------------------------------------------------

    def accept(self, transfer_id: bytes, folder: Path | None) -> Transfer:
        """Accept an offered file (or try a paused one again now)."""
        transfer = self.get(transfer_id)
        if transfer.direction != "in":
            raise PigeonError("that is a file you are sending; the contact accepts it")
        if transfer.state not in ("offered", "paused"):
            raise PigeonError(f"that transfer is {transfer.state}")
        target = folder or transfer.folder or self.downloads
        if not target.is_absolute():
            raise PigeonError(f"{target} is not an absolute path")
        try:
            target.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(target).free
        except OSError as error:
            raise PigeonError(f"cannot use {target}: {error.strerror}") from None
        if not os.access(target, os.W_OK | os.X_OK):
            raise PigeonError(f"cannot write to {target}")
        needed = transfer.ref.size - transfer.bytes_done
        if needed > free:
            raise PigeonError(
                f"not enough free space in {target}: the file needs {human_size(needed)},"
                f" {human_size(free)} are free"
            )
        self.db.execute(
            "UPDATE transfers SET folder = ?, state = 'transferring', error = NULL,"
            " updated_at = ? WHERE id = ?",
            (str(target), self.conversations.now(), transfer_id),
        )
        self._touch()
        self.spawn(self._pull, transfer_id)
        return self.get(transfer_id)

    async def _pull(self, transfer_id: bytes) -> None:
        if transfer_id in self._attempts:
            return
        with trio.CancelScope() as scope:
            self._attempts[transfer_id] = scope
            try:
                await self._pull_once(transfer_id)
            finally:
                del self._attempts[transfer_id]
                self._answers.pop(transfer_id, None)
                self._write_progress(transfer_id, force=True)

    async def _pull_once(self, transfer_id: bytes) -> None:
        from pigeon.transfer.rtc import RtcError

        transfer = self.get(transfer_id)
        if transfer.state not in ("transferring", "paused") or transfer.folder is None:
            return
        self._set(transfer_id, "transferring", None)
        name = self._label(transfer.contact)
        rtc = await self.rtc()
        channel: Channel | None = None
        try:
            dialing, sdp = await rtc.offer()
        except RtcError as error:
            self._set(transfer_id, "paused", f"could not start a connection: {error}")
            return
        try:
            answers, answered = trio.open_memory_channel[str](1)
            self._answers[transfer_id] = answers
            self._signal(transfer, SignalType.OFFER, payload=sdp)
            with trio.move_on_after(CONNECT_TIMEOUT):
                answer = await answered.receive()
                await dialing.accept_answer(answer)
                channel = await dialing.connected(CONNECT_TIMEOUT)
        except RtcError as error:
            self._set(transfer_id, "paused", f"could not connect to {name}: {error}")
            return
        finally:
            if channel is None:
                await dialing.close()
        if channel is None:
            self._set(
                transfer_id,
                "paused",
                f"no connection to {name} within {CONNECT_TIMEOUT:.0f} s;"
                " trying again when they are online",
            )
            return
        await self._receive(transfer, channel)

    async def _receive(self, transfer: Transfer, channel: Channel) -> None:
        assert transfer.folder is not None
        transfer_id = transfer.id
        part = transfer.folder / part_name(transfer.ref, transfer_id)

        def got_leaves(leaves: tuple[bytes, ...]) -> None:
            self.db.execute(
                "UPDATE transfers SET leaves = ? WHERE id = ?", (b"".join(leaves), transfer_id)
            )

        def progress(done: int) -> None:
            self._progress[transfer_id] = done
            self._write_progress(transfer_id)

        try:
            await receive_file(
                channel,
                transfer_id=transfer_id,
                ref=transfer.ref,
                key=transfer.key,
                part=part,
                leaves=transfer.leaves,
                on_leaves=got_leaves,
                on_progress=progress,
            )
        except TransferError as error:
            self._ended(transfer, error)
            return
        except OSError as error:
            problem = TransferError(
                f"cannot write {part}: {os.strerror(error.errno or errno.EIO)}",
                ErrorCode.FAILED,
                Outcome.FINAL if error.errno == errno.ENOSPC else Outcome.RESUMABLE,
            )
            self._ended(transfer, problem)
            return
        finally:
            await channel.close()
        sha256 = await trio.to_thread.run_sync(file_sha256, part)
        if sha256 != transfer.sha256:
            part.unlink(missing_ok=True)
            self._ended(
                transfer,
                TransferError(
                    "the finished file's SHA-256 is not the one offered",
                    ErrorCode.FAILED,
                    Outcome.FINAL,
                ),
            )
            return
        final = await trio.to_thread.run_sync(place, part, transfer.folder, transfer.ref.name)
        self.db.execute(
            "UPDATE transfers SET state = 'done', error = NULL, path = ?, bytes_done = ?,"
            " updated_at = ? WHERE id = ?",
            (str(final), transfer.ref.size, self.conversations.now(), transfer_id),
        )
        self._progress.pop(transfer_id, None)
        self._signal(transfer, SignalType.BYE, reason=ByeReason.DONE)
        log.info("transfer=%s received", transfer_id.hex()[:8])
        self._touch()

    # -- ending ------------------------------------------------------------------------------

    def cancel(self, transfer_id: bytes) -> Transfer:
        """Cancel a transfer either way, or decline an offered file."""
        transfer = self.get(transfer_id)
        if transfer.state in FINAL:
            raise PigeonError(f"that transfer is already {transfer.state}")
        declined = transfer.direction == "in" and transfer.state == "offered"
        state, reason = (
            ("refused", ByeReason.REFUSED) if declined else ("cancelled", ByeReason.CANCELLED)
        )
        self._set(transfer_id, state, "declined by you" if declined else "cancelled by you")
        self._signal(transfer, SignalType.BYE, reason=reason)
        scope = self._attempts.get(transfer_id)
        if scope is not None:
            scope.cancel()
        self._remove_part(transfer)
        return self.get(transfer_id)

    def _ended(self, transfer: Transfer, error: TransferError) -> None:
        """An attempt ended without the file: paused to try again, or failed.
        A peer that breaks the protocol (damaged chunks, malformed messages)
        gets ``MAX_BROKEN_ATTEMPTS`` attempts in a row, not a retry for ever."""
        if error.code == ErrorCode.PROTOCOL and error.outcome == Outcome.RESUMABLE:
            broken = self._broken[transfer.id] = self._broken.get(transfer.id, 0) + 1
            if broken >= MAX_BROKEN_ATTEMPTS:
                error = TransferError(
                    f"{error} ({broken} attempts in a row)", error.code, Outcome.FINAL
                )
        else:
            self._broken.pop(transfer.id, None)
        if error.outcome == Outcome.RESUMABLE:
            self._set(transfer.id, "paused", str(error))
            log.info("transfer=%s paused: %s", transfer.id.hex()[:8], error)
            return
        current = self.get(transfer.id)
        if current.state in FINAL:
            return  # the other side's bye got here first and said why
        self._set(transfer.id, "failed", str(error))
        self._signal(transfer, SignalType.BYE, reason=ByeReason.FAILED, text=str(error))
        self._remove_part(transfer)
        log.warning("transfer=%s failed: %s", transfer.id.hex()[:8], error)

    def _remove_part(self, transfer: Transfer) -> None:
        if transfer.direction == "in" and transfer.folder is not None:
            (transfer.folder / part_name(transfer.ref, transfer.id)).unlink(missing_ok=True)

    # -- what arrives in the conversation -----------------------------------------------------

    def _on_offer(self, item: Incoming) -> bool:
        offer = item.app.content
        assert isinstance(offer, FileOffer)
        if self.db.one("SELECT 1 FROM transfers WHERE id = ?", (offer.transfer_id,)):
            return False  # a copy sent again
        try:
            ref = parse_uri(offer.uri)
        except ProtocolError as error:
            log.warning(
                "contact %s offered a file with a bad reference: %s", short_id(item.sender), error
            )
            self._bye(
                item.sender,
                offer.transfer_id,
                ByeReason.REFUSED,
                f"the file reference is not valid: {error}",
            )
            return True
        now = self.conversations.now()
        self.db.execute(
            "INSERT INTO transfers (id, direction, contact, uri, file_key, sha256, state,"
            " offer_message, created_at, updated_at)"
            " VALUES (?, 'in', ?, ?, ?, ?, 'offered', ?, ?, ?)",
            (
                offer.transfer_id,
                item.sender,
                offer.uri,
                offer.key,
                offer.sha256,
                item.app.message_id,
                now,
                now,
            ),
        )
        self.db.execute(
            "INSERT INTO messages (id, contact, direction, text, lamport, sent_at, received_at,"
            " status, transfer) VALUES (?, ?, 'in', ?, ?, ?, ?, 'received', ?)",
            (
                item.app.message_id,
                item.sender,
                offer_text(ref),
                item.app.lamport,
                item.app.sent_at_ms,
                self.conversations.now_ms(),
                offer.transfer_id,
            ),
        )
        self.spawn(self.warm_up)
        limit = self._auto_accept_limit(item.sender)
        if limit is not None and ref.size <= limit:
            self.spawn(self._auto_accept, offer.transfer_id)
        self._touch()
        return True

    def set_auto_accept(self, contact: bytes | None, limit: int | None) -> None:
        """Accept offers up to ``limit`` bytes without asking: from one contact
        (None turns it off for that contact, whatever the setting for
        everyone), or from every contact without a setting of its own."""
        if contact is None:
            if limit is None:
                self.db.execute("DELETE FROM meta WHERE key = 'auto_accept_bytes'")
            else:
                self.db.set_meta("auto_accept_bytes", str(limit).encode())
            return
        self.db.execute(
            "UPDATE contacts SET auto_accept_bytes = ? WHERE identity_key = ?",
            (-1 if limit is None else limit, contact),
        )

    async def _auto_accept(self, transfer_id: bytes) -> None:
        try:
            self.accept(transfer_id, None)
        except PigeonError as error:
            self._set(transfer_id, "offered", f"not accepted automatically: {error}")

    def _auto_accept_limit(self, contact: bytes) -> int | None:
        row = self.db.one(
            "SELECT auto_accept_bytes FROM contacts WHERE identity_key = ?", (contact,)
        )
        if row is not None and row[0] is not None:
            return int(row[0]) if row[0] >= 0 else None
        everyone = self.db.get_meta("auto_accept_bytes")
        return None if everyone is None else int(everyone)

    def _on_signal(self, item: Incoming) -> bool:
        signal = item.app.content
        assert isinstance(signal, WebRTCSignal)
        row = self.db.one(
            f"SELECT {Transfer.COLUMNS} FROM transfers WHERE id = ? AND contact = ?",
            (signal.transfer_id, item.sender),
        )
        transfer = None if row is None else Transfer.from_row(row)
        if signal.signal_type == SignalType.OFFER:
            if transfer is None or transfer.direction != "out":
                self._bye(item.sender, signal.transfer_id, ByeReason.FAILED, "no such transfer")
            elif transfer.state in FINAL:
                reason = ByeReason.DONE if transfer.state == "done" else ByeReason.CANCELLED
                self._bye(item.sender, transfer.id, reason, transfer.error or "")
            elif self.conversations.now_ms() - item.app.sent_at_ms > STALE_SIGNAL_MS:
                log.info("transfer=%s stale WebRTC offer ignored", transfer.id.hex()[:8])
            else:
                self.spawn(self._serve, transfer.id, signal.payload)
        elif signal.signal_type == SignalType.ANSWER:
            waiting = self._answers.get(signal.transfer_id)
            if transfer is not None and transfer.direction == "in" and waiting is not None:
                with contextlib.suppress(trio.WouldBlock):  # one is there already
                    waiting.send_nowait(signal.payload)
        elif transfer is not None and transfer.state not in FINAL:
            self._on_bye(transfer, signal)
        return True

    def _on_bye(self, transfer: Transfer, signal: WebRTCSignal) -> None:
        name = self._label(transfer.contact)
        reason = signal.reason
        if reason == ByeReason.DONE:
            if transfer.direction != "out":
                return
            state, error = "done", None
        elif reason == ByeReason.CANCELLED:
            state, error = "cancelled", f"cancelled by {name}"
        elif reason == ByeReason.REFUSED:
            state, error = "refused", f"declined by {name}"
        else:
            state, error = "failed", f"failed on {name}'s side"
        if signal.text and error is not None:
            error = f"{error}: {signal.text}"
        self._set(transfer.id, state, error)
        scope = self._attempts.get(transfer.id)
        if scope is not None:
            scope.cancel()
        if state != "done":
            self._remove_part(transfer)

    # -- small things ----------------------------------------------------------------------------

    def _signal(
        self,
        transfer: Transfer,
        signal_type: SignalType,
        *,
        payload: str = "",
        reason: ByeReason | None = None,
        text: str = "",
    ) -> None:
        self._send(
            transfer.contact,
            WebRTCSignal(transfer.id, signal_type, payload, reason, fit_reason(text)),
            None,
        )

    def _bye(self, contact: bytes, transfer_id: bytes, reason: ByeReason, text: str) -> None:
        self._send(
            contact, WebRTCSignal(transfer_id, SignalType.BYE, "", reason, fit_reason(text)), None
        )

    def _set(self, transfer_id: bytes, state: str, error: str | None) -> None:
        assert state in STATES
        self.db.execute(
            "UPDATE transfers SET state = ?, error = ?, updated_at = ? WHERE id = ?",
            (state, error, self.conversations.now(), transfer_id),
        )
        self._touch()

    def _write_progress(self, transfer_id: bytes, *, force: bool = False) -> None:
        """Keep a running transfer's progress, every few seconds (the chunks
        on disk are the truth for a receiver; this is what users see)."""
        if transfer_id not in self._progress:
            return
        now = trio.current_time()
        if not force and now - self._written.get(transfer_id, -PROGRESS_EVERY) < PROGRESS_EVERY:
            return
        self._written[transfer_id] = now
        value = self._progress[transfer_id]
        if force:
            del self._progress[transfer_id]
        column = "bytes_done" if self.get(transfer_id).direction == "in" else "bytes_sent"
        self.db.execute(f"UPDATE transfers SET {column} = ? WHERE id = ?", (value, transfer_id))
        self._touch()

    def _contact(self, key: bytes) -> Contact | None:
        try:
            return self.conversations.contacts.get(key)
        except UnknownContact:
            return None

    def _label(self, key: bytes) -> str:
        found = self._contact(key)
        return found.label if found is not None else short_id(key)
