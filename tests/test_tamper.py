"""Flip every bit of every field: the receiver raises DecryptError (or, for
bytes that no longer parse, another ProtocolError) and its state does not
change; the untouched message still decrypts afterwards."""

from __future__ import annotations

import os

import pytest

from helpers import NOW, Party, deliver, session_pair
from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    DecryptError,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    ProtocolError,
    RatchetConfig,
    Session,
    open_envelope,
    seal,
)

CONFIGS = [pytest.param(PIGEON, id="pigeon"), pytest.param(CLASSIC, id="classic")]


def flips(data: bytes) -> list[bytes]:
    out = []
    for i in range(len(data)):
        for bit in range(8):
            changed = bytearray(data)
            changed[i] ^= 1 << bit
            out.append(bytes(changed))
    return out


def assert_every_flip_refused(receiver: Session, message: bytes) -> None:
    before = receiver.serialize()
    for changed in flips(message):
        with pytest.raises(ProtocolError):
            deliver(receiver, changed)
        assert receiver.serialize() == before


def scenario(config: RatchetConfig, kind: str) -> tuple[Session, bytes, bytes]:
    """(receiver, message to tamper with, its plaintext)."""
    a, b = session_pair(config)
    if kind == "current chain":
        deliver(b, a.encrypt(b"warm-up"))
        return b, a.encrypt(b"target"), b"target"
    if kind == "dh step":
        deliver(b, a.encrypt(b"x"))
        deliver(a, b.encrypt(b"y"))
        return b, a.encrypt(b"target"), b"target"
    if kind == "skipped key":
        target = a.encrypt(b"target")
        deliver(b, a.encrypt(b"later"))
        return b, target, b"target"
    raise AssertionError(kind)


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", ["current chain", "dh step", "skipped key"])
def test_every_bit_of_a_ratchet_message(config, kind):
    receiver, message, plaintext = scenario(config, kind)
    assert message[0] == 2  # an established-session message
    assert_every_flip_refused(receiver, message)
    assert deliver(receiver, message) == plaintext


@pytest.mark.parametrize("config", CONFIGS)
def test_every_bit_of_a_first_prekey_message(config):
    alice, bob = Party("alice"), Party("bob")
    otk = bob.one_time_prekey(3)
    a = Session.initiate(alice.identity, bob.record().bundle(otk), os.urandom, config)
    first = a.encrypt(b"first")
    for changed in flips(first):
        with pytest.raises(ProtocolError):
            bob.respond(changed, config)
    assert 3 in bob.one_time_prekeys  # nothing was consumed by the failures
    _, text = bob.respond(first, config)
    assert text == b"first"


def test_every_bit_of_a_sealed_envelope():
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    envelope = seal(alice, bob.public_key, b"sealed", os.urandom)
    for changed in flips(envelope):
        with pytest.raises(ProtocolError):
            open_envelope(bob, changed)
    assert open_envelope(bob, envelope).payload == b"sealed"


def test_every_bit_of_a_signed_record():
    bob = Party("bob")
    record = bob.record()
    data = record.sign(bob.identity)
    for changed in flips(data):
        try:
            accepted = DirectoryRecord.verify(changed, now=NOW)
        except ProtocolError:
            continue
        # a flip can only be accepted if it did not change what was signed
        # (e.g. a varint re-encoding is impossible here, so this must not happen)
        assert accepted == record, "a tampered record was accepted with other content"


@pytest.mark.parametrize("config", CONFIGS)
def test_a_message_of_another_session_changes_nothing(config):
    a, _ = session_pair(config)
    _, d = session_pair(config)
    message = a.encrypt(b"for b")
    before = d.serialize()
    with pytest.raises(DecryptError):
        deliver(d, message)
    assert d.serialize() == before


def test_wrong_associated_data_fails():
    a, b = session_pair()
    message = a.encrypt(b"x")
    before = b.serialize()
    with pytest.raises(DecryptError):
        b.ratchet.decrypt(IncomingMessage.decode(message).ratchet_message, b"other ad")
    assert b.serialize() == before
