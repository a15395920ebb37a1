"""A pairwise session: X3DH to start, the Double Ratchet after.

The initiator wraps every message in a prekey message (X3DH parameters +
ratchet message) until the first reply arrives, so whichever of its messages
reaches the responder first can set up the session.  Responder-side state is
built from a copy and handed back only when the first message authenticated;
the caller then commits the session and deletes the one-time prekey.
No I/O here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import x3dh
from .crypto import Random, x25519_keypair
from .errors import DecryptError, ProtocolError
from .keys import IDENTITY_KEY_SIZE, IdentityKeyPair, ed25519_to_x25519_public
from .ratchet import PIGEON, RatchetConfig, RatchetState
from .records import PrekeyBundle
from .wire import Fields, Writer

KIND_PREKEY = 1
KIND_RATCHET = 2
SESSION_STATE_VERSION = 1
MAX_SESSION_MESSAGE = 1 << 20
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class PrekeyHeader:
    """The X3DH parameters an initiator sends until it hears back."""

    identity_key: bytes
    base_key: bytes
    signed_prekey_id: int
    one_time_prekey_id: int  # 0 when none was used

    def _fields(self) -> Writer:
        return (
            Writer()
            .bytes_(1, self.identity_key)
            .bytes_(2, self.base_key)
            .uint(3, self.signed_prekey_id)
            .uint(4, self.one_time_prekey_id)
        )

    def encode(self, ratchet_message: bytes) -> bytes:
        return bytes([KIND_PREKEY]) + self._fields().bytes_(5, ratchet_message).finish()

    def encode_alone(self) -> bytes:
        """The header without a message, as sessions store it."""
        return self._fields().finish()

    @classmethod
    def decode_fields(cls, f: Fields) -> PrekeyHeader:
        base_key = f.bytes_(2, size=32)
        if base_key[31] & 0x80:
            # X25519 ignores the top bit: two encodings of one key would name
            # two sessions, so only the canonical one is accepted.
            raise ProtocolError("base key is not a canonical X25519 public key")
        return cls(
            identity_key=f.bytes_(1, size=IDENTITY_KEY_SIZE),
            base_key=base_key,
            signed_prekey_id=f.uint(3, default=None, maximum=_U32),
            one_time_prekey_id=f.uint(4, maximum=_U32),
        )


def _associated_data(initiator_key: bytes, responder_key: bytes) -> bytes:
    return initiator_key + responder_key


@dataclass(frozen=True)
class IncomingMessage:
    """A decoded session message, before any session is touched."""

    prekey: PrekeyHeader | None
    ratchet_message: bytes

    @classmethod
    def decode(cls, data: bytes) -> IncomingMessage:
        if not data or len(data) > MAX_SESSION_MESSAGE:
            raise ProtocolError("session message is empty or too large")
        kind, body = data[0], data[1:]
        if kind == KIND_RATCHET:
            return cls(None, body)
        if kind != KIND_PREKEY:
            raise ProtocolError(f"unknown session message kind {kind}")
        f = Fields(body)
        return cls(PrekeyHeader.decode_fields(f), f.bytes_(5))


class Session:
    """One side of a conversation with one remote identity."""

    __slots__ = ("_ad", "base_key", "local_key", "pending", "ratchet", "remote_key")

    def __init__(
        self,
        local_key: bytes,
        remote_key: bytes,
        ratchet: RatchetState,
        ad: bytes,
        base_key: bytes,
        pending: PrekeyHeader | None,
    ) -> None:
        self.local_key = local_key
        self.remote_key = remote_key
        self.ratchet = ratchet
        self._ad = ad
        # The initiator's X3DH base key names the session on both sides: a
        # prekey message with another base key belongs to another session.
        self.base_key = base_key
        self.pending = pending

    @classmethod
    def initiate(
        cls,
        identity: IdentityKeyPair,
        bundle: PrekeyBundle,
        random: Random,
        config: RatchetConfig = PIGEON,
    ) -> Session:
        """Start a session from a bundle already verified as ``bundle.identity_key``'s."""
        if bundle.one_time_prekey is not None:
            bundle.one_time_prekey.verify(bundle.identity_key)
        base_private, base_public = x25519_keypair(random)
        spk = bundle.signed_prekey.public_key
        shared = x3dh.initiator_secret(
            identity_private=identity.dh_private,
            base_private=base_private,
            their_identity=ed25519_to_x25519_public(bundle.identity_key),
            their_signed_prekey=spk,
            their_one_time_prekey=(
                bundle.one_time_prekey.public_key if bundle.one_time_prekey else None
            ),
            info=config.labels.x3dh,
            length=config.x3dh_output_size,
        )
        ratchet = RatchetState.initiator(config, shared, spk, random)
        pending = PrekeyHeader(
            identity_key=identity.public_key,
            base_key=base_public,
            signed_prekey_id=bundle.signed_prekey.prekey_id,
            one_time_prekey_id=(bundle.one_time_prekey.prekey_id if bundle.one_time_prekey else 0),
        )
        ad = _associated_data(identity.public_key, bundle.identity_key)
        return cls(identity.public_key, bundle.identity_key, ratchet, ad, base_public, pending)

    @classmethod
    def respond(
        cls,
        identity: IdentityKeyPair,
        message: IncomingMessage,
        signed_prekey_private: Callable[[int], bytes | None],
        one_time_prekey_private: Callable[[int], bytes | None],
        random: Random,
        config: RatchetConfig = PIGEON,
    ) -> tuple[Session, bytes]:
        """Build the responder's session from a prekey message and decrypt it.

        The lookups return a private key by ID, or None when unknown.  Nothing
        is changed anywhere unless this returns; the caller must then store the
        session and delete the one-time prekey it used.
        """
        header = message.prekey
        if header is None:
            raise DecryptError()
        spk_private = signed_prekey_private(header.signed_prekey_id)
        opk_private = None
        if header.one_time_prekey_id:
            opk_private = one_time_prekey_private(header.one_time_prekey_id)
            if opk_private is None:
                raise DecryptError()
        if spk_private is None:
            raise DecryptError()
        try:
            their_identity = ed25519_to_x25519_public(header.identity_key)
        except ProtocolError:
            raise DecryptError() from None
        shared = x3dh.responder_secret(
            identity_private=identity.dh_private,
            signed_prekey_private=spk_private,
            one_time_prekey_private=opk_private,
            their_identity=their_identity,
            their_base_key=header.base_key,
            info=config.labels.x3dh,
            length=config.x3dh_output_size,
        )
        ratchet = RatchetState.responder(config, shared, spk_private, random)
        ad = _associated_data(header.identity_key, identity.public_key)
        plaintext = ratchet.decrypt(message.ratchet_message, ad)
        session = cls(identity.public_key, header.identity_key, ratchet, ad, header.base_key, None)
        return session, plaintext

    def encrypt(self, plaintext: bytes) -> bytes:
        inner = self.ratchet.encrypt(plaintext, self._ad)
        if self.pending is not None:
            return self.pending.encode(inner)
        return bytes([KIND_RATCHET]) + inner

    def decrypt(self, message: IncomingMessage) -> bytes:
        """Decrypt a message of this session (a repeated prekey message too).

        A prekey message for another base key belongs to another session and
        is refused with DecryptError; the caller decides what to do with it.
        """
        prekey = message.prekey
        if prekey is not None and (
            prekey.identity_key != self.remote_key or prekey.base_key != self.base_key
        ):
            raise DecryptError()
        plaintext = self.ratchet.decrypt(message.ratchet_message, self._ad)
        if message.prekey is None:
            self.pending = None  # the other side has our session: stop sending X3DH data
        return plaintext

    def serialize(self) -> bytes:
        w = (
            Writer()
            .uint(1, SESSION_STATE_VERSION)
            .bytes_(2, self.local_key)
            .bytes_(3, self.remote_key)
            .bytes_(4, self._ad)
            .bytes_(5, self.ratchet.serialize())
        )
        if self.pending is not None:
            w.bytes_(6, self.pending.encode_alone())
        return w.bytes_(7, self.base_key).finish()

    @classmethod
    def deserialize(cls, data: bytes, random: Random, config: RatchetConfig = PIGEON) -> Session:
        f = Fields(data)
        version = f.uint(1, default=None)
        if version != SESSION_STATE_VERSION:
            raise ProtocolError(f"unsupported session state version {version}")
        pending_raw = f.optional_bytes(6)
        pending = None if pending_raw is None else PrekeyHeader.decode_fields(Fields(pending_raw))
        return cls(
            f.bytes_(2, size=IDENTITY_KEY_SIZE),
            f.bytes_(3, size=IDENTITY_KEY_SIZE),
            RatchetState.deserialize(f.bytes_(5), config, random),
            f.bytes_(4, size=2 * IDENTITY_KEY_SIZE),
            f.bytes_(7, size=32),
            pending,
        )
