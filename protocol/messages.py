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

from .contact import MAX_NAME_CHARS, validate_name
from .crypto import Random
from .errors import LocalProtocolError, ProtocolError
from .mailbox import MAX_TOKEN_SIZE, DepositToken
from .wire import Fields, Writer

MESSAGE_ID_SIZE = 16
# The one limit on a text, in bytes of UTF-8: small enough that the largest
# text, with its message, ratchet and prekey headers, still pads to the
# 64 KiB envelope bucket (tests check it), not the next one at 256 KiB.
MAX_TEXT_BYTES = 65_000
MAX_TIMER = 365 * 24 * 3600  # the longest disappearing-messages timer, in seconds
MAX_RECEIPT_IDS = 1000
MAX_SIGNAL_BYTES = 64 * 1024  # an SDP offer or answer
MAX_REASON_BYTES = 200  # a one-line reason shown to a person
TRANSFER_ID_SIZE = 16
FILE_KEY_SIZE = 32
FILE_HASH_SIZE = 32
MAX_FILE_URI_BYTES = 4096


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
    INTRODUCTION = 7
    TIMER = 8


class ReceiptType(IntEnum):
    DELIVERED = 1
    READ = 2


class ResetReason(IntEnum):
    UNDECRYPTABLE = 1  # envelopes from you arrived that no session of mine can read


def fit_reason(text: str) -> str:
    """Any text (an exception's message, say) made into a reason a peer
    accepts: what is not printable becomes a space and it is cut to
    MAX_REASON_BYTES of UTF-8 on a character boundary."""
    line = "".join(ch if ch.isprintable() else " " for ch in text)  # lone surrogates too
    return line.encode("utf-8")[:MAX_REASON_BYTES].decode("utf-8", errors="ignore")


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProtocolError("text is not valid Unicode (a lone surrogate)") from None


def check_reason(text: str) -> None:
    """Refuse a reason that is not one printable line of at most MAX_REASON_BYTES."""
    if not text.isprintable() or _utf8_size(text) > MAX_REASON_BYTES:
        raise ProtocolError(
            f"a reason must be one printable line of at most {MAX_REASON_BYTES} bytes"
        )


class SignalType(IntEnum):
    OFFER = 1
    ANSWER = 2
    # 3 was "candidate": candidates are not trickled (aiortc gathers them all
    # before it writes the SDP), so the number stays unused.
    BYE = 4


class ByeReason(IntEnum):
    DONE = 1  # the receiver has the whole file
    CANCELLED = 2
    REFUSED = 3  # the receiver declined the offer, or the sender will not serve it
    FAILED = 4  # the transfer cannot go on; ``text`` says why


@dataclass(frozen=True)
class Text:
    text: str
    # Disappearing: both sides delete it this many seconds after it was
    # sent (0: kept).
    expires_in: int = 0


@dataclass(frozen=True)
class Receipt:
    receipt_type: ReceiptType
    message_ids: tuple[bytes, ...]


def _check_size(value: bytes, size: int, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise ProtocolError(f"{what} must be {size} bytes")


@dataclass(frozen=True)
class FileOffer:
    """An offer to send a file: the pigeon-file URI that names it exactly
    (root, size, chunk size, name), the key its chunks are encrypted with, and
    the SHA-256 of its plaintext for people to compare.  The URI is parsed by
    the transfer layer (pigeon.transfer.reference); here only its size is
    checked, as protocol does not depend on transfer.  Constructing an offer
    the wire cannot carry raises ProtocolError."""

    transfer_id: bytes
    uri: str
    key: bytes
    sha256: bytes

    def __post_init__(self) -> None:
        _check_size(self.transfer_id, TRANSFER_ID_SIZE, "a transfer ID")
        if not self.uri or _utf8_size(self.uri) > MAX_FILE_URI_BYTES:
            raise ProtocolError(f"a file URI must be 1 to {MAX_FILE_URI_BYTES} bytes")
        _check_size(self.key, FILE_KEY_SIZE, "a file key")
        _check_size(self.sha256, FILE_HASH_SIZE, "a file's SHA-256")


@dataclass(frozen=True)
class WebRTCSignal:
    """Signalling for one transfer's WebRTC connection, inside the ratchet (so
    the SDPs, and the DTLS fingerprints in them, are authenticated).

    An OFFER or ANSWER carries its SDP as ``payload`` and nothing else; a BYE
    carries a ``reason`` and may carry ``text``, a one-line reason for the
    user.  Constructing a signal that breaks these rules raises ProtocolError.
    """

    transfer_id: bytes
    signal_type: SignalType
    payload: str = ""
    reason: ByeReason | None = None
    text: str = ""

    def __post_init__(self) -> None:
        _check_size(self.transfer_id, TRANSFER_ID_SIZE, "a transfer ID")
        if self.signal_type not in (SignalType.OFFER, SignalType.ANSWER, SignalType.BYE):
            raise ProtocolError("unknown signal type")
        if self.signal_type == SignalType.BYE:
            if self.reason is None or self.payload:
                raise ProtocolError("a bye carries a reason and no SDP")
            check_reason(self.text)
        elif not self.payload or self.reason is not None or self.text:
            raise ProtocolError("an offer or answer carries an SDP and nothing else")
        elif _utf8_size(self.payload) > MAX_SIGNAL_BYTES:
            raise ProtocolError(f"an SDP must be at most {MAX_SIGNAL_BYTES} bytes")


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
class Introduction:
    """The sender's display name, first in every session it starts with
    someone who has not yet written back: a person who has not added the
    sender sees who the message request is from.  Self-chosen, as the name
    in a contact code is; it proves nothing but the identity key it came with."""

    name: str


@dataclass(frozen=True)
class Timer:
    """The conversation's disappearing-messages timer, set by the sender for
    both sides: texts sent from now on carry it (0: off)."""

    seconds: int


@dataclass(frozen=True)
class Unknown:
    """A kind from a newer version: keep the bytes, show nothing."""

    kind: int
    body: bytes


Content = (
    Text
    | Receipt
    | FileOffer
    | WebRTCSignal
    | SessionReset
    | MailboxToken
    | Introduction
    | Timer
    | Unknown
)


def _encode_content(content: Content) -> tuple[int, bytes]:
    if isinstance(content, Text):
        return Kind.TEXT, Writer().text(1, content.text).uint(2, content.expires_in).finish()
    if isinstance(content, Receipt):
        w = Writer().uint(1, content.receipt_type).repeated_bytes(2, content.message_ids)
        return Kind.RECEIPT, w.finish()
    if isinstance(content, FileOffer):
        w = (
            Writer()
            .bytes_(1, content.transfer_id)
            .text(2, content.uri)
            .bytes_(3, content.key)
            .bytes_(4, content.sha256)
        )
        return Kind.FILE_OFFER, w.finish()
    if isinstance(content, WebRTCSignal):
        w = (
            Writer()
            .bytes_(1, content.transfer_id)
            .uint(2, content.signal_type)
            .text(3, content.payload)
            .uint(4, content.reason or 0)
            .text(5, content.text)
        )
        return Kind.WEBRTC_SIGNAL, w.finish()
    if isinstance(content, SessionReset):
        return Kind.SESSION_RESET, Writer().uint(1, content.reason).uint(2, content.failed).finish()
    if isinstance(content, MailboxToken):
        return Kind.MAILBOX_TOKEN, Writer().bytes_(1, content.token).finish()
    if isinstance(content, Introduction):
        return Kind.INTRODUCTION, Writer().text(1, content.name).finish()
    if isinstance(content, Timer):
        return Kind.TIMER, Writer().uint(1, content.seconds).finish()
    return content.kind, content.body


def _enum(
    cls: type[ReceiptType] | type[SignalType] | type[ByeReason] | type[ResetReason], value: int
) -> int:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(f"unknown {cls.__name__} {value}") from None


def _decode_content(kind: int, body: bytes) -> Content:
    if kind == Kind.TEXT:
        f = Fields(body)
        return Text(
            f.text(1, required=False, max_size=MAX_TEXT_BYTES), f.uint(2, maximum=MAX_TIMER)
        )
    if kind == Kind.RECEIPT:
        f = Fields(body, repeated={2: MAX_RECEIPT_IDS})
        ids = f.repeated_bytes(2, max_size=MESSAGE_ID_SIZE)
        if any(len(i) != MESSAGE_ID_SIZE for i in ids):
            raise ProtocolError("receipt names a malformed message ID")
        return Receipt(ReceiptType(_enum(ReceiptType, f.uint(1, default=None))), tuple(ids))
    if kind == Kind.FILE_OFFER:
        f = Fields(body)
        return FileOffer(
            f.bytes_(1, size=TRANSFER_ID_SIZE),
            f.text(2, max_size=MAX_FILE_URI_BYTES),
            f.bytes_(3, size=FILE_KEY_SIZE),
            f.bytes_(4, size=FILE_HASH_SIZE),
        )
    if kind == Kind.WEBRTC_SIGNAL:
        f = Fields(body)
        reason = f.uint(4, maximum=0xFF)
        return WebRTCSignal(
            f.bytes_(1, size=TRANSFER_ID_SIZE),
            SignalType(_enum(SignalType, f.uint(2, default=None))),
            f.text(3, required=False, max_size=MAX_SIGNAL_BYTES),
            ByeReason(_enum(ByeReason, reason)) if reason else None,
            f.text(5, required=False, max_size=MAX_REASON_BYTES),
        )
    if kind == Kind.SESSION_RESET:
        f = Fields(body)
        reason = ResetReason(_enum(ResetReason, f.uint(1, default=None)))
        return SessionReset(reason, f.uint(2, maximum=0xFFFFFFFF))
    if kind == Kind.MAILBOX_TOKEN:
        raw = Fields(body).bytes_(1, max_size=MAX_TOKEN_SIZE)
        DepositToken.decode(raw)  # well-formed; only a mailbox can check it is genuine
        return MailboxToken(raw)
    if kind == Kind.TIMER:
        return Timer(Fields(body).uint(1, maximum=MAX_TIMER))
    if kind == Kind.INTRODUCTION:
        return Introduction(validate_name(Fields(body).text(1, max_size=4 * MAX_NAME_CHARS)))
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


def disappears_at(app: AppMessage, now: int) -> int | None:
    """When a disappearing text that reached us at ``now`` is deleted (Unix
    seconds), or None: its timer counted from when it was sent, by the
    sender's clock, but never from later than its arrival (a sender's clock
    set ahead gains nothing)."""
    content = app.content
    if not isinstance(content, Text) or not content.expires_in:
        return None
    return min(app.sent_at_ms // 1000, now) + content.expires_in
