"""The mailbox protocol's messages: deposits, registration and owner-only
pickup with proofs over fresh challenges.  No I/O here.

A mailbox stores sealed envelopes under a mailbox ID: a hash of the owner's
mailbox key (an Ed25519 key that is not the identity key).  Listing, fetching
and deleting need the owner's signature over a challenge the mailbox issued
for that one request, so a captured proof cannot be replayed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .crypto import sha256
from .envelope import MAX_ENVELOPE
from .errors import ProtocolError
from .keys import SIGNATURE_SIZE
from .wire import Fields, Writer

MAILBOX_ID_SIZE = 16
ITEM_ID_SIZE = 16
NONCE_SIZE = 32
MAX_ITEMS = 256  # items per FETCH reply
# A FETCH reply carries items up to this many envelope bytes in all (or one
# item, when the first alone is larger), so a reply always fits the owner's
# frame limit whatever the mailbox holds; ``more`` says whether to ask again.
MAX_PAGE_BYTES = 1 << 20
_ITEM_OVERHEAD = 64
MAX_RESPONSE_SIZE = MAX_PAGE_BYTES + MAX_ENVELOPE + MAX_ITEMS * _ITEM_OVERHEAD + 4096
MAX_REQUEST_SIZE = MAX_ENVELOPE + 4096  # a deposit is the largest request
_PROOF_CONTEXT = b"pigeon/mailbox-proof/v1\x00"


class Op(IntEnum):
    REGISTER = 1
    DEPOSIT = 2
    CHALLENGE = 3
    FETCH = 4
    DELETE = 5
    ADD_PREKEYS = 6  # owner-only: leave one-time prekeys to hand out
    TAKE_PREKEY = 7  # anyone: take one one-time prekey, never handed out again


def mailbox_id(mailbox_key: bytes) -> bytes:
    return sha256(b"pigeon/mailbox-id/v1\x00" + mailbox_key)[:MAILBOX_ID_SIZE]


PROVEN = frozenset({Op.FETCH, Op.DELETE, Op.ADD_PREKEYS})
MAX_PREKEYS = 100


def proof_message(op: Op, box: bytes, nonce: bytes, items: tuple[bytes, ...] = ()) -> bytes:
    """What the owner signs: the operation, the mailbox, the challenge, and
    the item IDs or prekeys the request names (each length-prefixed)."""
    named = b"".join(struct.pack(">H", len(i)) + i for i in items)
    return _PROOF_CONTEXT + struct.pack(">B", op) + box + nonce + named


@dataclass(frozen=True)
class Request:
    op: Op
    mailbox_id: bytes = b""
    envelope: bytes = b""
    ttl_s: int = 0
    public_key: bytes = b""
    nonce: bytes = b""
    signature: bytes = b""
    item_ids: tuple[bytes, ...] = ()
    limit: int = 0
    prekeys: tuple[bytes, ...] = ()  # encoded OneTimePrekey messages

    def encode(self) -> bytes:
        return (
            Writer()
            .uint(1, self.op)
            .bytes_(2, self.mailbox_id)
            .bytes_(3, self.envelope)
            .uint(4, self.ttl_s)
            .bytes_(5, self.public_key)
            .bytes_(6, self.nonce)
            .bytes_(7, self.signature)
            .repeated_bytes(8, self.item_ids)
            .uint(9, self.limit)
            .repeated_bytes(10, self.prekeys)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Request:
        f = Fields(data, repeated={8: MAX_ITEMS, 10: MAX_PREKEYS})
        try:
            op = Op(f.uint(1, default=None))
        except ValueError:
            raise ProtocolError("unknown mailbox operation") from None
        box = f.bytes_(2, required=op != Op.REGISTER, size=None)
        if box and len(box) != MAILBOX_ID_SIZE:
            raise ProtocolError("mailbox ID has the wrong size")
        ids = f.repeated_bytes(8, max_size=ITEM_ID_SIZE)
        if any(len(i) != ITEM_ID_SIZE for i in ids):
            raise ProtocolError("item ID has the wrong size")
        return cls(
            op=op,
            mailbox_id=box,
            envelope=f.bytes_(3, required=op == Op.DEPOSIT, max_size=MAX_ENVELOPE),
            ttl_s=f.uint(4, maximum=0xFFFFFFFF),
            public_key=f.bytes_(
                5, required=op == Op.REGISTER, size=32 if op == Op.REGISTER else None
            ),
            nonce=f.bytes_(6, required=op in PROVEN, max_size=NONCE_SIZE),
            signature=f.bytes_(7, required=op in PROVEN, max_size=SIGNATURE_SIZE),
            item_ids=tuple(ids),
            limit=f.uint(9, maximum=MAX_ITEMS),
            prekeys=tuple(f.repeated_bytes(10, max_size=128)),
        )


@dataclass(frozen=True)
class Item:
    item_id: bytes
    envelope: bytes
    deposited_at: int


@dataclass(frozen=True)
class Response:
    ok: bool
    error: str = ""
    nonce: bytes = b""
    items: tuple[Item, ...] = field(default_factory=tuple)
    item_id: bytes = b""
    prekey: bytes = b""  # an encoded OneTimePrekey, or empty when none is left
    prekeys_left: int = 0
    more: bool = False  # FETCH: the mailbox holds more than this reply carries

    def encode(self) -> bytes:
        w = Writer().uint(1, 0 if self.ok else 1).text(2, self.error).bytes_(3, self.nonce)
        w.repeated_bytes(
            4,
            (
                Writer().bytes_(1, i.item_id).bytes_(2, i.envelope).uint(3, i.deposited_at).finish()
                for i in self.items
            ),
        )
        return (
            w.bytes_(5, self.item_id)
            .bytes_(6, self.prekey)
            .uint(7, self.prekeys_left)
            .uint(8, int(self.more))
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Response:
        if len(data) > MAX_RESPONSE_SIZE:
            raise ProtocolError("mailbox response too large")
        f = Fields(data, repeated={4: MAX_ITEMS})
        items = []
        for raw in f.repeated_bytes(4, max_size=MAX_ENVELOPE + _ITEM_OVERHEAD):
            item = Fields(raw)
            items.append(
                Item(
                    item.bytes_(1, size=ITEM_ID_SIZE),
                    item.bytes_(2, max_size=MAX_ENVELOPE),
                    item.uint(3),
                )
            )
        return cls(
            ok=f.uint(1, maximum=1) == 0,
            error=f.text(2, required=False, max_size=200),
            nonce=f.bytes_(3, required=False, max_size=NONCE_SIZE),
            items=tuple(items),
            item_id=f.bytes_(5, required=False, max_size=ITEM_ID_SIZE),
            prekey=f.bytes_(6, required=False, max_size=128),
            prekeys_left=f.uint(7, maximum=0xFFFFFFFF),
            more=bool(f.uint(8, maximum=1)),
        )
