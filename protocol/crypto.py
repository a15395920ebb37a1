"""The primitives every Pigeon construction is built from, in one place.

X25519 (libsodium through pynacl), HKDF/HMAC-SHA256, SHA-512 and AES-256-GCM
(pyca/cryptography).  Randomness is always passed in as a ``Random``
callable so tests can pin it.  No I/O and no clock here.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base
from nacl.exceptions import CryptoError

from .errors import DecryptError

Random = Callable[[int], bytes]
"""Returns n random bytes; ``os.urandom`` in production."""

system_random: Random = os.urandom

_SHA256 = hashes.SHA256()
ZERO32 = bytes(32)


def hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256; ``salt=None`` means 32 zero bytes."""
    return HKDF(_SHA256, length, salt, info).derive(ikm)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, "sha256")


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def x25519_keypair(random: Random) -> tuple[bytes, bytes]:
    """A fresh (private, public) X25519 pair; the private key is clamped on use."""
    private = random(32)
    return private, crypto_scalarmult_base(private)


def x25519_public(private: bytes) -> bytes:
    return crypto_scalarmult_base(private)


def x25519(private: bytes, public: bytes) -> bytes:
    """Diffie-Hellman; a low-order or malformed peer key is a DecryptError."""
    try:
        return crypto_scalarmult(private, public)
    except (CryptoError, TypeError, ValueError):
        raise DecryptError() from None


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    return AESGCM(key).encrypt(nonce, plaintext, ad)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, ad)
    except (InvalidTag, ValueError):
        raise DecryptError() from None


def constant_time_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
