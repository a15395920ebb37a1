"""Sealed envelopes: what actually leaves a node.

Only the recipient can learn who sent an envelope (in the spirit of Signal's
sealed sender).  An ephemeral X25519 key and the recipient's identity key
hide the sender's identity key; a second layer keyed by the static-static DH
between sender and recipient authenticates the sender.  The payload is padded
to a size bucket so lengths leak little.  No I/O here.

    envelope = version(1) || ephemeral public(32) || sealed sender key(48) || sealed body
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from .crypto import Random, aead_decrypt, aead_encrypt, hkdf, x25519, x25519_keypair
from .errors import DecryptError, ProtocolError
from .keys import IdentityKeyPair, ed25519_to_x25519_public

ENVELOPE_VERSION = 1
BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576)
MAX_PAYLOAD = BUCKETS[-1] - 1
_NONCE = bytes(12)  # every key below seals exactly one message
_SENDER_LAYER = b"Pigeon_Seal_v1_sender"
_BODY_LAYER = b"Pigeon_Seal_v1_body"
OVERHEAD = 1 + 32 + (32 + 16) + 16
MAX_ENVELOPE = BUCKETS[-1] + OVERHEAD


def padded_size(length: int) -> int:
    """The bucket a payload of ``length`` bytes is padded to (one byte of padding at least)."""
    for bucket in BUCKETS:
        if length < bucket:
            return bucket
    raise ValueError(f"payload larger than {MAX_PAYLOAD} bytes")


def pad(payload: bytes) -> bytes:
    """ISO/IEC 7816-4 padding up to the payload's bucket."""
    size = padded_size(len(payload))
    return payload + b"\x80" + bytes(size - len(payload) - 1)


def unpad(padded: bytes) -> bytes:
    end = padded.rstrip(b"\x00")
    if not end or end[-1] != 0x80 or len(padded) not in BUCKETS:
        raise DecryptError()
    return end[:-1]


@dataclass(frozen=True)
class Opened:
    sender_key: bytes
    payload: bytes


@lru_cache(maxsize=4096)
def _static_dh(private: bytes, public: bytes) -> bytes:
    """The static-static DH between an identity and a peer's: the same for
    every envelope between the two, so worked out once (a refusal of a bad
    key is never cached).  Held no longer, and no more exposed, than the
    private key it comes from, which the process holds anyway."""
    return x25519(private, public)


def _sender_keys(ephemeral_dh: bytes, ephemeral_public: bytes, recipient_dh: bytes) -> bytes:
    return hkdf(ephemeral_dh, ephemeral_public + recipient_dh, _SENDER_LAYER, 64)


def seal(sender: IdentityKeyPair, recipient_key: bytes, payload: bytes, random: Random) -> bytes:
    """Seal ``payload`` from ``sender`` for the identity ``recipient_key`` (Ed25519)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload larger than {MAX_PAYLOAD} bytes")
    recipient_dh = ed25519_to_x25519_public(recipient_key)
    ephemeral_private, ephemeral_public = x25519_keypair(random)
    keys = _sender_keys(x25519(ephemeral_private, recipient_dh), ephemeral_public, recipient_dh)
    header = bytes([ENVELOPE_VERSION]) + ephemeral_public
    sealed_sender = aead_encrypt(keys[:32], _NONCE, sender.public_key, header)
    body_key = hkdf(
        _static_dh(sender.dh_private, recipient_dh), keys[32:] + sealed_sender, _BODY_LAYER, 32
    )
    body = aead_encrypt(body_key, _NONCE, pad(payload), header + sealed_sender)
    return header + sealed_sender + body


def open_envelope(recipient: IdentityKeyPair, envelope: bytes) -> Opened:
    """Open an envelope addressed to ``recipient``: DecryptError if it is not
    authentic, ProtocolError if it is not an envelope at all."""
    if len(envelope) < OVERHEAD + BUCKETS[0] or len(envelope) > MAX_ENVELOPE:
        raise ProtocolError("envelope has an impossible size")
    if envelope[0] != ENVELOPE_VERSION:
        raise ProtocolError(f"unsupported envelope version {envelope[0]}")
    header, sealed_sender, body = envelope[:33], envelope[33:81], envelope[81:]
    keys = _sender_keys(x25519(recipient.dh_private, header[1:]), header[1:], recipient.dh_public)
    sender_key = aead_decrypt(keys[:32], _NONCE, sealed_sender, header)
    try:
        sender_dh = ed25519_to_x25519_public(sender_key)
    except ProtocolError:
        raise DecryptError() from None
    body_key = hkdf(
        _static_dh(recipient.dh_private, sender_dh), keys[32:] + sealed_sender, _BODY_LAYER, 32
    )
    return Opened(sender_key, unpad(aead_decrypt(body_key, _NONCE, body, header + sealed_sender)))
