"""Identity keys: Ed25519 for signatures, X25519 (by the standard birational
conversion) for Diffie-Hellman, and the short identity ID.  No I/O here."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from nacl.bindings import (
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
    crypto_sign_seed_keypair,
)
from nacl.exceptions import CryptoError
from nacl.signing import SigningKey, VerifyKey

from .crypto import Random, sha256
from .errors import DecryptError, ProtocolError

IDENTITY_KEY_SIZE = 32
SIGNATURE_SIZE = 64
IDENTITY_ID_SIZE = 20


def identity_id(public_key: bytes) -> bytes:
    """The short, stable name of an identity: SHA-256 of its Ed25519 key, cut to 20 bytes."""
    return sha256(b"pigeon/identity/v1\x00" + public_key)[:IDENTITY_ID_SIZE]


@lru_cache(maxsize=4096)  # peers' public keys only: the same few, for every seal and open
def ed25519_to_x25519_public(public_key: bytes) -> bytes:
    """Convert a peer's Ed25519 key; a key that is not a valid point is refused
    (a refusal is never cached)."""
    if len(public_key) != IDENTITY_KEY_SIZE:
        raise ProtocolError("identity key must be 32 bytes")
    try:
        return crypto_sign_ed25519_pk_to_curve25519(public_key)
    except CryptoError:
        raise ProtocolError("identity key is not a valid Ed25519 public key") from None


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise DecryptError unless ``signature`` is ``public_key``'s over ``message``."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (CryptoError, ValueError, TypeError):
        raise DecryptError() from None


@dataclass(frozen=True)
class IdentityKeyPair:
    """A long-term identity.  Only the 32-byte seed needs to be stored."""

    seed: bytes = field(repr=False)
    public_key: bytes = field(init=False)
    dh_private: bytes = field(init=False, repr=False)
    dh_public: bytes = field(init=False)

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("identity seed must be 32 bytes")
        public, secret = crypto_sign_seed_keypair(self.seed)
        object.__setattr__(self, "public_key", public)
        object.__setattr__(self, "dh_private", crypto_sign_ed25519_sk_to_curve25519(secret))
        object.__setattr__(self, "dh_public", crypto_sign_ed25519_pk_to_curve25519(public))

    @classmethod
    def generate(cls, random: Random) -> IdentityKeyPair:
        return cls(random(32))

    @property
    def identity_id(self) -> bytes:
        return identity_id(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return SigningKey(self.seed).sign(message).signature
