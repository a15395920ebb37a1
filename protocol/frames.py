"""The node's own stream frames: delivery (Deliver, Ack), presence, the
mailbox notice and the record request.  Each is one protobuf message, carried length-prefixed on a
libp2p stream (docs/protocol/delivery.md); the node only moves them.  Counts
and sizes are checked while parsing.  No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .crypto import sha256
from .envelope import MAX_ENVELOPE
from .errors import ProtocolError
from .keys import IDENTITY_ID_SIZE
from .mailbox import MAILBOX_ID_SIZE
from .records import MAX_RECORD_SIZE
from .wire import Fields, Writer

MAX_BATCH = 128  # envelopes per Deliver frame, and entries per Ack
MAX_DELIVER_FRAME = 2 * MAX_ENVELOPE  # a frame holds one largest envelope, or many small ones
DIGEST_SIZE = 32
MAX_ACK_FRAME = MAX_BATCH * 64
MAX_PRESENCE_FRAME = 16
MAX_NOTICE_FRAME = 64
MAX_RECORD_REQUEST_FRAME = 32
MAX_ONE_TIME_PREKEY_SIZE = 128  # an encoded OneTimePrekey is at most 111 bytes
MAX_RECORD_ANSWER_FRAME = MAX_RECORD_SIZE + MAX_ONE_TIME_PREKEY_SIZE + 16
MAX_DIALBACK_FRAME = 96
MAX_OBSERVED = 64  # "/ip6/" and the longest IPv6 address, "/tcp/" and a port


class AckStatus(IntEnum):
    """What the receiver of a Deliver frame says about each envelope in it."""

    STORED = 0  # committed to its database
    DUPLICATE = 1  # it already had this envelope
    REFUSED = 2  # it will never accept it; the reason is not said (see THREAT_MODEL)


def digest(envelope: bytes) -> bytes:
    """How acknowledgements name an envelope."""
    return sha256(envelope)


@dataclass(frozen=True)
class Deliver:
    envelopes: tuple[bytes, ...]

    def encode(self) -> bytes:
        if not 0 < len(self.envelopes) <= MAX_BATCH:
            raise ValueError(f"a Deliver frame carries 1 to {MAX_BATCH} envelopes")
        return Writer().repeated_bytes(1, self.envelopes).finish()

    @classmethod
    def decode(cls, data: bytes) -> Deliver:
        f = Fields(data, repeated={1: MAX_BATCH})
        envelopes = tuple(f.repeated_bytes(1, max_size=MAX_ENVELOPE))
        if not envelopes:
            raise ProtocolError("a Deliver frame carries no envelope")
        return cls(envelopes)


@dataclass(frozen=True)
class AckEntry:
    digest: bytes
    status: AckStatus

    def encode(self) -> bytes:
        return Writer().bytes_(1, self.digest).uint(2, self.status).finish()

    @classmethod
    def decode(cls, data: bytes) -> AckEntry:
        f = Fields(data)
        try:
            status = AckStatus(f.uint(2, maximum=0xFF))
        except ValueError:
            raise ProtocolError("unknown acknowledgement status") from None
        return cls(f.bytes_(1, size=DIGEST_SIZE), status)


@dataclass(frozen=True)
class Ack:
    """One entry per envelope of the Deliver frame it answers, in order."""

    entries: tuple[AckEntry, ...]

    def encode(self) -> bytes:
        return Writer().repeated_bytes(1, (e.encode() for e in self.entries)).finish()

    @classmethod
    def decode(cls, data: bytes) -> Ack:
        f = Fields(data, repeated={1: MAX_BATCH})
        return cls(tuple(AckEntry.decode(raw) for raw in f.repeated_bytes(1, max_size=64)))

    def check_answers(self, envelopes: tuple[bytes, ...] | list[bytes]) -> None:
        """Refuse an Ack that does not name exactly these envelopes, in order."""
        if [e.digest for e in self.entries] != [digest(e) for e in envelopes]:
            raise ProtocolError("acknowledgement does not match what was sent")


@dataclass(frozen=True)
class Presence:
    """ "I am online" (or, as an answer to a stranger, nothing to say)."""

    online: bool

    def encode(self) -> bytes:
        return Writer().uint(1, int(self.online)).finish()

    @classmethod
    def decode(cls, data: bytes) -> Presence:
        return cls(bool(Fields(data).uint(1, maximum=1)))


@dataclass(frozen=True)
class MailboxNotice:
    """A mailbox tells its connected owner that something arrived."""

    mailbox_id: bytes

    def encode(self) -> bytes:
        return Writer().bytes_(1, self.mailbox_id).finish()

    @classmethod
    def decode(cls, data: bytes) -> MailboxNotice:
        return cls(Fields(data).bytes_(1, size=MAILBOX_ID_SIZE))


@dataclass(frozen=True)
class RecordRequest:
    """ "Your directory record, if you are this identity" (its 20-byte ID);
    with ``prekey``, "and a one-time prekey of yours" (to start a session)."""

    identity_id: bytes
    prekey: bool = False

    def encode(self) -> bytes:
        return Writer().bytes_(1, self.identity_id).uint(2, int(self.prekey)).finish()

    @classmethod
    def decode(cls, data: bytes) -> RecordRequest:
        f = Fields(data)
        return cls(f.bytes_(1, size=IDENTITY_ID_SIZE), bool(f.uint(2, maximum=1)))


@dataclass(frozen=True)
class DialbackRequest:
    """ "Connect back to me on this TCP port, at the address you see me at"
    (docs/NETWORK.md)."""

    port: int

    def encode(self) -> bytes:
        return Writer().uint(1, self.port).finish()

    @classmethod
    def decode(cls, data: bytes) -> DialbackRequest:
        return cls(Fields(data).uint(1, default=None, maximum=65535))


@dataclass(frozen=True)
class DialbackAnswer:
    """Where the asker's connection came from, and whether a new connection
    to that address and the asked port reached the asker's own peer ID."""

    observed: str
    reached: bool

    def encode(self) -> bytes:
        return Writer().text(1, self.observed).uint(2, int(self.reached)).finish()

    @classmethod
    def decode(cls, data: bytes) -> DialbackAnswer:
        fields = Fields(data)
        observed = fields.text(1, max_size=MAX_OBSERVED)
        return cls(observed, bool(fields.uint(2, maximum=1)))


@dataclass(frozen=True)
class RecordAnswer:
    """The asked identity's signed directory record, or nothing when the
    node answering is not that identity; and, when asked for and given, an
    encoded one-time prekey.  Both checked by whoever asked, as a record
    found in the DHT and a prekey from a mailbox are."""

    record: bytes | None
    prekey: bytes | None = None

    def encode(self) -> bytes:
        return Writer().bytes_(1, self.record or b"").bytes_(2, self.prekey or b"").finish()

    @classmethod
    def decode(cls, data: bytes) -> RecordAnswer:
        f = Fields(data)
        record = f.bytes_(1, required=False, max_size=MAX_RECORD_SIZE)
        prekey = f.bytes_(2, required=False, max_size=MAX_ONE_TIME_PREKEY_SIZE)
        return cls(record or None, prekey or None)
