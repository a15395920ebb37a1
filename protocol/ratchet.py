"""The Double Ratchet (Signal's specification), with header encryption (its
section 4) switchable so the same code also runs in libsignal's classic
configuration for the known-answer vectors.

Decryption never changes the state until the message has authenticated:
every intermediate value lives in local variables and is committed in one
place.  Skipped message keys are bounded per chain and in total (the oldest
are evicted).  No I/O here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .crypto import Random, hkdf, hmac_sha256_pair, x25519, x25519_keypair, x25519_public
from .errors import DecryptError, LocalProtocolError, ProtocolError
from .wire import Fields, Writer

MESSAGE_VERSION = 1
_VERSION_BYTE = bytes([MESSAGE_VERSION])
_HEADER = struct.Struct(">32sII")  # ratchet public key, previous chain length, number
HEADER_SIZE = _HEADER.size  # 40
HEADER_NONCE_SIZE = 12
TAG_SIZE = 16
ENCRYPTED_HEADER_SIZE = HEADER_NONCE_SIZE + HEADER_SIZE + TAG_SIZE  # 68
STATE_VERSION = 1
_U32_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class KdfLabels:
    """The HKDF ``info`` strings; production and classic differ only here."""

    x3dh: bytes
    root: bytes
    message: bytes


PIGEON_LABELS = KdfLabels(
    x3dh=b"Pigeon_X3DH_X25519_SHA256_v1",
    root=b"Pigeon_Ratchet_v1",
    message=b"Pigeon_MessageKeys_v1",
)
LIBSIGNAL_LABELS = KdfLabels(
    x3dh=b"WhisperText", root=b"WhisperRatchet", message=b"WhisperMessageKeys"
)


@dataclass(frozen=True)
class RatchetConfig:
    labels: KdfLabels
    header_encryption: bool
    max_skip_per_chain: int = 1000
    max_skipped_total: int = 2000

    @property
    def header_size(self) -> int:
        return ENCRYPTED_HEADER_SIZE if self.header_encryption else HEADER_SIZE

    @property
    def x3dh_output_size(self) -> int:
        """Root key and first chain key, plus two header keys with header encryption."""
        return 128 if self.header_encryption else 64


PIGEON = RatchetConfig(PIGEON_LABELS, header_encryption=True)
CLASSIC = RatchetConfig(LIBSIGNAL_LABELS, header_encryption=False)


def kdf_root(config: RatchetConfig, root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes, bytes]:
    """KDF_RK: (new root key, chain key, next header key or b'')."""
    size = 96 if config.header_encryption else 64
    out = hkdf(dh_out, root_key, config.labels.root, size)
    return out[:32], out[32:64], out[64:]


def kdf_chain(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK as libsignal does it: (message key seed, next chain key)."""
    return hmac_sha256_pair(chain_key, b"\x01", b"\x02")


def message_keys(config: RatchetConfig, seed: bytes) -> tuple[bytes, bytes, bytes]:
    """(cipher key, MAC key, IV) from a message key seed.

    Production seals with AES-256-GCM under the cipher key and the first 12
    bytes of the IV; the MAC key is derived only to keep libsignal's layout.
    """
    out = hkdf(seed, None, config.labels.message, 80)
    return out[:32], out[32:64], out[64:80]


def _seal(config: RatchetConfig, seed: bytes, plaintext: bytes, ad: bytes) -> bytes:
    key, _, iv = message_keys(config, seed)
    return AESGCM(key).encrypt(iv[:12], plaintext, ad)


def _open(config: RatchetConfig, seed: bytes, ciphertext: bytes, ad: bytes) -> bytes | None:
    key, _, iv = message_keys(config, seed)
    try:
        return AESGCM(key).decrypt(iv[:12], ciphertext, ad)
    except InvalidTag:
        return None


def _open_header(key: bytes | None, encrypted: bytes) -> tuple[bytes, int, int] | None:
    if key is None:
        return None
    try:
        plain = AESGCM(key).decrypt(
            encrypted[:HEADER_NONCE_SIZE], encrypted[HEADER_NONCE_SIZE:], b""
        )
    except InvalidTag:
        return None
    return _HEADER.unpack(plain)


class RatchetState:
    """One side of a Double Ratchet conversation.

    Create it with :meth:`initiator` or :meth:`responder`; exchange messages
    with :meth:`encrypt` and :meth:`decrypt`; persist it with :meth:`serialize`.
    """

    __slots__ = (
        "_random",
        "ckr",
        "cks",
        "config",
        "dhr",
        "dhs_private",
        "dhs_public",
        "hkr",
        "hks",
        "nhkr",
        "nhks",
        "nr",
        "ns",
        "pn",
        "rk",
        "skipped",
    )

    def __init__(self, config: RatchetConfig, random: Random) -> None:
        self.config = config
        self._random = random
        self.dhs_private = b""
        self.dhs_public = b""
        self.dhr: bytes | None = None
        self.rk = b""
        self.cks: bytes | None = None
        self.ckr: bytes | None = None
        self.ns = 0
        self.nr = 0
        self.pn = 0
        self.hks: bytes | None = None
        self.hkr: bytes | None = None
        self.nhks: bytes | None = None
        self.nhkr: bytes | None = None
        # (header key, or ratchet public key without header encryption, n) -> seed;
        # insertion order is age, so the first entry is the one evicted.
        self.skipped: dict[tuple[bytes, int], bytes] = {}

    # -- creation -----------------------------------------------------------

    @classmethod
    def initiator(
        cls,
        config: RatchetConfig,
        shared: bytes,
        their_ratchet_key: bytes,
        random: Random,
    ) -> RatchetState:
        """Alice's side, from the X3DH output and Bob's ratchet (signed pre-)key.

        As in libsignal, the X3DH output holds a root key and a first chain key;
        the first chain key is Bob's initial sending chain.
        """
        if len(shared) != config.x3dh_output_size:
            raise ValueError("shared secret has the wrong size for this configuration")
        state = cls(config, random)
        state.dhs_private, state.dhs_public = x25519_keypair(random)
        state.dhr = their_ratchet_key
        state.ckr = shared[32:64]
        state.rk, state.cks, nhks = kdf_root(
            config, shared[:32], x25519(state.dhs_private, their_ratchet_key)
        )
        if config.header_encryption:
            state.nhks = nhks
            state.hks = shared[64:96]
            state.nhkr = shared[96:128]
        return state

    @classmethod
    def responder(
        cls,
        config: RatchetConfig,
        shared: bytes,
        our_ratchet_private: bytes,
        random: Random,
    ) -> RatchetState:
        """Bob's side, from the X3DH output and his ratchet (signed pre-)key."""
        if len(shared) != config.x3dh_output_size:
            raise ValueError("shared secret has the wrong size for this configuration")
        state = cls(config, random)
        state.dhs_private = our_ratchet_private
        state.dhs_public = x25519_public(our_ratchet_private)
        state.rk = shared[:32]
        state.cks = shared[32:64]
        if config.header_encryption:
            state.nhkr = shared[64:96]
            state.nhks = shared[96:128]
        return state

    # -- sending ------------------------------------------------------------

    def encrypt(self, plaintext: bytes, ad: bytes) -> bytes:
        """Encrypt one message; the state moves on at once."""
        cks = self.cks
        he = self.config.header_encryption
        if cks is None or (he and self.hks is None):
            raise LocalProtocolError("this session cannot send until it has received a message")
        seed, self.cks = kdf_chain(cks)
        header = _HEADER.pack(self.dhs_public, self.pn, self.ns)
        if he:
            assert self.hks is not None
            nonce = self._random(HEADER_NONCE_SIZE)
            header = nonce + AESGCM(self.hks).encrypt(nonce, header, b"")
        self.ns += 1
        if self.ns > _U32_MAX:
            raise LocalProtocolError("sending chain exhausted")
        prefix = _VERSION_BYTE + header
        return prefix + _seal(self.config, seed, plaintext, ad + prefix)

    # -- receiving ----------------------------------------------------------

    def decrypt(self, message: bytes, ad: bytes) -> bytes:
        """Decrypt one message or raise DecryptError, leaving the state untouched."""
        config = self.config
        header_size = config.header_size
        if len(message) < 1 + header_size + TAG_SIZE or message[0] != MESSAGE_VERSION:
            raise DecryptError()
        raw_header = message[1 : 1 + header_size]
        ciphertext = message[1 + header_size :]
        full_ad = ad + message[: 1 + header_size]
        if config.header_encryption:
            return self._decrypt_he(raw_header, ciphertext, full_ad)
        return self._decrypt_plain(raw_header, ciphertext, full_ad)

    def _decrypt_plain(self, raw_header: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        dh, pn, n = _HEADER.unpack(raw_header)
        if (dh, n) in self.skipped:
            return self._from_skipped((dh, n), ciphertext, ad)
        if dh == self.dhr:
            return self._in_current_chain(dh, n, ciphertext, ad)
        return self._with_dh_step(dh, pn, n, dh, ciphertext, ad)

    def _decrypt_he(self, raw_header: bytes, ciphertext: bytes, ad: bytes) -> bytes:
        hkr = self.hkr
        header = _open_header(hkr, raw_header)
        if header is not None:
            assert hkr is not None
            _, _, n = header
            if (hkr, n) in self.skipped:
                return self._from_skipped((hkr, n), ciphertext, ad)
            return self._in_current_chain(hkr, n, ciphertext, ad)
        header = _open_header(self.nhkr, raw_header)
        if header is not None:
            dh, pn, n = header
            return self._with_dh_step(dh, pn, n, self.nhkr, ciphertext, ad)
        for key in {k for k, _ in self.skipped} - {hkr}:
            header = _open_header(key, raw_header)
            if header is not None:
                n = header[2]
                if (key, n) in self.skipped:
                    return self._from_skipped((key, n), ciphertext, ad)
                break
        raise DecryptError()

    def _from_skipped(self, slot: tuple[bytes, int], ciphertext: bytes, ad: bytes) -> bytes:
        plaintext = _open(self.config, self.skipped[slot], ciphertext, ad)
        if plaintext is None:
            raise DecryptError()
        del self.skipped[slot]
        return plaintext

    def _skip(
        self, chain_key: bytes, start: int, until: int, key_id: bytes
    ) -> tuple[bytes, list[tuple[tuple[bytes, int], bytes]]]:
        """Message key seeds for numbers start..until-1, not yet committed."""
        if until - start > self.config.max_skip_per_chain:
            raise DecryptError()
        seeds = []
        for i in range(start, until):
            seed, chain_key = kdf_chain(chain_key)
            seeds.append(((key_id, i), seed))
        return chain_key, seeds

    def _in_current_chain(self, key_id: bytes, n: int, ciphertext: bytes, ad: bytes) -> bytes:
        ckr = self.ckr
        if ckr is None or n < self.nr:
            raise DecryptError()  # a replay, or a key already used or evicted
        ckr, seeds = self._skip(ckr, self.nr, n, key_id)
        seed, ckr = kdf_chain(ckr)
        plaintext = _open(self.config, seed, ciphertext, ad)
        if plaintext is None:
            raise DecryptError()
        self.ckr = ckr
        self.nr = n + 1
        self._store_skipped(seeds)
        return plaintext

    def _with_dh_step(
        self,
        their_key: bytes,
        pn: int,
        n: int,
        header_key: bytes | None,
        ciphertext: bytes,
        ad: bytes,
    ) -> bytes:
        config = self.config
        he = config.header_encryption
        old_id = self.hkr if he else self.dhr
        seeds: list[tuple[tuple[bytes, int], bytes]] = []
        if self.ckr is not None and old_id is not None and pn > self.nr:
            _, seeds = self._skip(self.ckr, self.nr, pn, old_id)
        rk, ckr, nhkr = kdf_root(config, self.rk, x25519(self.dhs_private, their_key))
        new_id = header_key if he else their_key
        assert new_id is not None
        ckr, more = self._skip(ckr, 0, n, new_id)
        seeds += more
        seed, ckr = kdf_chain(ckr)
        plaintext = _open(config, seed, ciphertext, ad)
        if plaintext is None:
            raise DecryptError()
        # Authenticated: commit the receiving step, then take the sending step.
        self.pn = self.ns
        self.ns = 0
        self.nr = n + 1
        self.dhr = their_key
        self.ckr = ckr
        if he:
            self.hks = self.nhks
            self.hkr = header_key
            self.nhkr = nhkr
        self.dhs_private, self.dhs_public = x25519_keypair(self._random)
        self.rk, self.cks, nhks = kdf_root(config, rk, x25519(self.dhs_private, their_key))
        self.nhks = nhks if he else None
        self._store_skipped(seeds)
        return plaintext

    def _store_skipped(self, seeds: list[tuple[tuple[bytes, int], bytes]]) -> None:
        if not seeds:
            return
        skipped = self.skipped
        skipped.update(seeds)
        excess = len(skipped) - self.config.max_skipped_total
        if excess > 0:
            for slot in list(skipped)[:excess]:
                del skipped[slot]

    # -- persistence --------------------------------------------------------

    def serialize(self) -> bytes:
        w = (
            Writer()
            .uint(1, STATE_VERSION)
            .uint(2, int(self.config.header_encryption))
            .bytes_(3, self.dhs_private)
            .bytes_(4, self.dhr or b"")
            .bytes_(5, self.rk)
            .bytes_(6, self.cks or b"")
            .bytes_(7, self.ckr or b"")
            .uint(8, self.ns)
            .uint(9, self.nr)
            .uint(10, self.pn)
            .bytes_(11, self.hks or b"")
            .bytes_(12, self.hkr or b"")
            .bytes_(13, self.nhks or b"")
            .bytes_(14, self.nhkr or b"")
        )
        for (key_id, n), seed in self.skipped.items():
            w.bytes_(15, Writer().bytes_(1, key_id).uint(2, n).bytes_(3, seed).finish())
        return w.finish()

    @classmethod
    def deserialize(cls, data: bytes, config: RatchetConfig, random: Random) -> RatchetState:
        f = Fields(data, repeated={15: config.max_skipped_total})
        version = f.uint(1, default=None)
        if version != STATE_VERSION:
            raise ProtocolError(f"unsupported ratchet state version {version}")
        if bool(f.uint(2, maximum=1)) != config.header_encryption:
            raise ProtocolError("ratchet state was saved with another configuration")
        state = cls(config, random)

        def key(number: int) -> bytes | None:
            return f.optional_bytes(number, size=32)

        state.dhs_private = f.bytes_(3, size=32)
        state.dhs_public = x25519_public(state.dhs_private)
        state.dhr = key(4)
        state.rk = f.bytes_(5, size=32)
        state.cks, state.ckr = key(6), key(7)
        state.ns = f.uint(8, maximum=_U32_MAX)
        state.nr = f.uint(9, maximum=_U32_MAX)
        state.pn = f.uint(10, maximum=_U32_MAX)
        state.hks, state.hkr, state.nhks, state.nhkr = key(11), key(12), key(13), key(14)
        entries = f.repeated_bytes(15, max_size=128)
        for raw in entries:
            entry = Fields(raw)
            state.skipped[(entry.bytes_(1, size=32), entry.uint(2, maximum=_U32_MAX))] = (
                entry.bytes_(3, size=32)
            )
        return state
