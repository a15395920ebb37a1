"""The primitives every Pigeon construction is built from, in one place.

X25519 (libsodium through pynacl), HKDF/HMAC-SHA256, SHA-512 and AES-256-GCM
(pyca/cryptography).  Randomness is always passed in as a ``Random``
callable so tests can pin it.  No I/O and no clock here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

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


# HMAC is built on hashlib the way CPython's own pure-Python HMAC is: the
# padded key's inner and outer hash states are computed once and copied.  For
# the chain step (two HMACs under one key) it is twice as fast as two calls of
# hmac.digest; tests/test_crypto.py checks it against the hmac module.
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64


def _hmac_states(key: bytes) -> tuple[Any, Any]:
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    return hashlib.sha256(key.translate(_INNER)), hashlib.sha256(key.translate(_OUTER))


def hmac_sha256_pair(key: bytes, first: bytes, second: bytes) -> tuple[bytes, bytes]:
    """HMAC-SHA256 of two messages under one key, sharing the key schedule."""
    inner, outer = _hmac_states(key)
    inner2, outer2 = inner.copy(), outer.copy()
    inner.update(first)
    outer.update(inner.digest())
    inner2.update(second)
    outer2.update(inner2.digest())
    return outer.digest(), outer2.digest()


def hkdf(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256; ``salt=None`` means 32 zero bytes."""
    return HKDF(_SHA256, length, salt, info).derive(ikm)


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
