"""The mailbox protocol's messages: deposits, registration and owner-only
pickup with proofs over fresh challenges.  No I/O here.

A mailbox stores sealed envelopes under a mailbox ID: a hash of the owner's
mailbox key (an Ed25519 key that is not the identity key).  Listing, fetching
and deleting need the owner's signature over a challenge the mailbox issued
for that one request, so a captured proof cannot be replayed.

Identities cost nothing, so what a stranger may ask of a mailbox costs it
something instead: registering, depositing and taking a one-time prekey carry
either a **deposit token** (the owner's mailbox key signed it and gave it to a
contact, inside the encrypted conversation) or a **proof of work** bound to
what is asked.  The mailbox keeps deposits made with a token apart from those
paid for with work, so strangers cannot crowd out an owner's contacts.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from .crypto import sha256
from .envelope import MAX_ENVELOPE
from .errors import ProtocolError
from .keys import IDENTITY_KEY_SIZE, SIGNATURE_SIZE, verify_signature
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
_TOKEN_CONTEXT = b"pigeon/deposit-token/v1\x00"
_WORK_CONTEXT = b"pigeon/mailbox-work/v1\x00"
TOKEN_ID_SIZE = 16
WORK_NONCE_SIZE = 8
MAX_TOKEN_SIZE = 160
# Proof-of-work difficulty, in leading zero bits of SHA-256 (expected work
# 2^bits hashes; pure Python does about 2 million a second on a small
# machine).  A registration happens once per mailbox; a one-time prekey once
# per new session; a deposit without a token grows with its size, so junk
# costs more the more it weighs: 256 B -> 16 bits, 64 KiB -> 20, 1 MiB -> 22.
REGISTER_WORK_BITS = 20
TAKE_PREKEY_WORK_BITS = 20


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


def deposit_work_bits(envelope_size: int) -> int:
    """The work a deposit without a token must show: 16 bits for the smallest
    envelope, one more for each fourfold of size above 256 bytes."""
    return 16 + max(0, (max(envelope_size, 1) - 1).bit_length() - 8) // 2


def work_digest(op: Op, box: bytes, subject: bytes, nonce: bytes) -> bytes:
    """What a proof of work hashes: the operation, the mailbox, and what the
    work pays for (an envelope's digest, a mailbox key, a time window)."""
    return hashlib.sha256(_WORK_CONTEXT + bytes([op]) + box + sha256(subject) + nonce).digest()


def leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def work_done(op: Op, box: bytes, subject: bytes, nonce: bytes, bits: int) -> bool:
    return len(nonce) == WORK_NONCE_SIZE and (
        leading_zero_bits(work_digest(op, box, subject, nonce)) >= bits
    )


def do_work(op: Op, box: bytes, subject: bytes, bits: int, start: int) -> bytes:
    """Find a nonce showing ``bits`` of work (CPU-bound: run it off the event
    loop).  ``start`` should be random: two who do the same work from the
    same start find the same nonce, and a mailbox takes a nonce once."""
    prefix = hashlib.sha256(_WORK_CONTEXT + bytes([op]) + box + sha256(subject))
    target = 1 << (256 - bits)
    counter = start
    while True:
        nonce = (counter % (1 << (8 * WORK_NONCE_SIZE))).to_bytes(WORK_NONCE_SIZE, "big")
        attempt = prefix.copy()
        attempt.update(nonce)
        if int.from_bytes(attempt.digest(), "big") < target:
            return nonce
        counter += 1


@dataclass(frozen=True)
class DepositToken:
    """The owner's leave for a contact to deposit and take prekeys without
    work, at every mailbox of the owner's.  Signed by the owner's mailbox key
    (which the mailbox knows from registration); carried inside the encrypted
    conversation, so only the contact learns it.  A bearer token: a contact
    who leaks it lets others spend that contact's share, no more."""

    mailbox_id: bytes
    token_id: bytes
    expires_at: int
    signature: bytes

    @staticmethod
    def _statement(box: bytes, token_id: bytes, expires_at: int) -> bytes:
        return (
            _TOKEN_CONTEXT
            + Writer().bytes_(1, box).bytes_(2, token_id).uint(3, expires_at).finish()
        )

    @classmethod
    def issue(
        cls,
        mailbox_key: bytes,
        sign: Callable[[bytes], bytes],
        token_id: bytes,
        expires_at: int,
    ) -> DepositToken:
        box = mailbox_id(mailbox_key)
        return cls(box, token_id, expires_at, sign(cls._statement(box, token_id, expires_at)))

    def verify(self, mailbox_key: bytes, now: int) -> None:
        """Raise DecryptError unless the owner of ``mailbox_key`` issued it, and
        ProtocolError when it has expired or names another mailbox."""
        if mailbox_id(mailbox_key) != self.mailbox_id:
            raise ProtocolError("the deposit token is for another mailbox")
        verify_signature(
            mailbox_key,
            self._statement(self.mailbox_id, self.token_id, self.expires_at),
            self.signature,
        )
        if self.expires_at <= now:
            raise ProtocolError("the deposit token has expired")

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.mailbox_id)
            .bytes_(2, self.token_id)
            .uint(3, self.expires_at)
            .bytes_(4, self.signature)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> DepositToken:
        if len(data) > MAX_TOKEN_SIZE:
            raise ProtocolError("deposit token too large")
        f = Fields(data)
        return cls(
            f.bytes_(1, size=MAILBOX_ID_SIZE),
            f.bytes_(2, size=TOKEN_ID_SIZE),
            f.uint(3, default=None),
            f.bytes_(4, size=SIGNATURE_SIZE),
        )


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
    token: bytes = b""  # an encoded DepositToken: DEPOSIT and TAKE_PREKEY without work
    work: bytes = b""  # a proof-of-work nonce (WORK_NONCE_SIZE bytes)
    window: int = 0  # TAKE_PREKEY's work pays for this minute (Unix time // 60)

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
            .bytes_(11, self.token)
            .bytes_(12, self.work)
            .uint(13, self.window)
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
                5,
                required=op == Op.REGISTER,
                size=IDENTITY_KEY_SIZE if op == Op.REGISTER else None,
            ),
            nonce=f.bytes_(6, required=op in PROVEN, max_size=NONCE_SIZE),
            signature=f.bytes_(7, required=op in PROVEN, max_size=SIGNATURE_SIZE),
            item_ids=tuple(ids),
            limit=f.uint(9, maximum=MAX_ITEMS),
            prekeys=tuple(f.repeated_bytes(10, max_size=128)),
            token=f.bytes_(11, required=False, max_size=MAX_TOKEN_SIZE),
            work=f.bytes_(12, required=False, size=None, max_size=WORK_NONCE_SIZE),
            window=f.uint(13, maximum=0xFFFFFFFF),
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
