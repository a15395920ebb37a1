"""Every decoder, fed random bytes and every prefix of valid input, raises
only ProtocolError (never another exception, never hangs)."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import NOW, Party, session_pair
from pigeon.protocol import (
    PIGEON,
    AppMessage,
    ContactCode,
    Device,
    DeviceCertificate,
    DirectoryRecord,
    IdentityKeyPair,
    IncomingMessage,
    OneTimePrekey,
    ProtocolError,
    RatchetState,
    Receipt,
    ReceiptType,
    Session,
    SignedPrekey,
    Text,
    open_envelope,
    scannable_fingerprint,
    seal,
)
from pigeon.protocol.fingerprint import compare_scannable, scannable_from_qr_text
from pigeon.protocol.wire import Fields, decode_varint

ALICE, BOB = Party("alice"), Party("bob")
SESSION_A, SESSION_B = session_pair()
IDENTITY = IdentityKeyPair.generate(os.urandom)
SCANNABLE = scannable_fingerprint(b"k" * 32, b"a", b"l" * 32, b"b")


def _decoders() -> dict[str, tuple[Callable[[bytes], object], bytes]]:
    """name -> (decoder, a valid input for it)."""
    otk = BOB.one_time_prekey(1)
    cert = DeviceCertificate.issue(BOB.identity, b"peer", NOW)
    record = BOB.record().sign(BOB.identity)
    a = Session.initiate(ALICE.identity, BOB.record().bundle(otk), os.urandom)
    first = a.encrypt(b"x")
    message = SESSION_A.encrypt(b"hello")
    app = AppMessage.new(
        Receipt(ReceiptType.READ, (b"i" * 16,)), lamport=3, sent_at_ms=9, random=os.urandom
    )
    envelope = seal(ALICE.identity, IDENTITY.public_key, b"payload", os.urandom)
    return {
        "fields": (lambda d: Fields(d, repeated=(1, 2)), record),
        "record": (lambda d: DirectoryRecord.verify(d, now=NOW), record),
        "signed prekey": (SignedPrekey.decode, BOB.spk.encode() if BOB.spk else b""),
        "one-time prekey": (OneTimePrekey.decode, otk.encode()),
        "device certificate": (DeviceCertificate.decode, cert.encode()),
        "device": (Device.decode, Device(cert, ("/ip4/1.2.3.4/tcp/1",)).encode()),
        "app message": (AppMessage.decode, app.encode()),
        "text message": (
            AppMessage.decode,
            AppMessage.new(Text("hé"), lamport=1, sent_at_ms=2, random=os.urandom).encode(),
        ),
        "session message": (IncomingMessage.decode, first),
        "ratchet state": (
            lambda d: RatchetState.deserialize(d, PIGEON, os.urandom),
            SESSION_A.ratchet.serialize(),
        ),
        "session state": (lambda d: Session.deserialize(d, os.urandom), SESSION_A.serialize()),
        "envelope": (lambda d: open_envelope(IDENTITY, d), envelope),
        "session decrypt": (
            lambda d: Session.deserialize(SESSION_B.serialize(), os.urandom).decrypt(
                IncomingMessage.decode(d)
            ),
            message,
        ),
        "responder": (lambda d: BOB.respond(d), first),
        "scannable": (lambda d: compare_scannable(SCANNABLE, d), SCANNABLE),
        "contact code": (
            lambda d: ContactCode.parse(d.decode("utf-8", "replace")),
            ContactCode(IDENTITY.public_key, "bob", ("/ip4/1.2.3.4/tcp/1",)).to_uri().encode(),
        ),
        "qr text": (
            lambda d: scannable_from_qr_text(d.decode("utf-8", "replace")),
            b"PIGEONSN:" + b"BAEQ",
        ),
        "varint": (lambda d: decode_varint(d, 0), b"\xff\x01"),
    }


DECODERS = _decoders()


def only_protocol_errors(decode: Callable[[bytes], object], data: bytes) -> None:
    try:
        decode(data)
    except ProtocolError as error:
        text = str(error)
        assert text and "\n" not in text, repr(text)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_every_prefix_of_valid_input(name):
    decode, valid = DECODERS[name]
    for cut in range(len(valid)):
        only_protocol_errors(decode, valid[:cut])


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=600))
def test_random_bytes(name, data):
    only_protocol_errors(DECODERS[name][0], data)


@pytest.mark.parametrize("name", sorted(DECODERS))
@settings(max_examples=150, deadline=None)
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255))
def test_one_byte_changed(name, position, value):
    decode, valid = DECODERS[name]
    if not valid:
        return
    changed = bytearray(valid)
    changed[position % len(valid)] = value
    only_protocol_errors(decode, bytes(changed))


def test_truncated_prefixes_of_strict_formats_are_refused():
    """Formats whose every field is required refuse every strict prefix.  (The
    ratchet state is not one: its trailing fields are optional, so a prefix
    that ends between fields is a valid, different state; it is never read
    from outside, only from our own database.)"""
    for name in ("record", "envelope", "session message", "one-time prekey"):
        decode, valid = DECODERS[name]
        for cut in range(len(valid)):
            with pytest.raises(ProtocolError):
                decode(valid[:cut])
