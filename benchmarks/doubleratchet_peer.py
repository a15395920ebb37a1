"""The independent implementation Pigeon is checked and timed against: the
``doubleratchet`` package (Syndace's python-doubleratchet), configured with
Pigeon's KDFs.

- root chain: HKDF-SHA256(salt = root key, ikm = DH output, info = root label), 64 bytes
- message chains: HMAC-SHA256(ck, 0x02) is the next chain key and
  HMAC-SHA256(ck, 0x01) the message key seed (the package's "separate HMACs"
  KDF with the constant 0x02 0x01, i.e. libsignal's chain step)
- messages: HKDF-SHA256(salt = zeros, ikm = seed, info = message label, 80 bytes)
  -> AES-256-GCM(cipher key, IV[:12]) over AD || header
- DH: X25519, with private keys injectable so both implementations can be fed
  the same ratchet keys.

The package is asynchronous but never waits on anything, so its coroutines are
driven to completion directly; :attr:`Peer.state` is the package's own
conversation object, for awaiting its coroutines on an event loop as its users
do.  Used by ``tests/test_cross_check.py`` and
``benchmarks/ratchet.py``.  Besides whole conversations (:class:`Peer`), the
package's root KDF chain (:func:`root_chain_step`) and its Diffie-Hellman
ratchet alone, built from explicit state (:class:`DHRatchet`), are exposed for
step-by-step comparisons.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Coroutine
from typing import Any, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from doubleratchet import aead as dr_aead
from doubleratchet import double_ratchet
from doubleratchet.kdf_chain import KDFChain
from doubleratchet.models import (
    DiffieHellmanRatchetModel,
    KDFChainModel,
    SymmetricKeyRatchetModel,
)
from doubleratchet.recommended import (
    HashFunction,
    aead_aes_hmac,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.types import EncryptedMessage, Header

T = TypeVar("T")
MESSAGE_CHAIN_CONSTANT = b"\x02\x01"  # next chain key first, then the message key seed


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Drive a coroutine that never suspends."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("the doubleratchet package suspended unexpectedly")


class _MessageChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function() -> HashFunction:
        return HashFunction.SHA_256


def _root_kdf(root_info: bytes) -> type[kdf_hkdf.KDF]:
    """The package's HKDF root-chain KDF with SHA-256 and Pigeon's root label."""

    class RootKDF(kdf_hkdf.KDF):
        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return root_info

    return RootKDF


def _dh_ratchet_class(
    privates: list[bytes],
) -> type[diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet]:
    """The package's X25519 ratchet, taking its new private keys from ``privates``."""

    class Ratchet(diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet):
        @staticmethod
        def _generate_priv() -> bytes:
            return privates.pop(0) if privates else os.urandom(32)

    return Ratchet


def _classes(
    root_info: bytes,
    message_info: bytes,
    privates: list[bytes],
    used_keys: list[bytes],
    recommended_aead: bool,
) -> tuple[
    type[kdf_hkdf.KDF],
    type[dr_aead.AEAD],
    type[diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet],
    type[double_ratchet.DoubleRatchet],
]:
    RootKDF = _root_kdf(root_info)

    class GcmAEAD(dr_aead.AEAD):
        @staticmethod
        def _keys(seed: bytes) -> tuple[bytes, bytes]:
            out = HKDF(hashes.SHA256(), 80, None, message_info).derive(seed)
            return out[:32], out[64:76]

        @classmethod
        async def encrypt(cls, plaintext: bytes, key: bytes, associated_data: bytes) -> bytes:
            used_keys.append(key)
            cipher_key, nonce = cls._keys(key)
            return AESGCM(cipher_key).encrypt(nonce, plaintext, associated_data)

        @classmethod
        async def decrypt(cls, ciphertext: bytes, key: bytes, associated_data: bytes) -> bytes:
            cipher_key, nonce = cls._keys(key)
            try:
                plaintext = AESGCM(cipher_key).decrypt(nonce, ciphertext, associated_data)
            except InvalidTag:
                raise dr_aead.AuthenticationFailedException("bad tag") from None
            used_keys.append(key)
            return plaintext

    class RecommendedAEAD(aead_aes_hmac.AEAD):
        """The package's own suggestion: AES-256-CBC + HMAC-SHA256."""

        @staticmethod
        def _get_hash_function() -> HashFunction:
            return HashFunction.SHA_256

        @staticmethod
        def _get_info() -> bytes:
            return message_info

    Ratchet = _dh_ratchet_class(privates)

    class Conversation(double_ratchet.DoubleRatchet):
        @staticmethod
        def _build_associated_data(associated_data: bytes, header: Header) -> bytes:
            return (
                associated_data
                + header.ratchet_pub
                + struct.pack(
                    ">II", header.previous_sending_chain_length, header.sending_chain_length
                )
            )

    return RootKDF, RecommendedAEAD if recommended_aead else GcmAEAD, Ratchet, Conversation


class Peer:
    """One side of a ``doubleratchet`` conversation with Pigeon's KDFs."""

    MAX_SKIP = 1000
    MAX_SKIPPED = 2000

    def __init__(
        self,
        ad: bytes,
        root_info: bytes,
        message_info: bytes,
        privates: list[bytes],
        recommended_aead: bool = False,
    ) -> None:
        self.ad = ad
        self.used_message_keys: list[bytes] = []
        self._root_kdf, self._aead, self._ratchet, self._conversation = _classes(
            root_info, message_info, privates, self.used_message_keys, recommended_aead
        )
        self._state: Any = None

    @property
    def state(self) -> double_ratchet.DoubleRatchet:
        """The package's conversation object (after :meth:`start` or :meth:`accept`),
        whose ``encrypt_message`` and ``decrypt_message`` coroutines can be awaited."""
        if self._state is None:
            raise RuntimeError("the conversation has not started")
        return self._state  # type: ignore[no-any-return]

    def _config(self) -> dict[str, Any]:
        return {
            "diffie_hellman_ratchet_class": self._ratchet,
            "root_chain_kdf": self._root_kdf,
            "message_chain_kdf": _MessageChainKDF,
            "message_chain_constant": MESSAGE_CHAIN_CONSTANT,
            "dos_protection_threshold": self.MAX_SKIP,
            "max_num_skipped_message_keys": self.MAX_SKIPPED,
            "aead": self._aead,
        }

    def start(self, shared_secret: bytes, their_ratchet_public: bytes, first: bytes) -> Any:
        """Alice: create the state and encrypt the first message."""
        self._state, message = run(
            self._conversation.encrypt_initial_message(
                shared_secret=shared_secret,
                recipient_ratchet_pub=their_ratchet_public,
                message=first,
                associated_data=self.ad,
                **self._config(),
            )
        )
        return message

    def accept(self, shared_secret: bytes, own_ratchet_private: bytes, message: Any) -> bytes:
        """Bob: create the state from Alice's first message and decrypt it."""
        self._state, plaintext = run(
            self._conversation.decrypt_initial_message(
                shared_secret=shared_secret,
                own_ratchet_priv=own_ratchet_private,
                message=message,
                associated_data=self.ad,
                **self._config(),
            )
        )
        return plaintext

    def encrypt(self, plaintext: bytes) -> EncryptedMessage:
        return run(self._state.encrypt_message(plaintext, self.ad))  # type: ignore[no-any-return]

    def decrypt(self, message: EncryptedMessage) -> bytes:
        return run(self._state.decrypt_message(message, self.ad))  # type: ignore[no-any-return]

    # -- introspection for the cross-check ---------------------------------------

    def _dh_model(self) -> Any:
        return self._state.model.diffie_hellman_ratchet

    def root_key(self) -> bytes:
        return bytes(self._dh_model().root_chain.key)

    def sending_chain_key(self) -> bytes | None:
        chain = self._dh_model().symmetric_key_ratchet.sending_chain
        return None if chain is None else bytes(chain.key)

    def receiving_chain_key(self) -> bytes | None:
        chain = self._dh_model().symmetric_key_ratchet.receiving_chain
        return None if chain is None else bytes(chain.key)


def make_pair(
    shared_secret: bytes,
    bob_ratchet_private: bytes,
    ad: bytes,
    *,
    alice_privates: list[bytes] | None = None,
    bob_privates: list[bytes] | None = None,
    root_info: bytes = b"WhisperRatchet",
    message_info: bytes = b"WhisperMessageKeys",
    first: bytes = b"",
    recommended_aead: bool = False,
) -> tuple[Peer, Peer]:
    """An established pair: Alice started from Bob's ratchet public key and
    Bob accepted her first message (``first``).  ``recommended_aead`` swaps
    the AES-GCM sealing for the package's AES-CBC + HMAC (benchmark only:
    its message keys are not recorded)."""
    alice = Peer(ad, root_info, message_info, list(alice_privates or []), recommended_aead)
    bob = Peer(ad, root_info, message_info, list(bob_privates or []), recommended_aead)
    bob_public = diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet._derive_pub(
        bob_ratchet_private
    )
    bob.accept(shared_secret, bob_ratchet_private, alice.start(shared_secret, bob_public, first))
    return alice, bob


def root_chain_step(root_info: bytes, root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """KDF_RK done by the package: one step of its root KDF chain keyed by
    ``root_key`` with ``dh_out`` as input.  Returns (new root key, chain key)."""
    chain = KDFChain.create(_root_kdf(root_info), root_key)
    chain_key = run(chain.step(dh_out, 32))
    return bytes(chain.model.key), chain_key


def _chain(key: bytes | None, length: int) -> KDFChainModel | None:
    return None if key is None else KDFChainModel(length=length, key=key)


class DHRatchet:
    """The package's Diffie-Hellman ratchet (which drives its symmetric-key
    ratchet) on its own, restored from explicit state, so that one ratchet step
    can be compared field by field with another implementation's."""

    def __init__(
        self,
        root_info: bytes,
        *,
        own_private: bytes,
        their_public: bytes,
        root_key: bytes,
        sending_chain: tuple[bytes, int],
        receiving_chain: tuple[bytes | None, int],
        previous_sending_length: int,
        privates: list[bytes],
    ) -> None:
        model = DiffieHellmanRatchetModel(
            own_ratchet_priv=own_private,
            other_ratchet_pub=their_public,
            root_chain=KDFChainModel(length=0, key=root_key),
            symmetric_key_ratchet=SymmetricKeyRatchetModel(
                receiving_chain=_chain(*receiving_chain),
                sending_chain=_chain(*sending_chain),
                previous_sending_chain_length=previous_sending_length,
            ),
        )
        self._ratchet = _dh_ratchet_class(list(privates)).from_model(
            model, _root_kdf(root_info), _MessageChainKDF, MESSAGE_CHAIN_CONSTANT, Peer.MAX_SKIP
        )

    def receive(
        self, ratchet_public: bytes, previous_length: int, number: int
    ) -> tuple[bytes, dict[tuple[bytes, int], bytes]]:
        """The package's next decryption key for a message with this header, and
        the message keys it skipped on the way, by (ratchet public key, number)."""
        header = Header(
            ratchet_pub=ratchet_public,
            previous_sending_chain_length=previous_length,
            sending_chain_length=number,
        )
        key, skipped = run(self._ratchet.next_decryption_key(header))
        return key, dict(skipped)

    @property
    def model(self) -> DiffieHellmanRatchetModel:
        """The whole state: own private key, their public key, root chain, and
        the sending and receiving chains (key and length each)."""
        return self._ratchet.model
