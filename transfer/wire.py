"""The messages of a file transfer, one per WebRTC data-channel message.

The receiver pulls: it says HELLO, asks for pages of leaf hashes and for
runs of chunks; the sender answers.  The first byte is the message type; a
CHUNK is the index (4 bytes, big-endian) and the ciphertext, so sending one
costs no encoding; every other message is a protobuf body (protocol.wire).
Constructing or decoding a message that breaks a rule raises ProtocolError.
No I/O here (docs/protocol/files.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from pigeon.protocol.errors import ProtocolError
from pigeon.protocol.messages import MAX_REASON_BYTES, TRANSFER_ID_SIZE, check_reason
from pigeon.protocol.wire import Fields, Writer

from .manifest import HASH_SIZE, MAX_CHUNK, MAX_CHUNKS, TAG_SIZE
from .manifest import MAX_HASHES_PER_PAGE as MAX_HASHES_PER_PAGE  # a rule of these messages too

VERSION = 1
MAX_WANT = 256  # chunks per WANT: 32 MiB in flight at most, at the largest chunk size
MAX_ERROR_TEXT = MAX_REASON_BYTES  # a reason, like a bye's: fit_reason makes any text one
_CHUNK_HEADER = 5  # type byte and index
MAX_CHUNK_MESSAGE = _CHUNK_HEADER + MAX_CHUNK + TAG_SIZE
# HASHES is the largest protobuf message: type, start (<= 3 varint bytes and
# its key), the hashes (their key and a 3-byte length) and a full page.
_MAX_HASHES_MESSAGE = 1 + 4 + 4 + MAX_HASHES_PER_PAGE * HASH_SIZE
MAX_MESSAGE = max(MAX_CHUNK_MESSAGE, _MAX_HASHES_MESSAGE)
assert MAX_MESSAGE <= 262_144, "a message must fit in one data-channel message (256 KiB)"


class MessageType(IntEnum):
    HELLO = 1
    WANT_HASHES = 2
    HASHES = 3
    WANT = 4
    CHUNK = 5
    PING = 6
    DONE = 7
    ERROR = 8


class ErrorCode(IntEnum):
    CANCELLED = 1  # a person stopped the transfer
    REFUSED = 2  # the sender will not serve this receiver
    FAILED = 3  # something broke on the sending side (disk, memory)
    FILE_CHANGED = 4  # the file no longer matches its manifest
    UNKNOWN_TRANSFER = 5  # no offer with this transfer ID
    PROTOCOL = 6  # the other side broke these rules


def _check_run(start: int, count: int, limit: int) -> None:
    """A run of hashes or chunks that some file could have."""
    if not 1 <= count <= limit:
        raise ProtocolError(f"a run must hold 1 to {limit} items")
    if not 0 <= start <= MAX_CHUNKS - count:
        raise ProtocolError(f"a run must end within {MAX_CHUNKS} chunks")


@dataclass(frozen=True)
class Hello:
    """The receiver's first message: which offer it is fetching, and in which
    version of these messages (only 1 exists: any other is refused)."""

    transfer_id: bytes
    version: int = VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.transfer_id, bytes) or len(self.transfer_id) != TRANSFER_ID_SIZE:
            raise ProtocolError(f"a transfer ID is {TRANSFER_ID_SIZE} bytes")
        if self.version != VERSION:
            raise ProtocolError(f"transfer protocol version is not {VERSION}")

    def encode(self) -> bytes:
        body = Writer().bytes_(1, self.transfer_id).uint(2, self.version).finish()
        return bytes([MessageType.HELLO]) + body

    @classmethod
    def _decode(cls, f: Fields) -> Hello:
        return cls(f.bytes_(1, size=TRANSFER_ID_SIZE), f.uint(2, default=None))


@dataclass(frozen=True)
class WantHashes:
    """Send me the leaf hashes ``start .. start + count - 1`` (one page at most)."""

    start: int
    count: int

    def __post_init__(self) -> None:
        _check_run(self.start, self.count, MAX_HASHES_PER_PAGE)

    def encode(self) -> bytes:
        body = Writer().uint(1, self.start).uint(2, self.count).finish()
        return bytes([MessageType.WANT_HASHES]) + body

    @classmethod
    def _decode(cls, f: Fields) -> WantHashes:
        return cls(
            f.uint(1, maximum=MAX_CHUNKS), f.uint(2, default=None, maximum=MAX_HASHES_PER_PAGE)
        )


@dataclass(frozen=True)
class Hashes:
    """Leaf hashes from ``start`` on, 1 to MAX_HASHES_PER_PAGE of them."""

    start: int
    hashes: tuple[bytes, ...] = field(repr=False)

    def __post_init__(self) -> None:
        _check_run(self.start, len(self.hashes), MAX_HASHES_PER_PAGE)
        if any(not isinstance(h, bytes) or len(h) != HASH_SIZE for h in self.hashes):
            raise ProtocolError(f"a leaf hash is {HASH_SIZE} bytes")

    def encode(self) -> bytes:
        body = Writer().uint(1, self.start).bytes_(2, b"".join(self.hashes)).finish()
        return bytes([MessageType.HASHES]) + body

    @classmethod
    def _decode(cls, f: Fields) -> Hashes:
        raw = f.bytes_(2, max_size=MAX_HASHES_PER_PAGE * HASH_SIZE)
        if not raw or len(raw) % HASH_SIZE:
            raise ProtocolError(f"hashes must be a whole number of {HASH_SIZE}-byte hashes")
        hashes = tuple(raw[i : i + HASH_SIZE] for i in range(0, len(raw), HASH_SIZE))
        return cls(f.uint(1, maximum=MAX_CHUNKS), hashes)


@dataclass(frozen=True)
class Want:
    """Send me chunks ``start .. start + count - 1``, in order."""

    start: int
    count: int

    def __post_init__(self) -> None:
        _check_run(self.start, self.count, MAX_WANT)

    def encode(self) -> bytes:
        body = Writer().uint(1, self.start).uint(2, self.count).finish()
        return bytes([MessageType.WANT]) + body

    @classmethod
    def _decode(cls, f: Fields) -> Want:
        return cls(f.uint(1, maximum=MAX_CHUNKS), f.uint(2, default=None, maximum=MAX_WANT))


@dataclass(frozen=True)
class Chunk:
    """One encrypted chunk: at least the tag, at most a full chunk and its tag."""

    index: int
    ciphertext: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_CHUNKS:
            raise ProtocolError(f"a chunk index is below {MAX_CHUNKS}")
        if not TAG_SIZE <= len(self.ciphertext) <= MAX_CHUNK + TAG_SIZE:
            raise ProtocolError(f"an encrypted chunk is {TAG_SIZE} to {MAX_CHUNK + TAG_SIZE} bytes")

    def encode(self) -> bytes:
        return bytes([MessageType.CHUNK]) + self.index.to_bytes(4, "big") + self.ciphertext


@dataclass(frozen=True)
class Ping:
    """A heartbeat, both ways: silence for too long means the peer is gone."""

    sequence: int

    def __post_init__(self) -> None:
        if not 0 <= self.sequence < 1 << 64:
            raise ProtocolError("a ping sequence is a 64-bit number")

    def encode(self) -> bytes:
        return bytes([MessageType.PING]) + Writer().uint(1, self.sequence).finish()

    @classmethod
    def _decode(cls, f: Fields) -> Ping:
        return cls(f.uint(1))


@dataclass(frozen=True)
class Done:
    """The receiver has the whole file, every chunk verified."""

    def encode(self) -> bytes:
        return bytes([MessageType.DONE])

    @classmethod
    def _decode(cls, f: Fields) -> Done:
        return cls()


@dataclass(frozen=True)
class Error:
    """The ERROR message (not an exception): the transfer ends, with a code
    and a one-line reason for the person on the other side."""

    code: ErrorCode
    text: str = ""

    def __post_init__(self) -> None:
        try:
            ErrorCode(self.code)
        except ValueError:
            raise ProtocolError("unknown transfer error code") from None
        check_reason(self.text)

    def encode(self) -> bytes:
        body = Writer().uint(1, self.code).text(2, self.text).finish()
        return bytes([MessageType.ERROR]) + body

    @classmethod
    def _decode(cls, f: Fields) -> Error:
        try:
            code = ErrorCode(f.uint(1, default=None, maximum=0xFF))
        except ValueError:
            raise ProtocolError("unknown transfer error code") from None
        return cls(code, f.text(2, required=False, max_size=MAX_ERROR_TEXT))


Message = Hello | WantHashes | Hashes | Want | Chunk | Ping | Done | Error

_BODIES: dict[int, type[Hello | WantHashes | Hashes | Want | Ping | Done | Error]] = {
    MessageType.HELLO: Hello,
    MessageType.WANT_HASHES: WantHashes,
    MessageType.HASHES: Hashes,
    MessageType.WANT: Want,
    MessageType.PING: Ping,
    MessageType.DONE: Done,
    MessageType.ERROR: Error,
}


def decode(data: bytes) -> Message:
    """The message in one data-channel message; ProtocolError if anything is wrong."""
    if not isinstance(data, bytes):
        raise ProtocolError("a transfer message is bytes")
    if not data:
        raise ProtocolError("empty transfer message")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"transfer message is longer than {MAX_MESSAGE} bytes")
    kind = data[0]
    if kind == MessageType.CHUNK:
        # Cut short, it has no ciphertext, which Chunk refuses (shorter than the tag).
        return Chunk(int.from_bytes(data[1:_CHUNK_HEADER], "big"), data[_CHUNK_HEADER:])
    body = _BODIES.get(kind)
    if body is None:
        raise ProtocolError(f"unknown transfer message type {kind}")
    return body._decode(Fields(data[1:]))
