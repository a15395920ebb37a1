"""Application messages: what travels inside the ratchet.

Every message has a random 16-byte ID (for deduplication and receipts), a
Lamport clock (for a stable order in the conversation) and the sender's
wall-clock time in milliseconds (for display only; passed in by the caller).
Kinds this version does not know decode to :class:`Unknown`, which callers
ignore.  No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .crypto import Random
from .errors import LocalProtocolError, ProtocolError
from .mailbox import MAX_TOKEN_SIZE, DepositToken
from .wire import Fields, Writer

MESSAGE_ID_SIZE = 16
# The one limit on a text, in bytes of UTF-8: small enough that the largest
# text, with its message, ratchet and prekey headers, still pads to the
# 64 KiB envelope bucket (tests check it), not the next one at 256 KiB.
MAX_TEXT_BYTES = 65_000
MAX_RECEIPT_IDS = 1000
MAX_SIGNAL_BYTES = 64 * 1024


def check_text(text: str) -> None:
    """Raise LocalProtocolError, saying why, unless ``text`` can be sent as one message."""
    if not text:
        raise LocalProtocolError("nothing to send: the message is empty")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise LocalProtocolError("the message is not valid text (a lone surrogate)") from None
    if size > MAX_TEXT_BYTES:
        raise LocalProtocolError(
            f"message too long: {size:,} bytes of UTF-8; the limit is {MAX_TEXT_BYTES:,}"
        )


class Kind(IntEnum):
    TEXT = 1
    RECEIPT = 2
    FILE_OFFER = 3
    WEBRTC_SIGNAL = 4
    SESSION_RESET = 5
    MAILBOX_TOKEN = 6


class ReceiptType(IntEnum):
    DELIVERED = 1
    READ = 2


class ResetReason(IntEnum):
    UNDECRYPTABLE = 1  # envelopes from you arrived that no session of mine can read


class SignalType(IntEnum):
    OFFER = 1
    ANSWER = 2
    CANDIDATE = 3
    BYE = 4


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Receipt:
    receipt_type: ReceiptType
    message_ids: tuple[bytes, ...]


@dataclass(frozen=True)
class FileOffer:
    uri: str
    name: str
    size: int


@dataclass(frozen=True)
class WebRTCSignal:
    transfer_id: bytes
    signal_type: SignalType
    payload: str


@dataclass(frozen=True)
class SessionReset:
    """Sent in a session the sender has just started: "I could not read
    ``failed`` of your envelopes; use this session and send again what I
    have not confirmed".  It travels inside a fresh X3DH session, so it is as
    authenticated as any message."""

    reason: ResetReason
    failed: int


@dataclass(frozen=True)
class MailboxToken:
    """The sender's deposit token (an encoded mailbox.DepositToken): with it,
    the receiver leaves envelopes at the sender's mailboxes without work."""

    token: bytes


@dataclass(frozen=True)
class Unknown:
    """A kind from a newer version: keep the bytes, show nothing."""

    kind: int
    body: bytes


Content = Text | Receipt | FileOffer | WebRTCSignal | SessionReset | MailboxToken | Unknown


def _encode_content(content: Content) -> tuple[int, bytes]:
    if isinstance(content, Text):
        return Kind.TEXT, Writer().text(1, content.text).finish()
    if isinstance(content, Receipt):
        w = Writer().uint(1, content.receipt_type).repeated_bytes(2, content.message_ids)
        return Kind.RECEIPT, w.finish()
    if isinstance(content, FileOffer):
        w = Writer().text(1, content.uri).text(2, content.name).uint(3, content.size)
        return Kind.FILE_OFFER, w.finish()
    if isinstance(content, WebRTCSignal):
        w = (
            Writer()
            .bytes_(1, content.transfer_id)
            .uint(2, content.signal_type)
            .text(3, content.payload)
        )
        return Kind.WEBRTC_SIGNAL, w.finish()
    if isinstance(content, SessionReset):
        return Kind.SESSION_RESET, Writer().uint(1, content.reason).uint(2, content.failed).finish()
    if isinstance(content, MailboxToken):
        return Kind.MAILBOX_TOKEN, Writer().bytes_(1, content.token).finish()
    return content.kind, content.body


def _enum(cls: type[ReceiptType] | type[SignalType] | type[ResetReason], value: int) -> int:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(f"unknown {cls.__name__} {value}") from None


def _decode_content(kind: int, body: bytes) -> Content:
    if kind == Kind.TEXT:
        return Text(Fields(body).text(1, required=False, max_size=MAX_TEXT_BYTES))
    if kind == Kind.RECEIPT:
        f = Fields(body, repeated={2: MAX_RECEIPT_IDS})
        ids = f.repeated_bytes(2, max_size=MESSAGE_ID_SIZE)
        if any(len(i) != MESSAGE_ID_SIZE for i in ids):
            raise ProtocolError("receipt names a malformed message ID")
        return Receipt(ReceiptType(_enum(ReceiptType, f.uint(1, default=None))), tuple(ids))
    if kind == Kind.FILE_OFFER:
        f = Fields(body)
        return FileOffer(f.text(1, max_size=4096), f.text(2, max_size=1024), f.uint(3))
    if kind == Kind.WEBRTC_SIGNAL:
        f = Fields(body)
        return WebRTCSignal(
            f.bytes_(1, size=MESSAGE_ID_SIZE),
            SignalType(_enum(SignalType, f.uint(2, default=None))),
            f.text(3, required=False, max_size=MAX_SIGNAL_BYTES),
        )
    if kind == Kind.SESSION_RESET:
        f = Fields(body)
        reason = ResetReason(_enum(ResetReason, f.uint(1, default=None)))
        return SessionReset(reason, f.uint(2, maximum=0xFFFFFFFF))
    if kind == Kind.MAILBOX_TOKEN:
        raw = Fields(body).bytes_(1, max_size=MAX_TOKEN_SIZE)
        DepositToken.decode(raw)  # well-formed; only a mailbox can check it is genuine
        return MailboxToken(raw)
    return Unknown(kind, body)


@dataclass(frozen=True)
class AppMessage:
    message_id: bytes
    lamport: int
    sent_at_ms: int
    content: Content

    @classmethod
    def new(cls, content: Content, *, lamport: int, sent_at_ms: int, random: Random) -> AppMessage:
        return cls(random(MESSAGE_ID_SIZE), lamport, sent_at_ms, content)

    @property
    def sort_key(self) -> tuple[int, bytes]:
        """Conversation order: Lamport clock, ties broken by message ID."""
        return self.lamport, self.message_id

    def encode(self) -> bytes:
        kind, body = _encode_content(self.content)
        return (
            Writer()
            .uint(1, kind)
            .bytes_(2, self.message_id)
            .uint(3, self.lamport)
            .uint(4, self.sent_at_ms)
            .bytes_(5, body)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> AppMessage:
        f = Fields(data)
        kind = f.uint(1, default=None, maximum=0xFFFF)
        return cls(
            message_id=f.bytes_(2, size=MESSAGE_ID_SIZE),
            lamport=f.uint(3),
            sent_at_ms=f.uint(4),
            content=_decode_content(kind, f.bytes_(5, required=False)),
        )
