"""Flip every bit of real protocol messages: nothing tampered is ever accepted.

For an established session pair in the production configuration (PIGEON,
header encryption on) and in libsignal's CLASSIC configuration, each bit of a
valid ratchet message (session kind byte, version byte, every header byte
including the header nonce, every ciphertext and tag byte) is flipped in turn
and the result delivered.  The receiver must raise DecryptError (a flipped kind
byte no longer decodes: ProtocolError) and its serialized state must be
byte-identical before and after; the untouched message must still decrypt
afterwards, exactly once.  The same for the first prekey message (through
``Session.respond``), sealed envelopes and signed directory records.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

import helpers
from helpers import NOW, deliver
from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    DecryptError,
    Device,
    DeviceCertificate,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    ProtocolError,
    RatchetConfig,
    Session,
    SignedPrekey,
    open_envelope,
    seal,
)
from pigeon.protocol.crypto import x25519_keypair
from pigeon.protocol.records import MailboxEntry

# -- fixtures: parties and sessions built through the public API ----------------

CONFIGS = [pytest.param(PIGEON, id="pigeon"), pytest.param(CLASSIC, id="classic")]


@dataclass
class Party(helpers.Party):
    """An identity with signed prekeys 0..7 (``published`` is in its record) and
    one-time prekeys 1..8, so that flipped prekey IDs often name a real key."""

    published: int = 2
    offered: dict[int, OneTimePrekey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for prekey_id in range(8):
            private, public = x25519_keypair(os.urandom)
            self.signed_prekeys[prekey_id] = private
            if prekey_id == self.published:
                self.spk = SignedPrekey(prekey_id, public, NOW)
        for prekey_id in range(1, 9):
            otk, private = OneTimePrekey.create(self.identity, prekey_id, os.urandom)
            self.one_time_prekeys[prekey_id] = private
            self.offered[prekey_id] = otk


def initiate(alice: Party, bob: Party, config: RatchetConfig, otk_id: int = 3) -> Session:
    """Alice starts a session from Bob's published, verified record."""
    return helpers.initiate(alice, bob, config, bob.offered[otk_id])


def establish(
    config: RatchetConfig, alice: Party | None = None, bob: Party | None = None
) -> tuple[Session, Session]:
    """Alice initiated, Bob answered, Alice heard back."""
    return helpers.establish(
        config, alice or Party("alice"), bob or Party("bob"), lambda bob: bob.offered[3]
    )


def flips(data: bytes) -> list[tuple[int, int, bytes]]:
    """(byte index, bit, data with that one bit flipped) for every bit."""
    out = []
    for index in range(len(data)):
        for bit in range(8):
            changed = bytearray(data)
            changed[index] ^= 1 << bit
            out.append((index, bit, bytes(changed)))
    return out


def regions(config: RatchetConfig, message: bytes) -> list[str]:
    """What each byte of a ratchet session message is, for failure reports."""
    names = ["session kind", "version"]
    if config.header_encryption:
        names += ["header nonce"] * 12 + ["encrypted header"] * 40 + ["header tag"] * 16
    else:
        names += ["ratchet key"] * 32 + ["previous chain length"] * 4 + ["message number"] * 4
    names += ["ciphertext"] * (len(message) - len(names) - 16) + ["tag"] * 16
    assert len(names) == len(message)
    return names


def report(failures: list[str]) -> str:
    shown = "\n".join(failures[:20])
    return f"{len(failures)} tampered inputs were not refused as they must be:\n{shown}"


def refuse_every_flip(config: RatchetConfig, receiver: Session, message: bytes) -> None:
    """Deliver every one-bit change of ``message``: each raises DecryptError (a
    changed kind byte: ProtocolError while decoding) and leaves ``receiver`` as
    it was."""
    before = receiver.serialize()
    names = regions(config, message)
    failures = []
    for index, bit, changed in flips(message):
        where = f"byte {index} ({names[index]}) bit {bit}"
        try:
            incoming = IncomingMessage.decode(changed)
        except ProtocolError:
            if index != 0:
                failures.append(f"{where}: refused while decoding, not decrypting")
            continue
        try:
            plaintext = receiver.decrypt(incoming)
        except DecryptError:
            pass
        except Exception as error:
            failures.append(f"{where}: raised {type(error).__name__}: {error}")
        else:
            failures.append(f"{where}: accepted as {plaintext!r}")
        if receiver.serialize() != before:
            failures.append(f"{where}: the receiver's state changed")
            receiver = Session.deserialize(before, os.urandom, config)
    assert not failures, report(failures)


# -- ratchet messages -------------------------------------------------------------


@dataclass
class Scenario:
    receiver: Session
    message: bytes
    plaintext: bytes
    check_after: Callable[[Session], None]
    """Confirms, after the real delivery, that the message took the intended path."""


def scenario(config: RatchetConfig, kind: str) -> Scenario:
    a, b = establish(config)
    if kind == "current chain":
        deliver(b, a.encrypt(b"warm-up"))  # Bob now receives on Alice's current chain
        dhr, skipped = b.ratchet.dhr, dict(b.ratchet.skipped)

        def same_chain(receiver: Session) -> None:
            assert receiver.ratchet.dhr == dhr and receiver.ratchet.skipped == skipped

        return Scenario(b, a.encrypt(b"target"), b"target", same_chain)
    if kind == "DH ratchet step":
        deliver(b, a.encrypt(b"x"))
        deliver(a, b.encrypt(b"y"))  # Alice has heard back: her next message brings a new key
        dhr = b.ratchet.dhr

        def stepped(receiver: Session) -> None:
            assert receiver.ratchet.dhr != dhr and receiver.ratchet.nr == 1

        return Scenario(b, a.encrypt(b"target"), b"target", stepped)
    if kind == "skipped key, current chain":
        deliver(b, a.encrypt(b"warm-up"))
        target = a.encrypt(b"target, overtaken")
        deliver(b, a.encrypt(b"later"))
    elif kind == "skipped key, earlier chain":
        target = a.encrypt(b"target, overtaken")
        deliver(b, a.encrypt(b"later"))
        deliver(a, b.encrypt(b"reply"))
        deliver(b, a.encrypt(b"on Alice's next chain"))
    else:
        raise AssertionError(kind)
    assert len(b.ratchet.skipped) == 1
    dhr = b.ratchet.dhr

    def from_store(receiver: Session) -> None:
        assert receiver.ratchet.dhr == dhr and not receiver.ratchet.skipped

    return Scenario(b, target, b"target, overtaken", from_store)


KINDS = [
    "current chain",
    "DH ratchet step",
    "skipped key, current chain",
    "skipped key, earlier chain",
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_bit_of_a_ratchet_message(config, kind):
    case = scenario(config, kind)
    assert case.message[0] == 2  # an established-session message
    refuse_every_flip(config, case.receiver, case.message)
    assert deliver(case.receiver, case.message) == case.plaintext
    case.check_after(case.receiver)
    before = case.receiver.serialize()
    with pytest.raises(DecryptError):
        deliver(case.receiver, case.message)  # a replay, once it has been read
    assert case.receiver.serialize() == before


# -- the first prekey message ---------------------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_every_bit_of_a_first_prekey_message(config):
    """``Session.respond`` refuses every one-bit change of the whole session
    message (kind, X3DH header, ratchet message) with a ProtocolError; then
    the real message sets up a working session.  (That a refused first
    message uses up no prekey is the node's business: respond only reads
    prekeys; tests/test_prekey_consumption.py checks it on a real database.)"""
    alice, bob = Party("alice"), Party("bob")
    a = initiate(alice, bob, config, otk_id=3)
    first = a.encrypt(b"first")
    failures = []
    for index, bit, changed in flips(first):
        try:
            _, plaintext = bob.respond(changed, config)
        except ProtocolError:
            continue
        except Exception as error:
            failures.append(f"byte {index} bit {bit}: raised {type(error).__name__}: {error}")
        else:
            failures.append(f"byte {index} bit {bit}: accepted as {plaintext!r}")
    assert not failures, report(failures)
    b, plaintext = bob.respond(first, config)
    assert plaintext == b"first"
    assert deliver(a, b.encrypt(b"it works")) == b"it works"


@pytest.mark.parametrize("config", CONFIGS)
def test_every_bit_of_a_repeated_prekey_message(config):
    """The initiator's second prekey message, delivered to the session its first
    one set up.  An established session reads only the identity key, base key
    and ratchet message of the X3DH header: a change elsewhere (the prekey IDs,
    or a field key turned into an unknown field) may be accepted, and then only
    as the original plaintext.  Every other one-bit change raises
    ProtocolError and leaves the state unchanged."""
    alice, bob = Party("alice"), Party("bob")
    a = initiate(alice, bob, config)
    b, _ = bob.respond(a.encrypt(b"first"), config)
    second = a.encrypt(b"second")
    original = IncomingMessage.decode(second)
    assert original.prekey is not None

    def read(message: IncomingMessage) -> tuple[bytes, bytes, bytes] | None:
        header = message.prekey
        if header is None:
            return None
        return header.identity_key, header.base_key, message.ratchet_message

    before = b.serialize()
    failures = []
    accepted = 0
    for index, bit, changed in flips(second):
        where = f"byte {index} bit {bit}"
        try:
            incoming = IncomingMessage.decode(changed)
            plaintext = b.decrypt(incoming)
        except ProtocolError:
            if b.serialize() != before:
                failures.append(f"{where}: refused, but the state changed")
                b = Session.deserialize(before, os.urandom, config)
            continue
        except Exception as error:
            failures.append(f"{where}: raised {type(error).__name__}: {error}")
            continue
        accepted += 1
        if read(incoming) != read(original) or plaintext != b"second":
            failures.append(f"{where}: accepted with other content: {plaintext!r}")
        b = Session.deserialize(before, os.urandom, config)  # undo the accepted delivery
    assert not failures, report(failures)
    assert accepted < 4 * 8  # only the few bytes of the prekey IDs and their field keys
    assert deliver(b, second) == b"second"


# -- sealed envelopes and signed records -------------------------------------------------


def test_every_bit_of_a_sealed_envelope():
    """A changed version byte is not an envelope (ProtocolError); every other
    change fails authentication (DecryptError)."""
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    envelope = seal(alice, bob.public_key, b"a sealed session message", os.urandom)
    failures = []
    for index, bit, changed in flips(envelope):
        expected = ProtocolError if index == 0 else DecryptError
        try:
            opened = open_envelope(bob, changed)
        except expected:
            continue
        except Exception as error:
            failures.append(f"byte {index} bit {bit}: raised {type(error).__name__}: {error}")
        else:
            failures.append(f"byte {index} bit {bit}: opened as {opened!r}")
    assert not failures, report(failures)
    opened = open_envelope(bob, envelope)
    assert opened.sender_key == alice.public_key
    assert opened.payload == b"a sealed session message"


def test_every_bit_of_a_signed_record():
    """A record with a device and a mailbox: every one-bit change is refused
    with a ProtocolError, never accepted (with other content or the same)."""
    bob = Party("bob")
    cert = DeviceCertificate.issue(bob.identity, b"\x00\x24" + b"p" * 36, NOW)
    record = DirectoryRecord(
        bob.identity.public_key,
        "bob",
        5,
        NOW,
        NOW + 86400,
        bob.record().signed_prekey,
        (Device(cert, ("/ip4/192.0.2.1/tcp/4001",)),),
        (MailboxEntry(b"\x00\x24" + b"m" * 36, b"b" * 16, ("/ip4/192.0.2.2/tcp/4001",)),),
    )
    data = record.sign(bob.identity)
    failures = []
    for index, bit, changed in flips(data):
        try:
            accepted = DirectoryRecord.verify(changed, now=NOW)
        except ProtocolError:
            continue
        except Exception as error:
            failures.append(f"byte {index} bit {bit}: raised {type(error).__name__}: {error}")
        else:
            same = "the same" if accepted == record else "other"
            failures.append(f"byte {index} bit {bit}: accepted with {same} content")
    assert not failures, report(failures)
    assert DirectoryRecord.verify(data, now=NOW) == record


# -- messages delivered to the wrong session --------------------------------------------


@pytest.mark.parametrize("config", CONFIGS)
def test_a_message_for_another_session_changes_nothing(config):
    """Messages of one session pair, delivered to either side of an unrelated
    pair, to another session between the same two people, or back to their
    sender: DecryptError, state unchanged; then they still reach the right one."""
    alice, bob = Party("alice"), Party("bob")
    a, b = establish(config, alice, bob)
    c, d = establish(config)
    again_a, again_b = establish(config, alice, Party("bob", identity=bob.identity))
    to_b, to_a = a.encrypt(b"for b"), b.encrypt(b"for a")
    pending = initiate(alice, bob, config).encrypt(b"a new session's first message")
    wrong = [
        (c, to_b),
        (d, to_b),
        (c, to_a),
        (d, to_a),
        (again_b, to_b),
        (again_a, to_a),
        (a, to_b),  # reflected back to its sender
        (b, to_a),
        (b, pending),  # a prekey message for another session between the same people
        (again_b, pending),
    ]
    for receiver, message in wrong:
        before = receiver.serialize()
        with pytest.raises(DecryptError):
            deliver(receiver, message)
        assert receiver.serialize() == before
    assert deliver(b, to_b) == b"for b"
    assert deliver(a, to_a) == b"for a"


@pytest.mark.parametrize("config", CONFIGS)
def test_wrong_associated_data_changes_nothing(config):
    a, b = establish(config)
    message = IncomingMessage.decode(a.encrypt(b"x")).ratchet_message
    before = b.serialize()
    with pytest.raises(DecryptError):
        b.ratchet.decrypt(message, b.local_key + b.remote_key)  # the two keys swapped
    assert b.serialize() == before
    assert b.ratchet.decrypt(message, b.remote_key + b.local_key) == b"x"
