"""The transfer engine (both ends) over an in-memory link: fast checks of
resume, damaged chunks, a wrong manifest, a changed file and a silent peer.
The same engine runs over real aiortc in test_transfer_e2e.py."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from test_rtc import pair

from pigeon.transfer import engine
from pigeon.transfer.engine import Outcome, TransferError, receive_file, serve_file
from pigeon.transfer.manifest import Manifest, ManifestBuilder
from pigeon.transfer.rtc import Channel
from pigeon.transfer.wire import Chunk, ErrorCode, Hashes, decode

CHUNK = 16 * 1024
TID = bytes(range(16))


class Pipe:
    """One end of an in-memory link; ``tap`` may change or drop what this end sends."""

    def __init__(
        self,
        out: trio.MemorySendChannel[bytes],
        into: trio.MemoryReceiveChannel[bytes],
        tap: Callable[[bytes], bytes | None] = lambda data: data,
    ) -> None:
        self.out, self.into, self.tap = out, into, tap
        self.sent: list[bytes] = []

    async def send(self, data: bytes) -> None:
        changed = self.tap(data)
        if changed is not None:
            self.sent.append(changed)
            await self.out.send(changed)

    async def receive(self) -> bytes:
        return await self.into.receive()


def pipes(
    sender_tap: Callable[[bytes], bytes | None] = lambda data: data,
) -> tuple[Pipe, Pipe]:
    a_out, b_in = trio.open_memory_channel[bytes](1000)
    b_out, a_in = trio.open_memory_channel[bytes](1000)
    return Pipe(a_out, a_in), Pipe(b_out, b_in, sender_tap)


def make_file(path: Path, size: int) -> tuple[Manifest, bytes, bytes]:
    data = os.urandom(size)
    path.write_bytes(data)
    key = os.urandom(32)
    builder = ManifestBuilder(path.name, size, CHUNK, key)
    for i in range(0, size, CHUNK):
        builder.add(data[i : i + CHUNK])
    return builder.finish(), key, hashlib.sha256(data).digest()


async def run(
    tmp_path: Path,
    size: int,
    *,
    sender_tap: Callable[[bytes], bytes | None] = lambda data: data,
    leaves_for_sender: tuple[bytes, ...] | None = None,
    before: Callable[[Path, Path], None] = lambda source, part: None,
) -> tuple[Pipe, Pipe, Path, Path, list[int]]:
    source = tmp_path / "source.bin"
    manifest, key, _ = make_file(source, size)
    part = tmp_path / "file.part"
    before(source, part)
    receiver, sender = pipes(sender_tap)
    progress: list[int] = []
    errors: list[BaseException] = []

    async def serve() -> None:
        try:
            await serve_file(
                sender,
                transfer_id=TID,
                ref=manifest.ref,
                key=key,
                source=source,
                leaves=leaves_for_sender or manifest.leaves,
                on_sent=lambda n: None,
            )
        except TransferError as error:
            errors.append(error)

    failed: list[TransferError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await receive_file(
                receiver,
                transfer_id=TID,
                ref=manifest.ref,
                key=key,
                part=part,
                leaves=None,
                on_leaves=lambda leaves: None,
                on_progress=progress.append,
            )
        except TransferError as error:
            failed.append(error)
        # the sender ends on the receiver's Done or Error, or by its own deadline
        nursery.cancel_scope.deadline = trio.current_time() + 10
    if failed:
        raise failed[0]
    return receiver, sender, source, part, progress


def transfer(
    tmp_path: Path, size: int, **options: object
) -> tuple[Pipe, Pipe, Path, Path, list[int]]:
    return trio.run(functools.partial(run, tmp_path, size, **options))  # type: ignore[arg-type]


def chunks_sent(pipe: Pipe) -> list[int]:
    return [m.index for m in map(decode, pipe.sent) if isinstance(m, Chunk)]


@pytest.mark.parametrize("size", [0, 1, CHUNK, 5 * CHUNK + 7])
def test_a_file_arrives_whole(tmp_path, size):
    _, sender, source, part, progress = transfer(tmp_path, size)
    assert part.read_bytes() == source.read_bytes()
    assert progress[-1] == size
    assert sorted(chunks_sent(sender)) == list(range(max(1, -(-size // CHUNK))))


def test_resume_fetches_only_what_is_missing(tmp_path):
    """A partial file with chunks 0-5 whole and 6 cut short: only 6 and what
    follows are sent."""
    size = 12 * CHUNK

    def partial(source: Path, part: Path) -> None:
        part.write_bytes(source.read_bytes()[: 6 * CHUNK + 100])

    _, sender, source, part, progress = transfer(tmp_path, size, before=partial)
    assert part.read_bytes() == source.read_bytes()
    assert sorted(chunks_sent(sender)) == list(range(6, 12))
    assert progress[0] == 6 * CHUNK


def test_resume_verifies_chunks_on_disk(tmp_path):
    """A chunk damaged on disk (a crash mid-write) is fetched again."""
    size = 8 * CHUNK

    def damaged(source: Path, part: Path) -> None:
        data = bytearray(source.read_bytes())
        data[3 * CHUNK + 9] ^= 0x80
        part.write_bytes(bytes(data))

    _, sender, source, part, _ = transfer(tmp_path, size, before=damaged)
    assert part.read_bytes() == source.read_bytes()
    assert chunks_sent(sender) == [3]


def test_a_damaged_chunk_is_refused_and_fetched_again(tmp_path):
    damaged: list[int] = []

    def corrupt_chunk_two_once(data: bytes) -> bytes:
        message = decode(data)
        if isinstance(message, Chunk) and message.index == 2 and not damaged:
            damaged.append(2)
            body = bytearray(message.ciphertext)
            body[10] ^= 1
            return Chunk(2, bytes(body)).encode()
        return data

    _, sender, source, part, _ = transfer(tmp_path, 6 * CHUNK, sender_tap=corrupt_chunk_two_once)
    assert damaged == [2]
    assert part.read_bytes() == source.read_bytes()
    assert chunks_sent(sender).count(2) == 2


def test_a_sender_that_only_sends_damage_is_given_up(tmp_path):
    def corrupt_all(data: bytes) -> bytes:
        message = decode(data)
        if isinstance(message, Chunk):
            return Chunk(message.index, bytes(len(message.ciphertext))).encode()
        return data

    with pytest.raises(TransferError, match="damaged chunks") as caught:
        transfer(tmp_path, 4 * CHUNK, sender_tap=corrupt_all)
    assert caught.value.outcome == Outcome.RESUMABLE


def test_hashes_that_do_not_match_the_root_are_refused(tmp_path):
    def wrong_hash(data: bytes) -> bytes:
        message = decode(data)
        if isinstance(message, Hashes):
            hashes = list(message.hashes)
            hashes[1] = bytes(32)
            return Hashes(message.start, tuple(hashes)).encode()
        return data

    with pytest.raises(TransferError, match="do not match the file's root") as caught:
        transfer(tmp_path, 4 * CHUNK, sender_tap=wrong_hash)
    assert caught.value.outcome == Outcome.FINAL


def test_a_file_changed_since_the_offer_is_never_sent(tmp_path):
    """The sender checks each chunk against its hash before it sends it: the
    new contents never leave under the old key."""

    def change_after_offer(source: Path, part: Path) -> None:
        data = bytearray(source.read_bytes())
        data[CHUNK + 1] ^= 1
        source.write_bytes(bytes(data))

    with pytest.raises(TransferError, match="file changed") as caught:
        transfer(tmp_path, 3 * CHUNK, before=change_after_offer)
    assert caught.value.outcome == Outcome.FINAL
    assert caught.value.code == ErrorCode.FILE_CHANGED


def test_a_silent_sender_is_noticed_within_seconds(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "DEAD_AFTER", 1.0)
    after_hashes: list[bool] = []

    def go_silent(data: bytes) -> bytes | None:
        if after_hashes:
            return None  # nothing more, pings included: a peer killed -9
        if isinstance(decode(data), Hashes):
            after_hashes.append(True)
        return data

    async def timed() -> float:
        start = trio.current_time()
        with pytest.raises(TransferError, match="no word from the sender") as caught:
            await run(tmp_path, 4 * CHUNK, sender_tap=go_silent)
        assert caught.value.outcome == Outcome.RESUMABLE
        return trio.current_time() - start

    assert trio.run(timed) < 3


def test_garbage_from_the_sender_ends_the_attempt_cleanly(tmp_path):
    def garbage(data: bytes) -> bytes:
        return b"\xff" + data[1:] if isinstance(decode(data), Hashes) else data

    with pytest.raises(TransferError, match="malformed") as caught:
        transfer(tmp_path, 2 * CHUNK, sender_tap=garbage)
    assert caught.value.outcome == Outcome.RESUMABLE


class Tapped:
    """A real data channel whose outgoing messages pass through ``tap``."""

    def __init__(self, channel: Channel, tap: Callable[[bytes], bytes | None]) -> None:
        self.channel, self.tap = channel, tap

    async def send(self, data: bytes) -> None:
        changed = self.tap(data)
        if changed is not None:
            await self.channel.send(changed)

    async def receive(self) -> bytes:
        return await self.channel.receive()


def test_over_real_aiortc_a_damaged_chunk_is_fetched_again(tmp_path):
    """The engine over a real data channel, with a sender that damages one
    chunk once: the chunk is refused, fetched again, and the file is whole."""
    source = tmp_path / "source.bin"
    manifest, key, digest = make_file(source, 3_000_000)
    part = tmp_path / "file.part"
    damaged: list[int] = []

    def corrupt_once(data: bytes) -> bytes:
        message = decode(data)
        if isinstance(message, Chunk) and message.index == 100 and not damaged:
            damaged.append(message.index)
            return Chunk(100, bytes(len(message.ciphertext))).encode()
        return data

    async def main() -> None:
        async with pair() as (_, _, offerer, answerer), trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    serve_file,
                    Tapped(answerer, corrupt_once),
                    transfer_id=TID,
                    ref=manifest.ref,
                    key=key,
                    source=source,
                    leaves=manifest.leaves,
                    on_sent=lambda n: None,
                )
            )
            await receive_file(
                offerer,
                transfer_id=TID,
                ref=manifest.ref,
                key=key,
                part=part,
                leaves=None,
                on_leaves=lambda leaves: None,
                on_progress=lambda n: None,
            )

    trio.run(main)
    assert damaged == [100]
    assert hashlib.sha256(part.read_bytes()).digest() == digest
