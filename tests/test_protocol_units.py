"""Unit tests of the protocol core's pieces: codes, records, envelopes,
application messages, sessions."""

import os

import pytest

from helpers import NOW, Party, deliver, session_pair
from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    AppMessage,
    ByeReason,
    ContactCode,
    DecryptError,
    DeviceCertificate,
    DirectoryRecord,
    FileOffer,
    IdentityKeyPair,
    IncomingMessage,
    ProtocolError,
    Receipt,
    ReceiptType,
    RecordError,
    Session,
    SignalType,
    Text,
    Unknown,
    WebRTCSignal,
    dht_key,
    format_safety_number,
    open_envelope,
    safety_number,
    scannable_fingerprint,
    scannable_from_qr_text,
    scannable_to_qr_text,
    seal,
)
from pigeon.protocol.envelope import BUCKETS, OVERHEAD
from pigeon.protocol.records import Device, newest
from pigeon.protocol.wire import Fields, Writer, decode_varint, encode_varint

# -- wire ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**64 - 1])
def test_varint_round_trip(value):
    data = encode_varint(value)
    assert decode_varint(data, 0) == (value, len(data))


@pytest.mark.parametrize(
    "data",
    [b"\x80\x00", b"\xff" * 10 + b"\x01", b"\x80", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x02"],
)
def test_varint_refuses_overlong_truncated_and_too_large(data):
    with pytest.raises(ProtocolError):
        decode_varint(data, 0)


def test_fields_refuse_duplicates_and_wrong_types():
    twice = Writer().uint(1, 5).uint(1, 6).finish()
    with pytest.raises(ProtocolError, match="twice"):
        Fields(twice)
    assert Fields(twice, repeated={1: 2}) is not None
    with pytest.raises(ProtocolError, match="repeats too often"):
        Fields(twice + Writer().uint(1, 7).finish(), repeated={1: 2})
    many = b"".join(Writer().uint(n, 1).finish() for n in range(1, 66))
    with pytest.raises(ProtocolError, match="too many fields"):
        Fields(many)
    with pytest.raises(ProtocolError, match="wrong type"):
        Fields(Writer().uint(2, 5).finish()).bytes_(2)
    with pytest.raises(ProtocolError, match="missing"):
        Fields(b"").uint(1, default=None)


def test_unknown_fields_are_skipped():
    data = Writer().uint(1, 5).bytes_(99, b"future").finish()
    assert Fields(data).uint(1) == 5


# -- contact codes --------------------------------------------------------------


def test_contact_code_round_trip_with_addresses():
    identity = IdentityKeyPair.generate(os.urandom)
    code = ContactCode(identity.public_key, "Bob Émile & co", ("/ip4/127.0.0.1/tcp/4001",))
    uri = code.to_uri()
    assert uri.startswith("pigeon:")
    assert ContactCode.parse(uri) == code
    assert ContactCode.parse("  " + uri + "\n") == code


def test_contact_code_catches_a_typo():
    uri = ContactCode(IdentityKeyPair.generate(os.urandom).public_key, "bob").to_uri()
    i = len("pigeon:") + 10
    typo = uri[:i] + ("a" if uri[i] != "a" else "b") + uri[i + 1 :]
    with pytest.raises(ProtocolError, match="typo"):
        ContactCode.parse(typo)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda u: u.replace("pigeon:", "pidgin:"), "must start with"),
        (lambda u: u.split("?")[0], "no name"),
        (lambda u: u + "&name=eve", "exactly one name"),
        (lambda u: u + "&colour=blue", "unknown field"),
        (lambda u: u.replace("name=bob", "name="), "malformed|empty"),
        (lambda u: u + "&addr=not-a-multiaddr", "multiaddr"),
        (lambda u: u.replace("name=bob", "name=%0Abob"), "control"),
        (lambda u: u.upper(), "must start with"),
    ],
)
def test_contact_code_strict_parse(mutate, message):
    uri = ContactCode(IdentityKeyPair.generate(os.urandom).public_key, "bob").to_uri()
    with pytest.raises(ProtocolError, match=message):
        ContactCode.parse(mutate(uri))


# -- directory records ----------------------------------------------------------


def test_record_round_trip_and_key():
    bob = Party("bob")
    cert = DeviceCertificate.issue(bob.identity, b"\x00\x24peer-id-bytes", NOW)
    record = DirectoryRecord(
        bob.identity.public_key,
        "bob",
        3,
        NOW,
        NOW + 3600,
        bob.spk,
        (Device(cert, ("/ip4/127.0.0.1/tcp/1",)),),
    )
    data = record.sign(bob.identity)
    assert DirectoryRecord.verify(data, now=NOW + 1, identity_key=bob.identity.public_key) == record
    assert record.dht_key == dht_key(bob.identity.public_key)
    assert len(record.dht_key.encode()) <= 50


def test_record_rejections():
    bob, eve = Party("bob"), Party("eve")
    good = bob.record().sign(bob.identity)
    with pytest.raises(RecordError, match="expired"):
        DirectoryRecord.verify(good, now=NOW + 86400)
    with pytest.raises(RecordError, match="another identity"):
        DirectoryRecord.verify(good, now=NOW, identity_key=eve.identity.public_key)
    with pytest.raises(RecordError, match="future"):
        DirectoryRecord.verify(good, now=NOW - 3600)
    with pytest.raises(ValueError):
        bob.record().sign(eve.identity)
    # Eve re-signs Bob's body with her own key: the signature no longer matches
    forged = Fields(good)
    body = forged.bytes_(1)
    eve_sig = eve.identity.sign(b"pigeon/record/v1\x00" + body)
    with pytest.raises(DecryptError):
        DirectoryRecord.verify(Writer().bytes_(1, body).bytes_(2, eve_sig).finish(), now=NOW)


def test_record_with_forged_device_certificate_is_refused():
    bob, eve = Party("bob"), Party("eve")
    cert = DeviceCertificate.issue(eve.identity, b"peer", NOW)
    record = DirectoryRecord(
        bob.identity.public_key, "bob", 1, NOW, NOW + 60, bob.spk, (Device(cert),)
    )
    with pytest.raises(DecryptError):
        DirectoryRecord.verify(record.sign(bob.identity), now=NOW)


def test_newest_prefers_highest_sequence():
    bob = Party("bob")
    records = [bob.record(sequence=s) for s in (2, 5, 3)]
    assert newest(records) == 1


# -- sealed envelopes -----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 255, 256, 5000, BUCKETS[-1] - 1])
def test_envelope_round_trip_and_bucket_sizes(size):
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    payload = os.urandom(size)
    envelope = seal(alice, bob.public_key, payload, os.urandom)
    assert len(envelope) - OVERHEAD in BUCKETS
    opened = open_envelope(bob, envelope)
    assert opened.sender_key == alice.public_key
    assert opened.payload == payload


def test_envelope_hides_sender_and_refuses_other_recipients():
    alice, bob, eve = (IdentityKeyPair.generate(os.urandom) for _ in range(3))
    envelope = seal(alice, bob.public_key, b"secret", os.urandom)
    assert alice.public_key not in envelope and b"secret" not in envelope
    with pytest.raises(DecryptError):
        open_envelope(eve, envelope)
    with pytest.raises(ValueError):
        seal(alice, bob.public_key, bytes(BUCKETS[-1]), os.urandom)


def test_envelopes_of_similar_sizes_are_indistinguishable_by_length():
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    sizes = {len(seal(alice, bob.public_key, os.urandom(n), os.urandom)) for n in range(300, 1000)}
    assert len(sizes) == 1


# -- application messages ---------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        Text("hello 👋"),
        Text(""),
        Receipt(ReceiptType.READ, (b"a" * 16, b"b" * 16)),
        FileOffer(b"t" * 16, "pigeon-file:?v=1&root=ab", b"k" * 32, b"h" * 32),
        WebRTCSignal(b"t" * 16, SignalType.OFFER, "v=0\r\n..."),
        WebRTCSignal(b"t" * 16, SignalType.BYE, reason=ByeReason.FAILED, text="disk full"),
    ],
)
def test_app_message_round_trip(content):
    message = AppMessage.new(content, lamport=42, sent_at_ms=NOW * 1000, random=os.urandom)
    assert AppMessage.decode(message.encode()) == message


def test_unknown_kind_decodes_to_unknown():
    message = AppMessage(b"i" * 16, 1, 2, Unknown(77, b"\x08\x01"))
    decoded = AppMessage.decode(message.encode())
    assert isinstance(decoded.content, Unknown) and decoded.content.kind == 77


def test_conversation_order_is_lamport_then_id():
    a = AppMessage(b"\x02" * 16, 5, 0, Text("a"))
    b = AppMessage(b"\x01" * 16, 5, 0, Text("b"))
    c = AppMessage(b"\x00" * 16, 4, 0, Text("c"))
    assert [m.content for m in sorted([a, b, c], key=lambda m: m.sort_key)] == [
        Text("c"),
        Text("b"),
        Text("a"),
    ]


def test_bad_receipt_type_is_protocol_error():
    raw = AppMessage(b"i" * 16, 1, 2, Unknown(2, Writer().uint(1, 9).finish())).encode()
    with pytest.raises(ProtocolError, match="ReceiptType"):
        AppMessage.decode(raw)


# -- sessions -----------------------------------------------------------------------


@pytest.mark.parametrize("config", [PIGEON, CLASSIC], ids=["pigeon", "classic"])
@pytest.mark.parametrize("one_time", [True, False], ids=["4dh", "3dh"])
def test_session_both_directions(config, one_time):
    a, b = session_pair(config, with_one_time_prekey=one_time)
    for i in range(3):
        assert deliver(b, a.encrypt(b"a%d" % i)) == b"a%d" % i
        assert deliver(a, b.encrypt(b"b%d" % i)) == b"b%d" % i


def test_initiator_repeats_prekey_data_until_it_hears_back():
    alice, bob = Party("alice"), Party("bob")
    a = Session.initiate(alice.identity, bob.record().bundle(), os.urandom)
    m1, m2 = a.encrypt(b"one"), a.encrypt(b"two")
    assert IncomingMessage.decode(m2).prekey is not None
    # the second arrives first and sets up Bob's session; the first still decrypts in it
    b, text = bob.respond(m2)
    assert text == b"two"
    assert deliver(b, m1) == b"one"
    deliver(a, b.encrypt(b"ack"))
    assert IncomingMessage.decode(a.encrypt(b"three")).prekey is None


def test_prekey_message_of_another_session_is_refused():
    alice, bob = Party("alice"), Party("bob")
    first = Session.initiate(alice.identity, bob.record().bundle(), os.urandom)
    second = Session.initiate(alice.identity, bob.record().bundle(), os.urandom)
    b, _ = bob.respond(first.encrypt(b"x"))
    before = b.serialize()
    with pytest.raises(DecryptError):
        deliver(b, second.encrypt(b"y"))
    assert b.serialize() == before


def test_unknown_or_used_one_time_prekey_is_refused():
    alice, bob = Party("alice"), Party("bob")
    otk = bob.one_time_prekey(9)
    a = Session.initiate(alice.identity, bob.record().bundle(otk), os.urandom)
    message = a.encrypt(b"x")
    del bob.one_time_prekeys[9]
    with pytest.raises(DecryptError):
        bob.respond(message)


def test_previous_signed_prekey_stays_usable_after_rotation():
    alice, bob = Party("alice"), Party("bob")
    a = Session.initiate(alice.identity, bob.record().bundle(), os.urandom)
    bob.rotate_signed_prekey(2)  # id 1 is kept for in-flight messages
    _, text = bob.respond(a.encrypt(b"in flight"))
    assert text == b"in flight"
    del bob.signed_prekeys[1]
    with pytest.raises(DecryptError):
        bob.respond(a.encrypt(b"too late"))


def test_forged_one_time_prekey_is_refused_by_the_initiator():
    alice, bob, eve = Party("alice"), Party("bob"), Party("eve")
    forged = eve.one_time_prekey(1)
    with pytest.raises(DecryptError):
        Session.initiate(alice.identity, bob.record().bundle(forged), os.urandom)


def test_session_serialization_round_trips_mid_conversation():
    a, b = session_pair()
    pending = a.encrypt(b"in flight")
    a2 = Session.deserialize(a.serialize(), os.urandom)
    b2 = Session.deserialize(b.serialize(), os.urandom)
    assert a2.serialize() == a.serialize() and b2.serialize() == b.serialize()
    assert deliver(b2, pending) == b"in flight"
    assert deliver(a2, b2.encrypt(b"back")) == b"back"


def test_pending_initiator_session_round_trips():
    alice, bob = Party("alice"), Party("bob")
    a = Session.initiate(alice.identity, bob.record().bundle(), os.urandom)
    first = a.encrypt(b"one")
    a2 = Session.deserialize(a.serialize(), os.urandom)
    assert a2.pending == a.pending and a2.serialize() == a.serialize()
    b, _ = bob.respond(first)
    assert deliver(a2, b.encrypt(b"reply")) == b"reply"
    assert a2.pending is None


def test_state_from_another_configuration_is_refused():
    a, _ = session_pair(PIGEON)
    with pytest.raises(ProtocolError, match="configuration"):
        Session.deserialize(a.serialize(), os.urandom, CLASSIC)


# -- safety numbers -----------------------------------------------------------------------


def test_safety_number_format_and_qr_round_trip():
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    number = safety_number(alice.public_key, b"a", bob.public_key, b"b")
    assert len(number) == 60 and number.isdigit()
    assert len(format_safety_number(number).split()) == 12
    ours = scannable_fingerprint(alice.public_key, b"a", bob.public_key, b"b")
    text = scannable_to_qr_text(ours)
    assert scannable_from_qr_text(text) == ours
    with pytest.raises(ProtocolError):
        scannable_from_qr_text("PIGEONSN:!!!")
