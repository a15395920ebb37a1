"""Small builders shared by the protocol tests."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pigeon.protocol import (
    PIGEON,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    RatchetConfig,
    Session,
    SignedPrekey,
)
from pigeon.protocol.crypto import x25519_keypair

NOW = 1_800_000_000


@dataclass
class Party:
    """An identity with a signed prekey and a few one-time prekeys."""

    name: str
    identity: IdentityKeyPair = field(default_factory=lambda: IdentityKeyPair.generate(os.urandom))
    signed_prekeys: dict[int, bytes] = field(default_factory=dict)
    one_time_prekeys: dict[int, bytes] = field(default_factory=dict)
    spk: SignedPrekey | None = None

    def __post_init__(self) -> None:
        self.rotate_signed_prekey(1)

    def rotate_signed_prekey(self, prekey_id: int) -> None:
        private, public = x25519_keypair(os.urandom)
        self.signed_prekeys[prekey_id] = private
        self.spk = SignedPrekey(prekey_id, public, NOW)

    def record(self, sequence: int = 1, expires_at: int = NOW + 86400) -> DirectoryRecord:
        assert self.spk is not None
        return DirectoryRecord(
            self.identity.public_key, self.name, sequence, NOW, expires_at, self.spk
        )

    def one_time_prekey(self, prekey_id: int) -> OneTimePrekey:
        otk, private = OneTimePrekey.create(self.identity, prekey_id, os.urandom)
        self.one_time_prekeys[prekey_id] = private
        return otk

    def respond(self, message: bytes, config: RatchetConfig = PIGEON) -> tuple[Session, bytes]:
        return Session.respond(
            self.identity,
            IncomingMessage.decode(message),
            self.signed_prekeys.get,
            self.one_time_prekeys.get,
            os.urandom,
            config,
        )


def session_pair(
    config: RatchetConfig = PIGEON, *, with_one_time_prekey: bool = True
) -> tuple[Session, Session]:
    """An established pair: Alice initiated, Bob answered, Alice heard back."""
    alice, bob = Party("alice"), Party("bob")
    otk = bob.one_time_prekey(7) if with_one_time_prekey else None
    bundle = bob.record().bundle(otk)
    a = Session.initiate(alice.identity, bundle, os.urandom, config)
    b, first = bob.respond(a.encrypt(b"first"), config)
    assert first == b"first"
    assert a.decrypt(IncomingMessage.decode(b.encrypt(b"reply"))) == b"reply"
    return a, b


def deliver(receiver: Session, message: bytes) -> bytes:
    return receiver.decrypt(IncomingMessage.decode(message))
