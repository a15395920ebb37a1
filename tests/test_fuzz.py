"""Every decoder of outside bytes, fed garbage, raises ProtocolError and nothing else.

Inputs come from outside (a peer, the DHT, a QR code, a pasted contact code,
our own database), so a decoder may only return a value or raise
:class:`ProtocolError` (DecryptError and RecordError are subclasses): any other
exception is a failure, and so is a call that does not return within a few
seconds.  A ProtocolError's message must be one readable line.

Each decoder is fed its valid input whole and cut short at every length, random
bytes, valid input with a random tail or head, valid input with a few random
edits, and protobuf-shaped garbage.  "Cut short" is strict for a format whose
last field is required (every prefix must be refused); for formats whose
trailing fields are optional a prefix that ends between fields is a valid,
different message, so each sample says below which length every prefix must be
refused (``refuse_below``) and why.  Authenticated formats must in addition
never decode changed bytes to something else.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import NOW, Party, deliver, establish, initiate
from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    AppMessage,
    ByeReason,
    ContactCode,
    Content,
    DecryptError,
    Device,
    DeviceCertificate,
    DirectoryRecord,
    FileOffer,
    IdentityKeyPair,
    IncomingMessage,
    MailboxToken,
    OneTimePrekey,
    Opened,
    ProtocolError,
    RatchetConfig,
    RatchetState,
    Receipt,
    ReceiptType,
    ResetReason,
    Session,
    SessionReset,
    SignalType,
    SignedPrekey,
    Text,
    Unknown,
    WebRTCSignal,
    compare_scannable,
    open_envelope,
    scannable_fingerprint,
    scannable_from_qr_text,
    scannable_to_qr_text,
    seal,
)
from pigeon.protocol.contact import validate_name
from pigeon.protocol.crypto import aead_encrypt, hkdf, x25519, x25519_keypair
from pigeon.protocol.envelope import BUCKETS, pad
from pigeon.protocol.frames import (
    Ack,
    AckEntry,
    AckStatus,
    Deliver,
    DialbackAnswer,
    DialbackRequest,
    MailboxNotice,
    Presence,
    RecordAnswer,
    RecordRequest,
)
from pigeon.protocol.mailbox import DepositToken, Item, Op, Request, Response
from pigeon.protocol.records import MailboxEntry
from pigeon.protocol.wire import Fields, Writer, decode_varint, encode_varint

# -- fixtures: parties, records and sessions built through the public API ----

CALL_LIMIT = 3.0  # seconds one decoder call may take before it counts as a hang


def field_end(data: bytes, number: int) -> int:
    """The offset just past the first occurrence of field ``number`` of a message."""
    pos = 0
    while pos < len(data):
        key, pos = decode_varint(data, pos)
        if key & 7 == 0:
            _, pos = decode_varint(data, pos)
        else:
            length, pos = decode_varint(data, pos)
            pos += length
        if key >> 3 == number:
            return pos
    raise AssertionError(f"field {number} is not in the message")


def field_start(data: bytes, number: int) -> int:
    """The offset where the first occurrence of field ``number`` of a message starts."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = decode_varint(data, pos)
        if key & 7 == 0:
            _, pos = decode_varint(data, pos)
        else:
            length, pos = decode_varint(data, pos)
            pos += length
        if key >> 3 == number:
            return start
    raise AssertionError(f"field {number} is not in the message")


# -- the harness --------------------------------------------------------------


class Hang(BaseException):
    """A decoder call ran past CALL_LIMIT (a BaseException so no decoder swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float = CALL_LIMIT) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signals only reach the main thread; run unguarded
        return

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def assert_readable(error: ProtocolError) -> None:
    """A ProtocolError says what is wrong in one printable, non-empty line."""
    assert len(error.args) == 1 and isinstance(error.args[0], str), error.args
    text = str(error)
    assert text, f"{type(error).__name__} has an empty message"
    assert text.isprintable(), f"message is not one printable line: {text!r}"
    assert text == text.strip(), f"message has stray whitespace: {text!r}"


def outcome(decode: Callable[[object], object], data: object) -> object:
    """The decoder's result, or the ProtocolError it raised; anything else fails."""
    shown = repr(data)
    if len(shown) > 300:
        shown = shown[:300] + "..."
    try:
        with time_limit():
            return decode(data)
    except ProtocolError as error:
        assert_readable(error)
        return error
    except Hang:
        raise AssertionError(f"no answer within {CALL_LIMIT} s for {shown}") from None
    except Exception as error:
        raise AssertionError(f"raised {type(error).__name__}({error}) for {shown}") from error


# -- the decoders and a valid input for each ------------------------------------


def _same(result: object) -> object:
    return result


@dataclass(frozen=True)
class Sample:
    decode: Callable[[bytes], object]
    valid: bytes
    refuse_below: int | None
    """Every prefix shorter than this must be refused (None: every strict prefix)."""
    note: str
    """Why no prefix is valid, or why one of ``refuse_below`` bytes or more may be."""
    authenticated: str = ""
    """"refuse": changed bytes never decode; "same": they may only decode to the same content."""
    summary: Callable[[object], object] = _same
    protobuf_prefix: bytes | None = None
    """Bytes before a protobuf body, for the protobuf-shaped garbage; None if not protobuf."""


STRICT = "every field up to the last is required, so no strict prefix is valid"
VARINT = "a varint cut short is truncated, so no strict prefix is valid"

BOB = Party("bob")
ALICE = Party("alice")
CERT = DeviceCertificate.issue(BOB.identity, b"\x00\x24" + b"p" * 36, NOW)
DEVICE = Device(CERT, ("/ip4/192.0.2.1/tcp/4001", "/ip6/2001:db8::1/udp/4001/quic-v1"))
MAILBOX = MailboxEntry(b"\x00\x24" + b"m" * 36, b"b" * 16, ("/ip4/192.0.2.2/tcp/4001",))
RECORD = BOB.record(devices=(DEVICE,), mailboxes=(MAILBOX,))
RECORD_BYTES = RECORD.sign(BOB.identity)
RECORD_BODY = Fields(RECORD_BYTES).bytes_(1)
RECORD_CONTEXT = b"pigeon/record/v1\x00"  # what a record signature covers, before the body


def resign(body: bytes) -> bytes:
    """A record around ``body`` with Bob's valid signature, to reach the decoding
    behind the signature check with garbage."""
    signature = BOB.identity.sign(RECORD_CONTEXT + body)
    return Writer().bytes_(1, body).bytes_(2, signature).finish()


OURS = scannable_fingerprint(ALICE.identity.public_key, b"alice", BOB.identity.public_key, b"bob")
THEIRS = scannable_fingerprint(BOB.identity.public_key, b"bob", ALICE.identity.public_key, b"alice")
QR_TEXT = scannable_to_qr_text(THEIRS)
CONTACT_URI = ContactCode(
    BOB.identity.public_key, "Bob Example", ("/ip4/192.0.2.1/tcp/4001",)
).to_uri()
CONTACT_KEY_PART = CONTACT_URI[: CONTACT_URI.index("?") + 1]  # "pigeon:<key>?"
ENVELOPE = seal(ALICE.identity, BOB.identity.public_key, b"sealed payload", os.urandom)
TOKEN = DepositToken.issue(
    BOB.identity.public_key, BOB.identity.sign, b"t" * 16, NOW + 86400
).encode()


def _app(content: Content) -> bytes:
    message = AppMessage.new(content, lamport=3, sent_at_ms=1_700_000_000_123, random=os.urandom)
    return message.encode()


def _session_samples(config: RatchetConfig, tag: str) -> dict[str, Sample]:
    """Decoders that need a live session: states, decryption, the responder."""
    a, b = establish(config)
    skipped = a.encrypt(b"left in Bob's skipped-key store")
    deliver(b, a.encrypt(b"steps Bob onto Alice's chain"))
    message = a.encrypt(b"hello")  # in Bob's current receiving chain
    assert b.ratchet.skipped and skipped
    b_state = b.serialize()
    b_ratchet = b.ratchet.serialize()
    ad = b.remote_key + b.local_key  # initiator key, then responder key

    # Alice's side before any reply: still carries the X3DH header.
    alice, bob = Party("alice"), Party("bob")
    pending = initiate(alice, bob, config, bob.one_time_prekey(7))
    first = pending.encrypt(b"first")

    def session_decrypt(data: bytes) -> bytes:
        return Session.deserialize(b_state, os.urandom, config).decrypt(
            IncomingMessage.decode(data)
        )

    def ratchet_decrypt(data: bytes) -> bytes:
        return RatchetState.deserialize(b_ratchet, config, os.urandom).decrypt(data, ad)

    def responder(data: bytes) -> tuple[Session, bytes]:
        return bob.respond(data, config)

    def responder_summary(result: object) -> object:
        assert isinstance(result, tuple)
        session, plaintext = result
        return plaintext, session.remote_key, session.base_key

    pending_state = pending.serialize()
    optional_tail = "fields after the root key are optional or default to zero"
    return {
        f"ratchet state ({tag})": Sample(
            lambda d: RatchetState.deserialize(d, config, os.urandom),
            b_ratchet,
            field_end(b_ratchet, 5),
            optional_tail,
            protobuf_prefix=b"",
        ),
        f"session state ({tag})": Sample(
            lambda d: Session.deserialize(d, os.urandom, config),
            b_state,
            None,
            "the base key (field 7) is written last and is required",
            protobuf_prefix=b"",
        ),
        f"session state with pending header ({tag})": Sample(
            lambda d: Session.deserialize(d, os.urandom, config),
            pending_state,
            field_end(pending_state, 7),
            "the pending X3DH header (field 6) is written last and is optional",
        ),
        f"session decrypt ({tag})": Sample(
            session_decrypt, message, None, STRICT, authenticated="refuse"
        ),
        f"ratchet decrypt ({tag})": Sample(
            ratchet_decrypt, message[1:], None, STRICT, authenticated="refuse"
        ),
        f"responder, first prekey message ({tag})": Sample(
            responder,
            first,
            None,
            STRICT,
            authenticated="same",
            summary=responder_summary,
            protobuf_prefix=b"\x01",
        ),
    }


def _build_samples() -> dict[str, Sample]:
    signed_prekey = BOB.spk.encode() if BOB.spk else b""
    otk = BOB.one_time_prekey(3).encode()
    device = DEVICE.encode()
    mailbox = MAILBOX.encode()
    deliver = Deliver((ENVELOPE, ENVELOPE[:-1] + b"x")).encode()
    ack = Ack(
        (AckEntry(b"d" * 32, AckStatus.STORED), AckEntry(b"e" * 32, AckStatus.REFUSED))
    ).encode()
    deposit = Request(Op.DEPOSIT, b"b" * 16, envelope=ENVELOPE, ttl_s=3600, token=TOKEN).encode()
    record_request = RecordRequest(b"i" * 20, prekey=True).encode()
    dialback = DialbackAnswer("/ip4/203.0.113.5/tcp/4001", True).encode()
    take_with_work = Request(Op.TAKE_PREKEY, b"b" * 16, work=b"w" * 8, window=29_000_000).encode()
    delete = Request(
        Op.DELETE, b"b" * 16, nonce=b"n" * 32, signature=b"s" * 64, item_ids=(b"i" * 16, b"j" * 16)
    ).encode()
    fetched = Response(
        ok=True, items=(Item(b"i" * 16, ENVELOPE, NOW), Item(b"j" * 16, ENVELOPE, NOW)), more=True
    ).encode()
    text = _app(Text("h\u00e9llo"))
    unknown = _app(Unknown(99, b"\x08\x01"))
    bob = Party("bob")
    prekey_message = initiate(Party("alice"), bob, PIGEON, bob.one_time_prekey(7)).encrypt(b"x")
    ratchet_message = b"\x02" + bytes(90)
    any_boundary = "a message may end after any field"
    return {
        "fields": Sample(Fields, RECORD_BYTES, 0, any_boundary, protobuf_prefix=b""),
        "fields, repeated={8: 8, 9: 8}": Sample(
            lambda d: Fields(d, repeated={8: 8, 9: 8}),
            RECORD_BODY,
            0,
            any_boundary,
            protobuf_prefix=b"",
        ),
        "varint": Sample(lambda d: decode_varint(d, 0), encode_varint(2**64 - 1), None, VARINT),
        "varint at an offset": Sample(
            lambda d: decode_varint(d, 3), b"abc" + encode_varint(300), None, VARINT
        ),
        "directory record": Sample(
            lambda d: DirectoryRecord.verify(d, now=NOW),
            RECORD_BYTES,
            None,
            STRICT,
            authenticated="same",
            protobuf_prefix=b"",
        ),
        "directory record body behind a valid signature": Sample(
            lambda d: DirectoryRecord.verify(resign(d), now=NOW),
            RECORD_BODY,
            field_end(RECORD_BODY, 7),
            "devices (8) and mailboxes (9) are optional repeated fields at the end",
            protobuf_prefix=Writer().uint(1, 1).bytes_(2, BOB.identity.public_key).finish(),
        ),
        "signed prekey": Sample(
            SignedPrekey.decode,
            signed_prekey,
            field_end(signed_prekey, 2),
            "created_at (field 3) defaults to 0",
            protobuf_prefix=b"",
        ),
        "one-time prekey": Sample(OneTimePrekey.decode, otk, None, STRICT, protobuf_prefix=b""),
        "device certificate": Sample(
            DeviceCertificate.decode, CERT.encode(), None, STRICT, protobuf_prefix=b""
        ),
        "device": Sample(
            Device.decode,
            device,
            field_end(device, 1),
            "addresses (field 2) are an optional repeated field at the end",
            protobuf_prefix=b"",
        ),
        "mailbox entry": Sample(
            MailboxEntry.decode,
            mailbox,
            field_end(mailbox, 2),
            "addresses (field 3) are an optional repeated field at the end",
            protobuf_prefix=b"",
        ),
        "app message, text": Sample(
            AppMessage.decode,
            text,
            field_end(text, 2),
            "lamport, time and body are optional; an empty text is valid",
            protobuf_prefix=b"",
        ),
        "app message, receipt": Sample(
            AppMessage.decode,
            _app(Receipt(ReceiptType.READ, (b"i" * 16, b"j" * 16))),
            None,
            "a receipt's body holds its required type, so no prefix is valid",
        ),
        "app message, file offer": Sample(
            AppMessage.decode,
            _app(FileOffer(b"t" * 16, "pigeon-file:?v=1", b"k" * 32, b"h" * 32)),
            None,
            "a file offer's body ends with its required SHA-256, so no prefix is valid",
        ),
        "app message, WebRTC signal": Sample(
            AppMessage.decode,
            _app(WebRTCSignal(b"t" * 16, SignalType.OFFER, "v=0")),
            None,
            "an offer's body ends with its required SDP, so no prefix is valid",
        ),
        "app message, WebRTC bye": Sample(
            AppMessage.decode,
            _app(WebRTCSignal(b"t" * 16, SignalType.BYE, reason=ByeReason.FAILED, text="disk")),
            None,
            "the body is the last field; cut, it is refused, and absent, it lacks the transfer ID",
        ),
        "app message, unknown kind": Sample(
            AppMessage.decode, unknown, field_end(unknown, 2), "an unknown kind keeps any body"
        ),
        "session message, prekey": Sample(
            IncomingMessage.decode,
            prekey_message,
            None,
            STRICT,
            protobuf_prefix=b"\x01",
        ),
        "session message, ratchet": Sample(
            IncomingMessage.decode,
            ratchet_message,
            1,
            "a ratchet message is opaque here: any body decodes",
        ),
        "envelope": Sample(
            lambda d: open_envelope(BOB.identity, d),
            ENVELOPE,
            None,
            STRICT,
            authenticated="refuse",
        ),
        "scannable fingerprint (theirs)": Sample(
            lambda d: compare_scannable(OURS, d), THEIRS, None, STRICT, protobuf_prefix=b""
        ),
        "safety-number QR text": Sample(
            lambda d: scannable_from_qr_text(d.decode("latin-1")),
            QR_TEXT.encode("ascii"),
            None,
            STRICT,
        ),
        "contact code": Sample(
            lambda d: ContactCode.parse(d.decode("latin-1")),
            CONTACT_URI.encode("ascii"),
            len(CONTACT_KEY_PART) + len("name=") + 1,
            "a code is complete once its name has a character; addresses are optional",
        ),
        "app message, session reset": Sample(
            AppMessage.decode,
            _app(SessionReset(ResetReason.UNDECRYPTABLE, 3)),
            None,
            "a reset's body holds its required reason, so no prefix is valid",
        ),
        "app message, mailbox token": Sample(
            AppMessage.decode,
            _app(MailboxToken(TOKEN)),
            None,
            "a token's body holds its required token, so no prefix is valid",
        ),
        "deposit token": Sample(DepositToken.decode, TOKEN, None, STRICT, protobuf_prefix=b""),
        "mailbox request, take prekey with work": Sample(
            Request.decode,
            take_with_work,
            field_end(take_with_work, 2),
            "work and window after the mailbox ID are optional",
            protobuf_prefix=b"",
        ),
        "deliver frame": Sample(
            Deliver.decode,
            deliver,
            field_end(deliver, 1),
            "a frame cut after its first envelope is a valid frame of one envelope",
            protobuf_prefix=b"",
        ),
        "ack frame": Sample(
            Ack.decode,
            ack,
            0,
            "an ack of nothing is valid (it matches no batch)",
            protobuf_prefix=b"",
        ),
        "presence frame": Sample(
            Presence.decode, b"\x08\x01", 0, "an empty frame says 'offline'", protobuf_prefix=b""
        ),
        "mailbox notice frame": Sample(
            MailboxNotice.decode,
            MailboxNotice(b"n" * 16).encode(),
            None,
            STRICT,
            protobuf_prefix=b"",
        ),
        "record request frame": Sample(
            RecordRequest.decode,
            record_request,
            field_end(record_request, 1),
            "a request without field 2 asks for the record only",
            protobuf_prefix=b"",
        ),
        "dial-back request frame": Sample(
            DialbackRequest.decode,
            DialbackRequest(4001).encode(),
            None,
            STRICT,
            protobuf_prefix=b"",
        ),
        "dial-back answer frame": Sample(
            DialbackAnswer.decode,
            dialback,
            field_end(dialback, 1),
            "an answer without field 2 says 'not reached'",
            protobuf_prefix=b"",
        ),
        "record answer frame": Sample(
            RecordAnswer.decode,
            RecordAnswer(b"r" * 300, b"p" * 111).encode(),
            0,
            "an empty frame says 'not this identity'",
            protobuf_prefix=b"",
        ),
        "mailbox request, deposit": Sample(
            Request.decode,
            deposit,
            field_end(deposit, 3),
            "the TTL after the envelope is optional",
            protobuf_prefix=b"",
        ),
        "mailbox request, delete": Sample(
            Request.decode,
            delete,
            field_end(delete, 7),
            "item IDs after the proof are an optional repeated field",
            protobuf_prefix=b"",
        ),
        "mailbox response, fetch": Sample(
            Response.decode,
            fetched,
            0,
            "every field of a response is optional",
            protobuf_prefix=b"",
        ),
        **_session_samples(PIGEON, "pigeon"),
        **_session_samples(CLASSIC, "classic"),
    }


SAMPLES = _build_samples()
NAMES = sorted(SAMPLES)
PROTOBUF_NAMES = sorted(n for n, s in SAMPLES.items() if s.protobuf_prefix is not None)
EXPECTED = {
    name: sample.summary(sample.decode(sample.valid))
    for name, sample in SAMPLES.items()
    if sample.authenticated == "same"
}


def check(name: str, data: bytes) -> object:
    """Feed ``data`` to a decoder: only ProtocolError, and authenticated formats
    never decode changed bytes to other content."""
    sample = SAMPLES[name]
    result = outcome(sample.decode, data)
    if isinstance(result, ProtocolError) or data == sample.valid:
        return result
    if sample.authenticated == "refuse":
        raise AssertionError(f"{name}: changed bytes were accepted: {data!r}")
    if sample.authenticated == "same":
        assert sample.summary(result) == EXPECTED[name], f"{name}: forged content from {data!r}"
    return result


# -- strategies ---------------------------------------------------------------

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ_LESS = settings(FUZZ, max_examples=60)


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _varint_field(item: tuple[int, int]) -> bytes:
    return _key(item[0], 0) + encode_varint(item[1])


def _len_field(item: tuple[int, bytes]) -> bytes:
    return _key(item[0], 2) + encode_varint(len(item[1])) + item[1]


FIELD_NUMBERS = st.integers(1, 16) | st.integers(1, 0x1FFFFFFF)
VARINT_VALUES = st.integers(0, 3) | st.integers(0, 2**64 - 1)
BYTE_VALUES = (
    st.binary(max_size=40)
    | st.sampled_from([16, 32, 64]).flatmap(lambda n: st.binary(min_size=n, max_size=n))
    | st.text(max_size=20).map(str.encode)
)
ODD_BYTES = st.sampled_from(
    [b"\x0b", b"\x0d\x00\x00\x00\x00", b"\x09", b"\x00", b"\x80", b"\x0a\xff\x01", b"\x08\x80\x00"]
)
LEAF_FIELDS = (
    st.tuples(FIELD_NUMBERS, VARINT_VALUES).map(_varint_field)
    | st.tuples(FIELD_NUMBERS, BYTE_VALUES).map(_len_field)
    | ODD_BYTES
)
PROTOBUF = st.recursive(
    st.lists(LEAF_FIELDS, max_size=8).map(b"".join),
    lambda inner: st.lists(
        LEAF_FIELDS | st.tuples(FIELD_NUMBERS, inner).map(_len_field), max_size=8
    ).map(b"".join),
    max_leaves=20,
)
EDITS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete"]),
        st.integers(0, 2**16),
        st.integers(0, 255),
    ),
    min_size=1,
    max_size=4,
)


def mutate(valid: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(valid)
    for op, where, value in edits:
        if op == "insert":
            out.insert(where % (len(out) + 1), value)
            continue
        if not out:
            continue
        i = where % len(out)
        if op == "flip":
            out[i] ^= 1 << (value % 8)
        elif op == "set":
            out[i] = value
        else:
            del out[i]
    return bytes(out)


def mutate_text(valid: str, edits: list[tuple[str, int, str]]) -> str:
    chars = list(valid)
    for op, where, value in edits:
        if op == "insert":
            chars.insert(where % (len(chars) + 1), value)
        elif chars:
            i = where % len(chars)
            if op == "set":
                chars[i] = value
            else:
                del chars[i]
    return "".join(chars)


def text_edits(alphabet: st.SearchStrategy[str]) -> st.SearchStrategy[list[tuple[str, int, str]]]:
    return st.lists(
        st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 2**16), alphabet),
        min_size=1,
        max_size=4,
    )


# Any code point, lone surrogates included (they reach us from JSON and argv).
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=200)


# -- every decoder: whole, cut short, garbage ----------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_whole_and_cut_short(name):
    """The valid input decodes; each prefix is refused (or, past ``refuse_below``,
    may decode, for the reason in the sample's note)."""
    sample = SAMPLES[name]
    whole = check(name, sample.valid)
    assert not isinstance(whole, ProtocolError), f"{name}: valid input refused: {whole}"
    assert sample.note
    refuse_below = len(sample.valid) if sample.refuse_below is None else sample.refuse_below
    for cut in range(len(sample.valid)):
        result = check(name, sample.valid[:cut])
        if cut < refuse_below:
            assert isinstance(result, ProtocolError), (
                f"{name}: the {cut}-byte prefix decoded to {result!r}"
            )


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(data=st.binary(max_size=1024))
def test_random_bytes(name, data):
    check(name, data)


@pytest.mark.parametrize("name", NAMES)
@FUZZ_LESS
@given(cut=st.integers(0, 2**16), tail=st.binary(max_size=200), head=st.booleans())
def test_valid_start_with_a_random_tail(name, cut, tail, head):
    """The valid input's start with garbage after it (or its end with garbage before)."""
    valid = SAMPLES[name].valid
    cut %= len(valid) + 1
    check(name, tail + valid[cut:] if head else valid[:cut] + tail)


@pytest.mark.parametrize("name", NAMES)
@FUZZ
@given(edits=EDITS)
def test_valid_input_with_random_edits(name, edits):
    check(name, mutate(SAMPLES[name].valid, edits))


@pytest.mark.parametrize("name", PROTOBUF_NAMES)
@FUZZ_LESS
@given(message=PROTOBUF)
def test_protobuf_shaped_garbage(name, message):
    """Well-framed messages with random fields get past the framing checks."""
    prefix = SAMPLES[name].protobuf_prefix
    assert prefix is not None
    check(name, prefix + message)


# -- the wire codec -----------------------------------------------------------


VARINT_SHAPED = st.builds(
    lambda head, more, last, tail: head + bytes(more) + bytes([last]) + tail,
    st.binary(max_size=4),
    st.lists(st.integers(0x80, 0xFF), max_size=11),
    st.integers(0, 0x7F) | st.just(0),
    st.binary(max_size=4),
)


@FUZZ
@given(data=st.binary(max_size=24) | VARINT_SHAPED, pos=st.integers(0, 30) | st.integers(0, 4))
def test_decode_varint_accepts_only_canonical_varints(data, pos):
    """Random bytes and varint-shaped ones (continuation bytes, then an end byte,
    zero included): a value whose canonical encoding is exactly the bytes read."""
    result = outcome(lambda d: decode_varint(d, pos), data)
    if isinstance(result, ProtocolError):
        return
    assert isinstance(result, tuple)
    value, end = result
    assert pos < end <= len(data)
    assert encode_varint(value) == data[pos:end], "a non-canonical varint was accepted"


@FUZZ
@given(value=st.integers(0, 2**64 - 1), before=st.binary(max_size=8), after=st.binary(max_size=8))
def test_varint_round_trip(value, before, after):
    encoded = encode_varint(value)
    assert decode_varint(before + encoded + after, len(before)) == (
        value,
        len(before) + len(encoded),
    )


@pytest.mark.parametrize("encoded", [b"\x80\x00", b"\xff\x80\x00", b"\x80" * 9 + b"\x00"])
def test_overlong_varints_are_refused(encoded):
    assert isinstance(outcome(lambda d: decode_varint(d, 0), encoded), ProtocolError)


@pytest.mark.parametrize("value", [2**64, 2**64 + 1, 2**69, 2**70 - 1, 2**70, 2**100])
def test_varints_beyond_64_bits_are_refused(value):
    encoded = bytearray()
    while value >= 0x80:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    assert isinstance(outcome(lambda d: decode_varint(d, 0), bytes(encoded)), ProtocolError)


def accessor_checks(n: int) -> list[tuple[Callable[[Fields], object], Callable[[Any], bool]]]:
    """(accessor of field ``n``, what its value must satisfy when it returns)."""
    return [
        (lambda f: f.uint(n), lambda v: isinstance(v, int) and 0 <= v < 2**64),
        (lambda f: f.uint(n, default=None, maximum=1000), lambda v: 0 <= v <= 1000),
        (lambda f: f.bytes_(n, required=False), lambda v: isinstance(v, bytes)),
        (lambda f: f.bytes_(n, size=32), lambda v: len(v) == 32),
        (lambda f: f.bytes_(n, max_size=8), lambda v: len(v) <= 8),
        (lambda f: f.optional_bytes(n, size=16), lambda v: v is None or len(v) == 16),
        (lambda f: f.text(n, required=False), lambda v: isinstance(v, str)),
        (lambda f: f.text(n, max_size=10), lambda v: len(v.encode()) <= 10),
        (lambda f: f.repeated_bytes(n, max_size=40), lambda v: len(v) <= 3),
        (lambda f: f.repeated_text(n, max_size=40), lambda v: len(v) <= 3),
    ]


@FUZZ
@given(
    data=st.binary(max_size=300) | PROTOBUF,
    repeated=st.frozensets(st.integers(1, 20), max_size=5),
)
def test_fields_and_every_accessor(data, repeated):
    """Fields(…, repeated=…) and each typed accessor: a value that keeps its
    promise (type, size, range) or ProtocolError."""
    fields = outcome(lambda d: Fields(d, repeated=dict.fromkeys(repeated, 3)), data)
    if isinstance(fields, ProtocolError):
        return
    assert isinstance(fields, Fields)
    for n in range(1, 21):
        for access, promise in accessor_checks(n):
            value = outcome(access, fields)
            if not isinstance(value, ProtocolError):
                assert promise(value), f"field {n}: {value!r} breaks the accessor's promise"


@pytest.mark.parametrize("data", ["text", None, 42, [1, 2]])
def test_fields_refuses_what_is_not_bytes(data):
    assert isinstance(outcome(Fields, data), ProtocolError)


# -- what a decoder accepts, its encoder can write again ---------------------------

ZERO_ID_SPK = b"\x08\x00" + Writer().bytes_(2, bytes(range(32))).uint(3, NOW).finish()
ZERO_ID_OTK = b"\x08\x00" + Writer().bytes_(2, bytes(range(32))).bytes_(3, bytes(64)).finish()
ZERO_KIND_APP = b"\x08\x00" + Writer().bytes_(2, b"i" * 16).uint(3, 1).finish()


@pytest.mark.parametrize(
    ("decoder", "data"),
    [
        pytest.param(SignedPrekey, ZERO_ID_SPK, id="signed prekey 0"),
        pytest.param(OneTimePrekey, ZERO_ID_OTK, id="one-time prekey 0"),
        pytest.param(AppMessage, ZERO_KIND_APP, id="app message kind 0"),
    ],
)
def test_decoded_values_survive_a_round_trip(decoder, data):
    value = outcome(decoder.decode, data)
    if not isinstance(value, ProtocolError):
        assert outcome(decoder.decode, value.encode()) == value


def test_a_record_whose_prekey_cannot_be_stored_again_is_refused():
    """A contact publishes a validly signed record whose signed prekey carries
    an explicit ID 0, which our encoders cannot write.  Accepting it would let
    Alice start a session she cannot load again from her own database, so the
    record is refused when verified; a record with ID 1 gives a session that
    reloads byte for byte."""
    mallory = IdentityKeyPair.generate(os.urandom)

    def record_with(prekey: bytes) -> bytes:
        body = (
            Writer()
            .uint(1, 1)
            .bytes_(2, mallory.public_key)
            .text(3, "mallory")
            .uint(4, 1)
            .uint(5, NOW)
            .uint(6, NOW + 86400)
            .bytes_(7, prekey)
            .finish()
        )
        signature = mallory.sign(RECORD_CONTEXT + body)
        return Writer().bytes_(1, body).bytes_(2, signature).finish()

    public = Writer().bytes_(2, x25519_keypair(os.urandom)[1]).finish()
    refused = outcome(
        lambda d: DirectoryRecord.verify(d, now=NOW), record_with(b"\x08\x00" + public)
    )
    assert isinstance(refused, ProtocolError), f"accepted {refused!r}"

    record = DirectoryRecord.verify(record_with(b"\x08\x01" + public), now=NOW)
    session = Session.initiate(ALICE.identity, record.bundle(), os.urandom)
    session.encrypt(b"hello")
    saved = session.serialize()
    reloaded = outcome(lambda d: Session.deserialize(d, os.urandom), saved)
    assert isinstance(reloaded, Session), f"Alice cannot load her own session: {reloaded}"
    assert reloaded.serialize() == saved


# -- contact codes (text) ----------------------------------------------------

QUERY_PIECES = st.sampled_from(
    [
        *("name", "addr", "=", "&", "%", "%2", "%ff", "%0a", "%00", "%e2%80%ae", "/", "+"),
        *(" ", "\n", "\t", "\u00e9", "\u202e", "\u200b", "x", ";", "?", "#", "\udcff"),
        "/ip4/1.2.3.4/tcp/1",
    ]
)
QUERIES = st.lists(QUERY_PIECES | st.text(ANY_CHAR, max_size=5), max_size=20).map("".join)
CONTACT_TEXTS = st.one_of(
    ANY_TEXT,
    ANY_TEXT.map(lambda t: "pigeon:" + t),
    QUERIES.map(lambda q: CONTACT_KEY_PART + q),
    text_edits(ANY_CHAR | QUERY_PIECES).map(lambda e: mutate_text(CONTACT_URI, e)),
)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@FUZZ
@given(text=CONTACT_TEXTS)
def test_contact_code_parse(text):
    """Random text, random queries behind a valid key, and edited valid codes:
    a ProtocolError, or a code that keeps the rules and survives a round trip."""
    code = outcome(ContactCode.parse, text)
    if isinstance(code, ProtocolError):
        return
    assert isinstance(code, ContactCode)
    assert validate_name(code.name) == code.name
    assert len(code.addresses) <= 8
    assert all(a.startswith("/") and len(a) <= 256 for a in code.addresses)
    if _encodable(code.name) and all(map(_encodable, code.addresses)):
        assert ContactCode.parse(code.to_uri()) == code


@pytest.mark.parametrize("query", ["name=b\udcffb", "name=bob&addr=/ip4/\ud800"])
def test_contact_code_refuses_text_that_is_not_unicode(query):
    """A lone surrogate (JSON's "\\udcff", or undecodable argv bytes) is not text:
    accepting it makes ``to_uri()`` and every UTF-8 store raise UnicodeEncodeError."""
    result = outcome(ContactCode.parse, CONTACT_KEY_PART + query)
    assert isinstance(result, ProtocolError), f"accepted {result!r}"


# -- safety numbers (QR text and scanned bytes) -----------------------------------

B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
QR_TEXTS = st.one_of(
    ANY_TEXT,
    st.text(st.sampled_from(B32 + "=abc189 \n\u00e9"), max_size=200).map(lambda t: "PIGEONSN:" + t),
    (st.binary(max_size=120) | PROTOBUF).map(
        lambda d: "PIGEONSN:" + base64.b32encode(d).decode().rstrip("=")
    ),
    text_edits(st.sampled_from(B32 + "=:a \udcff") | ANY_CHAR).map(
        lambda e: mutate_text(QR_TEXT, e)
    ),
)


@FUZZ
@given(text=QR_TEXTS)
def test_scannable_from_qr_text(text):
    data = outcome(scannable_from_qr_text, text)
    if isinstance(data, ProtocolError):
        return
    assert isinstance(data, bytes)
    verdict = outcome(lambda d: compare_scannable(OURS, d), data)
    assert isinstance(verdict, bool | ProtocolError)


@FUZZ
@given(
    version=VARINT_VALUES,
    local=BYTE_VALUES | PROTOBUF,
    remote=BYTE_VALUES | PROTOBUF,
    wrap=st.booleans(),
)
def test_compare_scannable_with_garbage_halves(version, local, remote, wrap):
    """A well-framed fingerprint with garbage halves: a bool or ProtocolError, and
    True only when the halves are really ours swapped."""
    if wrap:
        local, remote = Writer().bytes_(1, local).finish(), Writer().bytes_(1, remote).finish()
    theirs = Writer().uint(1, version).bytes_(2, local).bytes_(3, remote).finish()
    verdict = outcome(lambda d: compare_scannable(OURS, d), theirs)
    assert isinstance(verdict, bool | ProtocolError)
    if verdict is True:
        assert Fields(theirs).bytes_(2) == Fields(THEIRS).bytes_(2)


def test_compare_scannable_tells_match_from_mismatch():
    assert compare_scannable(OURS, THEIRS) is True
    assert compare_scannable(OURS, OURS) is False
    assert compare_scannable(THEIRS, OURS) is True


# -- ratchet decryption with hostile headers --------------------------------------

LOW_ORDER_POINTS = [
    bytes(32),
    (1).to_bytes(32, "little"),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    (2**255 - 19 - 1).to_bytes(32, "little"),
    (2**255 - 19).to_bytes(32, "little"),
    (2**255 - 19 + 1).to_bytes(32, "little"),
]


def _receiver(config: RatchetConfig) -> tuple[bytes, bytes]:
    """A receiving ratchet state with skipped keys in an earlier and the current chain."""
    a, b = establish(config)
    a.encrypt(b"skipped in an earlier chain")
    deliver(b, a.encrypt(b"x"))
    deliver(a, b.encrypt(b"y"))
    a.encrypt(b"skipped in the current chain")
    deliver(b, a.encrypt(b"z"))
    assert len({key for key, _ in b.ratchet.skipped}) == 2
    return b.ratchet.serialize(), b.remote_key + b.local_key


RECEIVERS = {"pigeon": (PIGEON, *_receiver(PIGEON)), "classic": (CLASSIC, *_receiver(CLASSIC))}
HEADER = struct.Struct(">32sII")


@pytest.mark.parametrize("tag", sorted(RECEIVERS))
@FUZZ
@given(data=st.data())
def test_hostile_headers_raise_decrypt_error_and_change_nothing(tag, data):
    """Headers a peer holding the header keys could send: any ratchet key (also
    low-order points), any counters, under every header key we know (current,
    next, skipped), with a ciphertext that does not authenticate."""
    config, saved, ad = RECEIVERS[tag]
    state = RatchetState.deserialize(saved, config, os.urandom)
    before = state.serialize()
    known = [state.dhr, *(key for key, _ in state.skipped)]
    dh = data.draw(
        st.sampled_from([k for k in known if k] + LOW_ORDER_POINTS)
        | st.binary(min_size=32, max_size=32)
    )
    near = {0, state.nr - 1, state.nr, state.nr + 1, *(n for _, n in state.skipped)}
    counters = (
        st.sampled_from(sorted(n for n in near if n >= 0))
        | st.integers(0, 1200)
        | st.integers(0, 2**32 - 1)
    )
    header = HEADER.pack(dh, data.draw(counters), data.draw(counters))
    if config.header_encryption:
        keys = [state.hkr, state.nhkr, *(key for key, _ in state.skipped)]
        key = data.draw(
            st.sampled_from([k for k in keys if k]) | st.binary(min_size=32, max_size=32)
        )
        nonce = data.draw(st.binary(min_size=12, max_size=12))
        header = nonce + AESGCM(key).encrypt(nonce, header, b"")
    message = b"\x01" + header + data.draw(st.binary(min_size=16, max_size=80))
    result = outcome(lambda m: state.decrypt(m, ad), message)
    assert isinstance(result, DecryptError), f"expected DecryptError, got {result!r}"
    assert state.serialize() == before, "a refused message changed the state"


# -- envelopes with authentic layers around garbage --------------------------------


def seal_raw(sender: IdentityKeyPair, sender_key: bytes, padded: bytes) -> bytes:
    """What ``seal`` builds, but with any 32-byte sender key and any padded body."""
    ephemeral_private, ephemeral_public = x25519_keypair(os.urandom)
    recipient_dh = BOB.identity.dh_public
    keys = hkdf(
        x25519(ephemeral_private, recipient_dh),
        ephemeral_public + recipient_dh,
        b"Pigeon_Seal_v1_sender",
        64,
    )
    header = b"\x01" + ephemeral_public
    sealed_sender = aead_encrypt(keys[:32], bytes(12), sender_key, header)
    body_key = hkdf(
        x25519(sender.dh_private, recipient_dh),
        keys[32:] + sealed_sender,
        b"Pigeon_Seal_v1_body",
        32,
    )
    return (
        header + sealed_sender + aead_encrypt(body_key, bytes(12), padded, header + sealed_sender)
    )


def test_seal_raw_builds_real_envelopes():
    envelope = seal_raw(ALICE.identity, ALICE.identity.public_key, pad(b"hi"))
    assert open_envelope(BOB.identity, envelope) == Opened(ALICE.identity.public_key, b"hi")


PADDED = st.one_of(
    st.sampled_from(BUCKETS[:2]).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    st.integers(256, 1100).map(bytes),
    st.builds(
        lambda payload, zeros, end: payload + end + bytes(zeros),
        st.binary(max_size=300),
        st.integers(0, 800),
        st.sampled_from([b"\x80", b"\x81", b"\x00", b""]),
    ).filter(lambda p: len(p) >= 256),
)


@FUZZ
@given(
    sender_key=st.just(ALICE.identity.public_key)
    | st.sampled_from(LOW_ORDER_POINTS)
    | st.binary(min_size=32, max_size=32),
    padded=PADDED,
)
def test_envelope_layers_around_garbage(sender_key, padded):
    """Authentic outer layer with any sender key; authentic body with any
    padding: DecryptError, or exactly the payload the padding marks."""
    result = outcome(
        lambda e: open_envelope(BOB.identity, e), seal_raw(ALICE.identity, sender_key, padded)
    )
    if isinstance(result, Opened):
        assert result.sender_key == ALICE.identity.public_key == sender_key
        assert len(padded) in BUCKETS
        assert padded.rstrip(b"\x00") == result.payload + b"\x80"
    else:
        assert isinstance(result, DecryptError), f"expected DecryptError, got {result!r}"


# -- signed records with garbage behind a valid signature ---------------------------

CERTS = st.builds(
    lambda peer, issued: DeviceCertificate.issue(BOB.identity, peer, issued),
    st.binary(max_size=70),
    VARINT_VALUES,
)
ADDRESS_LISTS = st.lists(
    st.text(max_size=20) | st.sampled_from(["/ip4/1.2.3.4/tcp/1", "x" * 300]),
    max_size=18,
)
RECORD_FIELDS = st.one_of(
    st.tuples(st.sampled_from([3, 4, 5, 6]), VARINT_VALUES).map(_varint_field),
    st.tuples(st.just(3), BYTE_VALUES | st.binary(min_size=250, max_size=300)).map(_len_field),
    st.tuples(st.just(7), BYTE_VALUES | PROTOBUF).map(_len_field),
    st.builds(Device, CERTS, ADDRESS_LISTS.map(tuple)).map(lambda d: _len_field((8, d.encode()))),
    st.tuples(st.just(8), PROTOBUF).map(_len_field),
    st.tuples(st.sampled_from([8, 9]), BYTE_VALUES).map(_len_field),
    st.tuples(st.just(9), PROTOBUF).map(_len_field),
    LEAF_FIELDS,
)


@FUZZ_LESS
@given(
    fields=st.lists(RECORD_FIELDS, max_size=12),
    keep=st.lists(st.sampled_from([3, 4, 5, 6, 7]), unique=True),
)
def test_record_bodies_behind_a_valid_signature(fields, keep):
    """Record bodies signed by their own key, made of the valid record's fields
    (some kept) and random ones: decoding them raises only ProtocolError."""
    head = Writer().uint(1, 1).bytes_(2, BOB.identity.public_key).finish()
    valid = b"".join(
        RECORD_BODY[field_start(RECORD_BODY, n) : field_end(RECORD_BODY, n)] for n in sorted(keep)
    )
    result = outcome(
        lambda d: DirectoryRecord.verify(d, now=NOW), resign(head + valid + b"".join(fields))
    )
    assert isinstance(result, DirectoryRecord | ProtocolError)


# -- error messages -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("decode", "data"),
    [
        (ContactCode.parse, CONTACT_KEY_PART + "name=x&evil%0Akey%0D=1"),
        (ContactCode.parse, CONTACT_KEY_PART + "name=x&\u202e\n=1"),
        (ContactCode.parse, CONTACT_KEY_PART + "name=%0A"),
        (ContactCode.parse, "\n"),
        (scannable_from_qr_text, "PIGEONSN:\n\u00e9"),
        (
            lambda d: RatchetState.deserialize(d, PIGEON, os.urandom),
            encode_varint(8) + b"\xff" * 9 + b"\x01",
        ),
        (lambda d: compare_scannable(OURS, d), Writer().uint(1, 2**64 - 1).finish()),
        (
            AppMessage.decode,
            Writer().uint(1, 2).bytes_(2, b"i" * 16).bytes_(5, b"\x08\x63").finish(),
        ),
        (Fields, b"\x0f"),
        (Fields, b"\x08\x01\x08\x01"),
        (lambda d: open_envelope(BOB.identity, d), b"\x07" + ENVELOPE[1:]),
    ],
    # by position: some inputs hold a key made at random, and every process
    # collecting the tests (pytest-xdist's workers) must name them alike
    ids=lambda value: None if callable(value) else "",
)
def test_error_messages_are_one_readable_line(decode, data):
    """Messages that quote outside input quote it safely, on one line."""
    error = outcome(decode, data)
    assert isinstance(error, ProtocolError), f"expected a ProtocolError, got {error!r}"
