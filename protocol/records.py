"""Signed prekeys, one-time prekeys, device certificates and the directory
record each identity publishes in the DHT.

A record is self-certifying: it carries the identity key, it is accepted only
when that key signed it, and it is stored under a DHT key derived from that
identity.  The clock is a parameter (``now``, seconds since the epoch).
No I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .crypto import Random, x25519_keypair
from .errors import ProtocolError, RecordError
from .keys import (
    IDENTITY_KEY_SIZE,
    SIGNATURE_SIZE,
    IdentityKeyPair,
    identity_id,
    verify_signature,
)
from .wire import Fields, Writer

RECORD_VERSION = 1
MAX_RECORD_SIZE = 8192
MAX_DEVICES = 8
MAX_MAILBOXES = 8
MAX_ADDRESSES = 16
MAX_ADDRESS_SIZE = 256
MAX_CLOCK_SKEW = 300
MAX_RECORD_LIFETIME = 30 * 24 * 3600
DHT_NAMESPACE = "pigeon"

_RECORD_CONTEXT = b"pigeon/record/v1\x00"
_DEVICE_CONTEXT = b"pigeon/device/v1\x00"
_ONE_TIME_CONTEXT = b"pigeon/one-time-prekey/v1\x00"
_ROTATION_CONTEXT = b"pigeon/rotation/v1\x00"
_U32 = 0xFFFFFFFF


def dht_key(identity_key: bytes) -> str:
    """The short DHT key of an identity's record: ``/pigeon/<40 hex>`` (48 bytes)."""
    return f"/{DHT_NAMESPACE}/{identity_id(identity_key).hex()}"


@dataclass(frozen=True)
class SignedPrekey:
    prekey_id: int
    public_key: bytes
    created_at: int

    def encode(self) -> bytes:
        return (
            Writer()
            .uint(1, self.prekey_id)
            .bytes_(2, self.public_key)
            .uint(3, self.created_at)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> SignedPrekey:
        f = Fields(data)
        return cls(f.uint(1, default=None, maximum=_U32), f.bytes_(2, size=32), f.uint(3))


@dataclass(frozen=True)
class OneTimePrekey:
    """A one-time prekey, signed so a mailbox cannot hand out one of its own."""

    prekey_id: int
    public_key: bytes
    signature: bytes

    @staticmethod
    def _message(identity_key: bytes, prekey_id: int, public_key: bytes) -> bytes:
        return _ONE_TIME_CONTEXT + identity_key + struct.pack(">I", prekey_id) + public_key

    @classmethod
    def create(
        cls, identity: IdentityKeyPair, prekey_id: int, random: Random
    ) -> tuple[OneTimePrekey, bytes]:
        """A new one-time prekey and its private key."""
        private, public = x25519_keypair(random)
        signature = identity.sign(cls._message(identity.public_key, prekey_id, public))
        return cls(prekey_id, public, signature), private

    def verify(self, identity_key: bytes) -> None:
        verify_signature(
            identity_key,
            self._message(identity_key, self.prekey_id, self.public_key),
            self.signature,
        )

    def encode(self) -> bytes:
        return (
            Writer()
            .uint(1, self.prekey_id)
            .bytes_(2, self.public_key)
            .bytes_(3, self.signature)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> OneTimePrekey:
        f = Fields(data)
        return cls(
            f.uint(1, default=None, maximum=_U32),
            f.bytes_(2, size=32),
            f.bytes_(3, size=SIGNATURE_SIZE),
        )


@dataclass(frozen=True)
class DeviceCertificate:
    """The identity's statement that a libp2p peer (a device) speaks for it."""

    peer_id: bytes
    issued_at: int
    signature: bytes

    @staticmethod
    def _message(identity_key: bytes, peer_id: bytes, issued_at: int) -> bytes:
        return (
            _DEVICE_CONTEXT
            + Writer().bytes_(1, identity_key).bytes_(2, peer_id).uint(3, issued_at).finish()
        )

    @classmethod
    def issue(cls, identity: IdentityKeyPair, peer_id: bytes, issued_at: int) -> DeviceCertificate:
        message = cls._message(identity.public_key, peer_id, issued_at)
        return cls(peer_id, issued_at, identity.sign(message))

    def verify(self, identity_key: bytes) -> None:
        verify_signature(
            identity_key, self._message(identity_key, self.peer_id, self.issued_at), self.signature
        )

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.peer_id)
            .uint(2, self.issued_at)
            .bytes_(3, self.signature)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> DeviceCertificate:
        f = Fields(data)
        return cls(f.bytes_(1, max_size=64), f.uint(2), f.bytes_(3, size=SIGNATURE_SIZE))


@dataclass(frozen=True)
class Device:
    certificate: DeviceCertificate
    addresses: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return (
            Writer().bytes_(1, self.certificate.encode()).repeated_text(2, self.addresses).finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Device:
        f = Fields(data, repeated={2: MAX_ADDRESSES})
        addresses = f.repeated_text(2, max_size=MAX_ADDRESS_SIZE)
        return cls(DeviceCertificate.decode(f.bytes_(1)), tuple(addresses))


@dataclass(frozen=True)
class MailboxEntry:
    """A mailbox peer holding sealed envelopes for this identity."""

    peer_id: bytes
    mailbox_id: bytes
    addresses: tuple[str, ...] = ()

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.peer_id)
            .bytes_(2, self.mailbox_id)
            .repeated_text(3, self.addresses)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> MailboxEntry:
        f = Fields(data, repeated={3: MAX_ADDRESSES})
        return cls(
            f.bytes_(1, max_size=64),
            f.bytes_(2, size=16),
            tuple(f.repeated_text(3, max_size=MAX_ADDRESS_SIZE)),
        )


@dataclass(frozen=True)
class Rotation:
    """A person's move from one identity to another, signed by both keys:
    the old key names its successor, the new key names its predecessor.
    Carried in both identities' records (``DirectoryRecord.rotation``), so a
    contact who holds only the old key learns of the new one from a record
    that the old key signed."""

    old_key: bytes
    new_key: bytes
    at: int
    old_signature: bytes
    new_signature: bytes

    @staticmethod
    def _message(old_key: bytes, new_key: bytes, at: int) -> bytes:
        return (
            _ROTATION_CONTEXT + Writer().bytes_(1, old_key).bytes_(2, new_key).uint(3, at).finish()
        )

    @classmethod
    def create(cls, old: IdentityKeyPair, new: IdentityKeyPair, at: int) -> Rotation:
        if old.public_key == new.public_key:
            raise ValueError("an identity cannot move to itself")
        message = cls._message(old.public_key, new.public_key, at)
        return cls(old.public_key, new.public_key, at, old.sign(message), new.sign(message))

    def verify(self) -> None:
        """Raise DecryptError unless both keys signed this move."""
        message = self._message(self.old_key, self.new_key, self.at)
        verify_signature(self.old_key, message, self.old_signature)
        verify_signature(self.new_key, message, self.new_signature)

    def encode(self) -> bytes:
        return (
            Writer()
            .bytes_(1, self.old_key)
            .bytes_(2, self.new_key)
            .uint(3, self.at)
            .bytes_(4, self.old_signature)
            .bytes_(5, self.new_signature)
            .finish()
        )

    @classmethod
    def decode(cls, data: bytes) -> Rotation:
        f = Fields(data)
        rotation = cls(
            f.bytes_(1, size=IDENTITY_KEY_SIZE),
            f.bytes_(2, size=IDENTITY_KEY_SIZE),
            f.uint(3),
            f.bytes_(4, size=SIGNATURE_SIZE),
            f.bytes_(5, size=SIGNATURE_SIZE),
        )
        if rotation.old_key == rotation.new_key:
            raise ProtocolError("a rotation must name two different identities")
        return rotation


@dataclass(frozen=True)
class PrekeyBundle:
    """What an initiator needs to run X3DH with someone."""

    identity_key: bytes
    signed_prekey: SignedPrekey
    one_time_prekey: OneTimePrekey | None = None


@dataclass(frozen=True)
class DirectoryRecord:
    identity_key: bytes
    name: str
    sequence: int
    issued_at: int
    expires_at: int
    signed_prekey: SignedPrekey
    devices: tuple[Device, ...] = ()
    mailboxes: tuple[MailboxEntry, ...] = ()
    # The identity moved: in the old identity's record, to ``new_key``; in the
    # new one's, from ``old_key``.
    rotation: Rotation | None = None

    @property
    def moved_to(self) -> bytes | None:
        """The identity this one moved to, when the record says so."""
        if self.rotation is not None and self.rotation.old_key == self.identity_key:
            return self.rotation.new_key
        return None

    @property
    def identity_id(self) -> bytes:
        return identity_id(self.identity_key)

    @property
    def dht_key(self) -> str:
        return dht_key(self.identity_key)

    def bundle(self, one_time_prekey: OneTimePrekey | None = None) -> PrekeyBundle:
        return PrekeyBundle(self.identity_key, self.signed_prekey, one_time_prekey)

    def _body(self) -> bytes:
        w = (
            Writer()
            .uint(1, RECORD_VERSION)
            .bytes_(2, self.identity_key)
            .text(3, self.name)
            .uint(4, self.sequence)
            .uint(5, self.issued_at)
            .uint(6, self.expires_at)
            .bytes_(7, self.signed_prekey.encode())
        )
        w.repeated_bytes(8, (device.encode() for device in self.devices))
        w.repeated_bytes(9, (mailbox.encode() for mailbox in self.mailboxes))
        if self.rotation is not None:
            w.bytes_(10, self.rotation.encode())
        return w.finish()

    def sign(self, identity: IdentityKeyPair) -> bytes:
        """The record as published: body and the identity's signature over it."""
        if identity.public_key != self.identity_key:
            raise ValueError("a record must be signed by its own identity")
        body = self._body()
        signed = Writer().bytes_(1, body).bytes_(2, identity.sign(_RECORD_CONTEXT + body)).finish()
        if len(signed) > MAX_RECORD_SIZE:
            raise ValueError("record too large")
        return signed

    @classmethod
    def verify(
        cls,
        data: bytes,
        *,
        now: int | None,
        identity_key: bytes | None = None,
        key_id: bytes | None = None,
    ) -> DirectoryRecord:
        """Decode and check a published record.

        Raises ProtocolError if malformed, DecryptError if any signature is
        wrong, RecordError if it is for another identity, expired, or issued
        in the future.  ``now=None`` skips the time checks, for a record that
        was checked when it was stored and is read back from local storage.
        """
        if len(data) > MAX_RECORD_SIZE:
            raise ProtocolError("record too large")
        outer = Fields(data)
        body = outer.bytes_(1)
        signature = outer.bytes_(2, size=SIGNATURE_SIZE)
        f = Fields(body, repeated={8: MAX_DEVICES, 9: MAX_MAILBOXES})
        version = f.uint(1, default=None)
        if version != RECORD_VERSION:
            raise ProtocolError(f"unsupported record version {version}")
        record_key = f.bytes_(2, size=IDENTITY_KEY_SIZE)
        if identity_key is not None and record_key != identity_key:
            raise RecordError("record belongs to another identity")
        if key_id is not None and identity_id(record_key) != key_id:
            raise RecordError("record is stored under another identity's key")
        verify_signature(record_key, _RECORD_CONTEXT + body, signature)
        rotation = f.optional_bytes(10)
        record = cls(
            identity_key=record_key,
            name=f.text(3, required=False, max_size=256),
            sequence=f.uint(4),
            issued_at=f.uint(5),
            expires_at=f.uint(6, default=None),
            signed_prekey=SignedPrekey.decode(f.bytes_(7)),
            devices=tuple(
                Device.decode(raw) for raw in f.repeated_bytes(8, max_size=MAX_RECORD_SIZE)
            ),
            mailboxes=tuple(
                MailboxEntry.decode(raw) for raw in f.repeated_bytes(9, max_size=MAX_RECORD_SIZE)
            ),
            rotation=None if rotation is None else Rotation.decode(rotation),
        )
        for device in record.devices:
            device.certificate.verify(record_key)
        if record.rotation is not None:
            if record_key not in (record.rotation.old_key, record.rotation.new_key):
                raise RecordError("the record's rotation statement names other identities")
            record.rotation.verify()
        if now is None:
            return record
        if record.expires_at <= now:
            raise RecordError("record has expired")
        if record.issued_at > now + MAX_CLOCK_SKEW:
            raise RecordError("record is issued in the future")
        if record.expires_at - record.issued_at > MAX_RECORD_LIFETIME:
            raise RecordError("record claims too long a lifetime")
        return record


def newest(records: Sequence[DirectoryRecord]) -> int:
    """Index of the record to keep: highest sequence, then latest issue time."""
    if not records:
        raise ValueError("no records")
    return max(range(len(records)), key=lambda i: (records[i].sequence, records[i].issued_at))
