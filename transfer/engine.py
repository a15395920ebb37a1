"""Both ends of one file transfer over a data channel: the receiver pulls, the
sender serves.

The receiver drives everything: it asks for the chunk hashes (checked against
the root the offer named), checks which chunks of its partial file are already
good, and asks for the rest a run at a time, never more than ``WINDOW`` chunks
outstanding, so what the channel can bring at once is bounded by what the
receiver asked for.  Every chunk is checked against its hash before it is
decrypted and written; one that fails is asked for again.  Resuming is the
same walk: chunks already on disk are verified again (a kill -9 may have left
a chunk half written) and never fetched twice.

Both ends send a ``Ping`` every ``HEARTBEAT`` seconds and give up on a peer
silent for ``DEAD_AFTER``: aiortc alone notices a dead peer only after half a
minute.  ``Link`` is the one thing the engine needs from the transport, so the
same code runs over an aiortc data channel and, in tests, over a memory pipe.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import trio

from pigeon.protocol import ProtocolError, fit_reason

from .manifest import (
    chunk_count,
    chunk_length,
    leaf_hash,
    open_chunk,
    seal_chunk,
    verify_leaves,
)
from .reference import FileRef
from .wire import (
    MAX_HASHES_PER_PAGE,
    MAX_WANT,
    Chunk,
    Done,
    Error,
    ErrorCode,
    Hashes,
    Hello,
    Ping,
    Want,
    WantHashes,
    decode,
)

HEARTBEAT = 1.0  # seconds between pings
DEAD_AFTER = 5.0  # a peer silent this long is gone
SEND_TIMEOUT = 15.0  # a send blocked on flow control this long: the peer is gone
WINDOW = 8  # chunks asked for and not yet received (1 MiB at 128 KiB): what a broken link wastes
MAX_REJECTED = 16  # damaged chunks from one sender before the attempt is given up
VERSION = 1


class Link(Protocol):
    """A reliable, ordered message channel (an aiortc data channel)."""

    async def send(self, data: bytes) -> None: ...

    async def receive(self) -> bytes: ...


class Outcome(IntEnum):
    """How a transfer ended when it did not end well."""

    RESUMABLE = 1  # try again later, from where it stopped
    FINAL = 2  # trying again cannot help


class TransferError(Exception):
    """The attempt ended before the file was complete; ``str(self)`` is one
    line for the user, ``code`` what the other side is told."""

    def __init__(self, text: str, code: ErrorCode, outcome: Outcome) -> None:
        super().__init__(text)
        self.code = code
        self.outcome = outcome


def _gone(text: str) -> TransferError:
    return TransferError(text, ErrorCode.FAILED, Outcome.RESUMABLE)


def _from_peer(error: Error, who: str) -> TransferError:
    """The other side ended the transfer and said why."""
    what = {
        ErrorCode.CANCELLED: "cancelled by the " + who,
        ErrorCode.REFUSED: "refused by the " + who,
        ErrorCode.FILE_CHANGED: "the file changed on the sender's side since it was offered",
        ErrorCode.UNKNOWN_TRANSFER: "the " + who + " does not know this transfer",
    }.get(error.code, f"the {who} gave up")
    text = f"{what}: {error.text}" if error.text else what
    final = error.code != ErrorCode.FAILED
    return TransferError(text, error.code, Outcome.FINAL if final else Outcome.RESUMABLE)


class _Peer:
    """One side's view of the link: receive with the heartbeat deadline, send
    with its own, and pings in the background."""

    def __init__(self, link: Link, who: str) -> None:
        self.link = link
        self.who = who

    async def send(self, data: bytes) -> None:
        try:
            with trio.fail_after(SEND_TIMEOUT):
                await self.link.send(data)
        except trio.TooSlowError:
            raise _gone(f"the {self.who} stopped taking data") from None
        except TransferError:
            raise
        except Exception as error:
            raise _gone(f"the connection to the {self.who} was lost ({error})") from None

    async def receive(self) -> object:
        """The next message that is not a ping."""
        while True:
            try:
                with trio.fail_after(DEAD_AFTER):
                    data = await self.link.receive()
            except trio.TooSlowError:
                raise _gone(f"no word from the {self.who} for {DEAD_AFTER:.0f} s") from None
            except Exception as error:
                raise _gone(f"the connection to the {self.who} was lost ({error})") from None
            try:
                message = decode(data)
            except ProtocolError as error:
                raise TransferError(
                    f"the {self.who} sent a malformed message ({error})",
                    ErrorCode.PROTOCOL,
                    Outcome.RESUMABLE,
                ) from None
            if not isinstance(message, Ping):
                return message

    async def heartbeat(self) -> None:
        """Ping until cancelled.  A ping that cannot go ends the pinging only:
        the side's receive notices the dead link and says so."""
        sequence = 0
        while True:
            try:
                await self.send(Ping(sequence).encode())
            except TransferError:
                return
            sequence += 1
            await trio.sleep(HEARTBEAT)

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` with pings going out beside it; a TransferError from
        it is raised as itself (not in an exception group), after the other
        side is told why when the link still works."""
        failure: TransferError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.heartbeat)
            try:
                await work()
            except TransferError as error:
                failure = error
            nursery.cancel_scope.cancel()
        if failure is not None:
            await _tell(self, failure)
            raise failure

    def unexpected(self, message: object) -> TransferError:
        return TransferError(
            f"the {self.who} sent an unexpected {type(message).__name__} message",
            ErrorCode.PROTOCOL,
            Outcome.RESUMABLE,
        )


async def _tell(peer: _Peer, error: TransferError) -> None:
    """Say why we stop, if the link still carries it (best effort, bounded)."""
    if error.outcome == Outcome.RESUMABLE and error.code == ErrorCode.FAILED:
        return  # the link itself failed: nothing will arrive
    with trio.move_on_after(2), trio.CancelScope(shield=True):
        try:
            await peer.link.send(Error(error.code, fit_reason(str(error))).encode())
        except Exception:
            return


# -- the receiver ------------------------------------------------------------------


def verified_chunks(
    part: Path, ref: FileRef, key: bytes, leaves: Sequence[bytes]
) -> tuple[set[int], int]:
    """The chunks of a partial file that are already right, and their bytes.

    Blocking (it reads and encrypts what is on disk): run it in a thread.
    """
    good: set[int] = set()
    done = 0
    try:
        fd = os.open(part, os.O_RDONLY)
    except FileNotFoundError:
        return good, 0
    try:
        on_disk = os.fstat(fd).st_size
        for index in range(chunk_count(ref.size, ref.chunk_size)):
            offset = index * ref.chunk_size
            length = chunk_length(ref.size, ref.chunk_size, index)
            if offset + length > on_disk:
                continue
            data = os.pread(fd, length, offset)
            if len(data) == length and (
                leaf_hash(seal_chunk(key, ref.size, ref.chunk_size, index, data)) == leaves[index]
            ):
                good.add(index)
                done += length
    finally:
        os.close(fd)
    return good, done


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a whole file (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.digest()


async def _fetch_leaves(peer: _Peer, ref: FileRef) -> tuple[bytes, ...]:
    count = chunk_count(ref.size, ref.chunk_size)
    leaves: list[bytes] = []
    while len(leaves) < count:
        start = len(leaves)
        want = min(MAX_HASHES_PER_PAGE, count - start)
        await peer.send(WantHashes(start, want).encode())
        message = await peer.receive()
        if isinstance(message, Error):
            raise _from_peer(message, peer.who)
        if not isinstance(message, Hashes) or message.start != start:
            raise peer.unexpected(message)
        page = message.hashes
        if len(page) != want:
            raise TransferError(
                f"the {peer.who} sent {len(page)} chunk hashes where {want} were asked for",
                ErrorCode.PROTOCOL,
                Outcome.RESUMABLE,
            )
        leaves.extend(page)
    try:
        verify_leaves(ref, leaves)
    except ProtocolError:
        raise TransferError(
            "the sender's chunk hashes do not match the file's root: not the offered file",
            ErrorCode.PROTOCOL,
            Outcome.FINAL,
        ) from None
    return tuple(leaves)


async def receive_file(
    link: Link,
    *,
    transfer_id: bytes,
    ref: FileRef,
    key: bytes,
    part: Path,
    leaves: Sequence[bytes] | None,
    on_leaves: Callable[[tuple[bytes, ...]], None],
    on_progress: Callable[[int], None],
) -> None:
    """Pull the file into ``part`` until every chunk is there and verified,
    then fsync it.  ``leaves`` are the chunk hashes if a previous attempt got
    them (``on_leaves`` is told when this one does).  Raises TransferError."""
    peer = _Peer(link, "sender")

    async def work() -> None:
        await peer.send(Hello(transfer_id, VERSION).encode())
        got = leaves
        if got is None:
            got = await _fetch_leaves(peer, ref)
            on_leaves(got)
        await _pull(peer, ref, key, part, tuple(got), on_progress)
        with trio.move_on_after(2):
            await peer.send(Done().encode())

    await peer.run(work)


async def _pull(
    peer: _Peer,
    ref: FileRef,
    key: bytes,
    part: Path,
    leaves: tuple[bytes, ...],
    on_progress: Callable[[int], None],
) -> None:
    have, done = await trio.to_thread.run_sync(verified_chunks, part, ref, key, leaves)
    on_progress(done)
    missing = [i for i in range(len(leaves)) if i not in have]
    fd = os.open(part, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        position = 0  # into missing: what has been asked for
        outstanding: set[int] = set()
        rejected = 0
        while position < len(missing) or outstanding:
            # ask for the next run of consecutive missing chunks the window allows
            if position < len(missing) and len(outstanding) < WINDOW:
                start = missing[position]
                count = 1
                while (
                    position + count < len(missing)
                    and missing[position + count] == start + count
                    and count < MAX_WANT
                    and len(outstanding) + count < WINDOW
                ):
                    count += 1
                await peer.send(Want(start, count).encode())
                outstanding.update(range(start, start + count))
                position += count
                continue
            message = await peer.receive()
            if isinstance(message, Error):
                raise _from_peer(message, peer.who)
            if not isinstance(message, Chunk) or message.index not in outstanding:
                raise peer.unexpected(message)
            index = message.index
            if leaf_hash(message.ciphertext) != leaves[index]:
                rejected += 1
                if rejected > MAX_REJECTED:
                    raise TransferError(
                        f"the sender sent {rejected} damaged chunks",
                        ErrorCode.PROTOCOL,
                        Outcome.RESUMABLE,
                    )
                await peer.send(Want(index, 1).encode())  # once more
                continue
            try:
                data = open_chunk(key, ref.size, ref.chunk_size, index, message.ciphertext)
            except ProtocolError:
                # its hash is in the tree, so the sender encrypted it under
                # another key: nothing it sends will ever open
                raise TransferError(
                    "the sender's chunks do not open with the offered key",
                    ErrorCode.PROTOCOL,
                    Outcome.FINAL,
                ) from None
            os.pwrite(fd, data, index * ref.chunk_size)
            outstanding.discard(index)
            done += len(data)
            on_progress(done)
        os.ftruncate(fd, ref.size)
        await trio.to_thread.run_sync(os.fsync, fd)
    finally:
        os.close(fd)


# -- the sender ----------------------------------------------------------------------


async def serve_file(
    link: Link,
    *,
    transfer_id: bytes,
    ref: FileRef,
    key: bytes,
    source: Path,
    leaves: Sequence[bytes],
    on_sent: Callable[[int], None],
) -> None:
    """Serve what the receiver asks for until it says it is done.  Every chunk
    is encrypted again and checked against its hash before it is sent: a file
    that changed since the offer ends the transfer, and its new contents never
    leave under the old key (manifest.py).  Raises TransferError."""
    peer = _Peer(link, "receiver")

    async def work() -> None:
        hello = await peer.receive()
        if isinstance(hello, Error):
            raise _from_peer(hello, peer.who)
        if not isinstance(hello, Hello):
            raise peer.unexpected(hello)
        if hello.transfer_id != transfer_id:
            raise TransferError(
                "the receiver asked for another transfer",
                ErrorCode.UNKNOWN_TRANSFER,
                Outcome.RESUMABLE,
            )
        await _serve(peer, ref, key, source, tuple(leaves), on_sent)

    await peer.run(work)


async def _serve(
    peer: _Peer,
    ref: FileRef,
    key: bytes,
    source: Path,
    leaves: tuple[bytes, ...],
    on_sent: Callable[[int], None],
) -> None:
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as error:
        raise TransferError(
            f"the file cannot be read any more ({error.strerror})",
            ErrorCode.FILE_CHANGED,
            Outcome.FINAL,
        ) from None
    try:
        while True:
            message = await peer.receive()
            if isinstance(message, Done):
                return
            if isinstance(message, Error):
                raise _from_peer(message, peer.who)
            if isinstance(message, WantHashes):
                if message.start + message.count > len(leaves):
                    raise peer.unexpected(message)
                page = leaves[message.start : message.start + message.count]
                await peer.send(Hashes(message.start, page).encode())
            elif isinstance(message, Want):
                if message.start + message.count > len(leaves):
                    raise peer.unexpected(message)
                for index in range(message.start, message.start + message.count):
                    length = chunk_length(ref.size, ref.chunk_size, index)
                    data = os.pread(fd, length, index * ref.chunk_size)
                    if (
                        len(data) != length
                        or leaf_hash(
                            sealed := seal_chunk(key, ref.size, ref.chunk_size, index, data)
                        )
                        != leaves[index]
                    ):
                        raise TransferError(
                            "the file changed since it was offered",
                            ErrorCode.FILE_CHANGED,
                            Outcome.FINAL,
                        )
                    await peer.send(Chunk(index, sealed).encode())
                    on_sent(len(sealed))
            else:
                raise peer.unexpected(message)
    finally:
        os.close(fd)
