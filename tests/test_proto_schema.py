"""docs/protocol/pigeon.proto describes exactly what the codec writes.

The codec (``pigeon.protocol.wire``) is written by hand, so nothing ties it to
the schema other implementations would be generated from.  This compiles the
.proto with protoc (bundled with grpcio-tools) and, for every message kind the
codec writes, built through the public API:

- the protobuf runtime reads our bytes with no unknown field, and every field
  it reads holds the value we meant (field by field, nested messages too);
- the same values, set through the protobuf runtime and serialized, decode with
  our codec to the same object, and are byte for byte what our codec writes
  (or, where the codec writes fields out of number order, the same fields);
- every field and message of the schema is exercised, and its enums are the
  codec's.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_tools import protoc

from pigeon.protocol import (
    CLASSIC,
    PIGEON,
    AppMessage,
    ByeReason,
    Content,
    Device,
    DeviceCertificate,
    DirectoryRecord,
    FileOffer,
    IdentityKeyPair,
    IncomingMessage,
    Introduction,
    MailboxToken,
    OneTimePrekey,
    PrekeyBundle,
    Random,
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
    Timer,
    Unknown,
    WebRTCSignal,
    compare_scannable,
    scannable_fingerprint,
    seal,
)
from pigeon.protocol.crypto import x25519_keypair
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
    digest,
)
from pigeon.protocol.mailbox import (
    MAX_ITEMS,
    DepositToken,
    Item,
    Op,
    Request,
    Response,
    mailbox_id,
    proof_message,
)
from pigeon.protocol.messages import Kind
from pigeon.protocol.records import MailboxEntry, Rotation
from pigeon.transfer import wire as transfer_wire
from pigeon.transfer.manifest import MAX_CHUNKS, MAX_HASHES_PER_PAGE

PROTO = Path(__file__).resolve().parent.parent / "docs" / "protocol" / "pigeon.proto"
PACKAGE = "pigeon.v1"
U32 = 0xFFFF_FFFF
U64 = (1 << 64) - 1  # the widest varint: a uint32 in the schema would truncate it
NOW = 1_800_000_000
# Signature contexts, as docs/protocol/records.md states them.
RECORD_CONTEXT = b"pigeon/record/v1\x00"
DEVICE_CONTEXT = b"pigeon/device/v1\x00"


# -- the schema, compiled once ------------------------------------------------


class Schema:
    """The compiled .proto: message classes by their name in pigeon.proto."""

    def __init__(self, pool: descriptor_pool.DescriptorPool) -> None:
        self.pool = pool
        self.file = pool.FindFileByName(PROTO.name)

    def descriptor(self, name: str) -> Descriptor:
        return self.pool.FindMessageTypeByName(f"{PACKAGE}.{name}")

    def parse(self, name: str, data: bytes) -> Message:
        return message_factory.GetMessageClass(self.descriptor(name)).FromString(data)


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Schema:
    # A descriptor set, not generated _pb2 modules: loading descriptors into a
    # pool works with any protobuf runtime, whatever protoc version made them.
    out = tmp_path_factory.mktemp("proto") / "pigeon.desc"
    status = protoc.main(
        ["protoc", f"--proto_path={PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name]
    )
    assert status == 0, "protoc refused pigeon.proto (its message is on stderr above)"
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)
    return Schema(pool)


# -- what a sample expects ----------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A bytes field that holds an encoded message of another type (a body the
    codec decodes separately, or bytes a signature covers)."""

    type: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class Sample:
    type: str  # the message's name in pigeon.proto
    data: bytes  # what our codec wrote
    expected: dict[str, Any]  # the values we meant, by field name in the schema
    decode: Callable[[bytes], Any]  # our codec's decoder
    value: Any  # what ``decode`` must return, for our bytes and for protobuf's


def is_default(value: Any) -> bool:
    """Proto3 leaves these out, and so does our codec (it skips zero and empty)."""
    return value is None or (not isinstance(value, Encoded) and not value)


def check(schema: Schema, message: Message, expected: dict[str, Any], where: str) -> None:
    """Every field protobuf read is in the schema and holds the expected value."""
    unknown = [(f.field_number, f.wire_type) for f in unknown_fields.UnknownFieldSet(message)]
    assert not unknown, f"{where}: (field number, wire type) {unknown} are not in the schema"
    fields = message.DESCRIPTOR.fields_by_name
    assert set(expected) <= set(fields), f"{where}: no field {sorted(set(expected) - set(fields))}"
    read = {field.name for field, _ in message.ListFields()}
    meant = {name for name, value in expected.items() if not is_default(value)}
    assert read == meant, f"{where}: protobuf read fields {sorted(read)}, we wrote {sorted(meant)}"
    for name in sorted(meant):
        check_value(schema, getattr(message, name), expected[name], f"{where}.{name}")


def check_value(schema: Schema, got: Any, want: Any, where: str) -> None:
    if isinstance(want, list):
        assert len(got) == len(want), f"{where}: {len(got)} entries, we wrote {len(want)}"
        for i, (got_one, want_one) in enumerate(zip(got, want, strict=True)):
            check_value(schema, got_one, want_one, f"{where}[{i}]")
    elif isinstance(want, dict):
        check(schema, got, want, where)
    elif isinstance(want, Encoded):
        assert isinstance(got, bytes), f"{where}: should be bytes holding a {want.type}"
        check(schema, schema.parse(want.type, got), want.fields, f"{where}<{want.type}>")
    else:
        assert type(got) is type(int(want) if isinstance(want, IntEnum) else want), where
        assert got == want, f"{where}: protobuf read {got!r}, we wrote {want!r}"


def build(schema: Schema, name: str, expected: dict[str, Any]) -> Message:
    """The expected values, set through the protobuf runtime."""
    descriptor = schema.descriptor(name)
    message = message_factory.GetMessageClass(descriptor)()
    for field_name, value in expected.items():
        if is_default(value):
            continue
        field = descriptor.fields_by_name[field_name]
        if field.is_repeated:
            target = getattr(message, field_name)
            for one in value:
                if isinstance(one, dict):
                    target.add().CopyFrom(build(schema, field.message_type.name, one))
                else:
                    target.append(leaf(schema, one))
        elif isinstance(value, dict):
            getattr(message, field_name).CopyFrom(build(schema, field.message_type.name, value))
        else:
            setattr(message, field_name, leaf(schema, value))
    return message


def leaf(schema: Schema, value: Any) -> Any:
    if isinstance(value, Encoded):
        return build(schema, value.type, value.fields).SerializeToString(deterministic=True)
    return int(value) if isinstance(value, IntEnum) else value


# -- the samples: every message kind the codec writes --------------------------

BUILDERS: dict[str, Callable[[Schema], Sample]] = {}


def sample(name: str) -> Callable[[Callable[[Schema], Sample]], Callable[[Schema], Sample]]:
    def register(builder: Callable[[Schema], Sample]) -> Callable[[Schema], Sample]:
        BUILDERS[name] = builder
        return builder

    return register


def rng(seed: str) -> Random:
    """Deterministic randomness, so a failure shows the same bytes every run."""
    return random.Random(seed).randbytes


ALICE = IdentityKeyPair.generate(rng("alice"))
BOB = IdentityKeyPair.generate(rng("bob"))
MAILBOX_KEY = IdentityKeyPair.generate(rng("mailbox key"))  # an Ed25519 key of its own
BOX = mailbox_id(MAILBOX_KEY.public_key)
PEER_ID = b"\x00\x24\x08\x01\x12\x20" + rng("peer")(32)  # a libp2p Ed25519 peer ID's shape
ENVELOPES = tuple(seal(ALICE, BOB.public_key, b"x" * n, rng(f"env{n}")) for n in (1, 300, 5000))


def spk_fields(spk: SignedPrekey) -> dict[str, Any]:
    return {"id": spk.prekey_id, "public_key": spk.public_key, "created_at": spk.created_at}


def otk_fields(otk: OneTimePrekey) -> dict[str, Any]:
    return {"id": otk.prekey_id, "public_key": otk.public_key, "signature": otk.signature}


def cert_fields(cert: DeviceCertificate) -> dict[str, Any]:
    return {"peer_id": cert.peer_id, "issued_at": cert.issued_at, "signature": cert.signature}


def device_fields(device: Device) -> dict[str, Any]:
    return {"certificate": cert_fields(device.certificate), "addresses": list(device.addresses)}


def entry_fields(entry: MailboxEntry) -> dict[str, Any]:
    return {
        "peer_id": entry.peer_id,
        "mailbox_id": entry.mailbox_id,
        "addresses": list(entry.addresses),
    }


def codec_sample(type_: str, value: Any, expected: dict[str, Any], **kw: Any) -> Sample:
    """A sample whose decoder is ``type(value).decode`` and value is ``value``."""
    return Sample(type_, value.encode(), expected, type(value).decode, value, **kw)


SPK = SignedPrekey(U32, x25519_keypair(rng("spk"))[1], U64)
OTK = OneTimePrekey.create(BOB, U32, rng("otk"))[0]
CERT = DeviceCertificate.issue(ALICE, PEER_ID, NOW)
DEVICE = Device(CERT, ("/ip4/192.0.2.7/tcp/4001", "/dns4/pigeon.example/udp/4001/quic-v1"))
ENTRY = MailboxEntry(PEER_ID[::-1], BOX, ("/ip6/2001:db8::1/tcp/4002",))
TOKEN = DepositToken.issue(MAILBOX_KEY.public_key, MAILBOX_KEY.sign, rng("token")(16), U64)


def token_fields(token: DepositToken) -> dict[str, Any]:
    return {
        "mailbox_id": token.mailbox_id,
        "token_id": token.token_id,
        "expires_at": token.expires_at,
        "signature": token.signature,
    }


@sample("SignedPrekey")
def _(schema: Schema) -> Sample:
    return codec_sample("SignedPrekey", SPK, spk_fields(SPK))


@sample("OneTimePrekey")
def _(schema: Schema) -> Sample:
    return codec_sample("OneTimePrekey", OTK, otk_fields(OTK))


@sample("DeviceCertificate")
def _(schema: Schema) -> Sample:
    return codec_sample("DeviceCertificate", CERT, cert_fields(CERT))


@sample("Device")
def _(schema: Schema) -> Sample:
    return codec_sample("Device", DEVICE, device_fields(DEVICE))


@sample("MailboxEntry")
def _(schema: Schema) -> Sample:
    return codec_sample("MailboxEntry", ENTRY, entry_fields(ENTRY))


# Alice moves to a new identity (BOB's key stands in for it).
ROTATION = Rotation.create(ALICE, BOB, NOW)


def rotation_fields(rotation: Rotation) -> dict[str, Any]:
    return {
        "old_key": rotation.old_key,
        "new_key": rotation.new_key,
        "at": rotation.at,
        "old_signature": rotation.old_signature,
        "new_signature": rotation.new_signature,
    }


@sample("Rotation")
def _(schema: Schema) -> Sample:
    return codec_sample("Rotation", ROTATION, rotation_fields(ROTATION))


@sample("SignedRecord")
def _(schema: Schema) -> Sample:
    second = Device(DeviceCertificate.issue(ALICE, PEER_ID[:-1] + b"\x01", NOW + 1))
    other = MailboxEntry(PEER_ID, mailbox_id(BOB.public_key))
    record = DirectoryRecord(
        ALICE.public_key,
        "Ålice 🕊",
        U64,
        NOW,
        NOW + 14 * 86400,
        SPK,
        (DEVICE, second),
        (ENTRY, other),
        ROTATION,
    )
    body = {
        "version": 1,
        "identity_key": record.identity_key,
        "name": record.name,
        "sequence": record.sequence,
        "issued_at": record.issued_at,
        "expires_at": record.expires_at,
        "signed_prekey": spk_fields(SPK),
        "devices": [device_fields(d) for d in record.devices],
        "mailboxes": [entry_fields(m) for m in record.mailboxes],
        "rotation": rotation_fields(ROTATION),
    }
    # Ed25519 is deterministic: the signature over the body protobuf writes
    # is ours only if protobuf writes the body our codec wrote.
    body_bytes = build(schema, "DirectoryRecordBody", body).SerializeToString(deterministic=True)
    expected = {
        "body": Encoded("DirectoryRecordBody", body),
        "signature": ALICE.sign(RECORD_CONTEXT + body_bytes),
    }
    return Sample(
        "SignedRecord",
        record.sign(ALICE),
        expected,
        lambda data: DirectoryRecord.verify(data, now=None),
        record,
    )


# One application message per content kind, and one of a kind from the future.
TEXT = "Hello, Pigeon! Привет 🕊"
RECEIPT_IDS = tuple(rng(f"receipt{i}")(16) for i in range(3))
TRANSFER_ID = rng("transfer")(16)
SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\na=fingerprint:sha-256 AB:CD\r\n"
FILE_URI = (
    "pigeon-file:?v=1&root=" + "ab" * 32 + "&size=5&chunk=131072&name=photo%20%F0%9F%90%A6.jpg"
)
FILE_KEY = rng("file key")(32)
FILE_SHA256 = rng("file sha256")(32)
FUTURE_BODY = b"\x08\x01 from a newer version"
CONTENTS: dict[str, tuple[Content, int, Encoded | bytes]] = {
    "text": (Text(TEXT), Kind.TEXT, Encoded("Text", {"text": TEXT})),
    "disappearing text": (
        Text(TEXT, 3600),
        Kind.TEXT,
        Encoded("Text", {"text": TEXT, "expires_in": 3600}),
    ),
    "timer": (Timer(604800), Kind.TIMER, Encoded("Timer", {"seconds": 604800})),
    "receipt": (
        Receipt(ReceiptType.READ, RECEIPT_IDS),
        Kind.RECEIPT,
        Encoded("Receipt", {"type": ReceiptType.READ, "message_ids": list(RECEIPT_IDS)}),
    ),
    "file offer": (
        FileOffer(TRANSFER_ID, FILE_URI, FILE_KEY, FILE_SHA256),
        Kind.FILE_OFFER,
        Encoded(
            "FileOffer",
            {
                "transfer_id": TRANSFER_ID,
                "uri": FILE_URI,
                "key": FILE_KEY,
                "sha256": FILE_SHA256,
            },
        ),
    ),
    "webrtc signal": (
        WebRTCSignal(TRANSFER_ID, SignalType.ANSWER, SDP),
        Kind.WEBRTC_SIGNAL,
        Encoded(
            "WebRTCSignal",
            {"transfer_id": TRANSFER_ID, "type": SignalType.ANSWER, "payload": SDP},
        ),
    ),
    "webrtc bye": (
        WebRTCSignal(TRANSFER_ID, SignalType.BYE, reason=ByeReason.FAILED, text="disk full 💾"),
        Kind.WEBRTC_SIGNAL,
        Encoded(
            "WebRTCSignal",
            {
                "transfer_id": TRANSFER_ID,
                "type": SignalType.BYE,
                "reason": ByeReason.FAILED,
                "text": "disk full 💾",
            },
        ),
    ),
    "session reset": (
        SessionReset(ResetReason.UNDECRYPTABLE, U32),
        Kind.SESSION_RESET,
        Encoded("SessionReset", {"reason": ResetReason.UNDECRYPTABLE, "failed": U32}),
    ),
    "mailbox token": (
        MailboxToken(TOKEN.encode()),
        Kind.MAILBOX_TOKEN,
        Encoded("MailboxToken", {"token": Encoded("DepositToken", token_fields(TOKEN))}),
    ),
    "introduction": (
        Introduction("Zoë 🐦"),
        Kind.INTRODUCTION,
        Encoded("Introduction", {"name": "Zoë 🐦"}),
    ),
    # An open enum in the schema: protobuf keeps a kind it does not know, as we do.
    "unknown kind": (Unknown(0xFFFF, FUTURE_BODY), 0xFFFF, FUTURE_BODY),
}


def app_message_sample(name: str) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        content, kind, body = CONTENTS[name]
        message = AppMessage.new(content, lamport=U64, sent_at_ms=NOW * 1000, random=rng(name))
        expected = {
            "kind": kind,
            "id": message.message_id,
            "lamport": message.lamport,
            "sent_at_ms": message.sent_at_ms,
            "body": body,
        }
        return codec_sample("AppMessage", message, expected)

    return make


for _name in CONTENTS:
    sample(f"AppMessage: {_name}")(app_message_sample(_name))


def proof(op: Op, nonce: bytes, items: tuple[bytes, ...] = ()) -> bytes:
    return MAILBOX_KEY.sign(proof_message(op, BOX, nonce, items))


NONCE = rng("nonce")(32)
ITEM_IDS = tuple(rng(f"item{i}")(16) for i in range(3))
PREKEYS = tuple(OneTimePrekey.create(BOB, i, rng(f"otk{i}"))[0] for i in (1, 2, 3))
# One request per operation, with the fields the node sends for it.
REQUESTS = {
    Op.REGISTER: Request(Op.REGISTER, public_key=MAILBOX_KEY.public_key, work=rng("work")(8)),
    Op.DEPOSIT: Request(Op.DEPOSIT, BOX, envelope=ENVELOPES[1], ttl_s=U32, token=TOKEN.encode()),
    Op.CHALLENGE: Request(Op.CHALLENGE, BOX),
    Op.FETCH: Request(
        Op.FETCH, BOX, nonce=NONCE, signature=proof(Op.FETCH, NONCE), limit=MAX_ITEMS
    ),
    Op.DELETE: Request(
        Op.DELETE,
        BOX,
        nonce=NONCE,
        signature=proof(Op.DELETE, NONCE, ITEM_IDS),
        item_ids=ITEM_IDS,
    ),
    Op.ADD_PREKEYS: Request(
        Op.ADD_PREKEYS,
        BOX,
        nonce=NONCE,
        signature=proof(Op.ADD_PREKEYS, NONCE, tuple(p.encode() for p in PREKEYS)),
        prekeys=tuple(p.encode() for p in PREKEYS),
    ),
    Op.TAKE_PREKEY: Request(Op.TAKE_PREKEY, BOX, work=rng("work2")(8), window=U32),
}


def request_sample(op: Op) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        r = REQUESTS[op]
        expected = {
            "op": r.op,
            "mailbox_id": r.mailbox_id,
            "envelope": r.envelope,
            "ttl_s": r.ttl_s,
            "public_key": r.public_key,
            "nonce": r.nonce,
            "signature": r.signature,
            "item_ids": list(r.item_ids),
            "limit": r.limit,
            "prekeys": [
                Encoded("OneTimePrekey", otk_fields(OneTimePrekey.decode(p))) for p in r.prekeys
            ],
            "token": (
                Encoded("DepositToken", token_fields(DepositToken.decode(r.token)))
                if r.token
                else b""
            ),
            "work": r.work,
            "window": r.window,
        }
        return codec_sample("MailboxRequest", r, expected)

    return make


for _op in Op:
    sample(f"MailboxRequest: {_op.name}")(request_sample(_op))


ITEMS = tuple(Item(ITEM_IDS[i], ENVELOPES[i], NOW + i) for i in range(3))
RESPONSES = {
    "REGISTER": Response(True, item_id=BOX),
    "DEPOSIT": Response(True, item_id=ITEM_IDS[0]),
    "CHALLENGE": Response(True, nonce=NONCE),
    "FETCH": Response(True, items=ITEMS, prekeys_left=U32, more=True),
    "DELETE": Response(True),
    "ADD_PREKEYS": Response(True, prekeys_left=100),
    "TAKE_PREKEY": Response(True, prekey=OTK.encode(), prekeys_left=99),
    "TAKE_PREKEY, none left": Response(True),
    "refused": Response(False, error="proof refused"),
}


def response_sample(name: str) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        r = RESPONSES[name]
        expected = {
            "status": 0 if r.ok else 1,
            "error": r.error,
            "nonce": r.nonce,
            "items": [
                {"id": i.item_id, "envelope": i.envelope, "deposited_at": i.deposited_at}
                for i in r.items
            ],
            "item_id": r.item_id,
            "prekey": Encoded("OneTimePrekey", otk_fields(OTK)) if r.prekey else b"",
            "prekeys_left": r.prekeys_left,
            "more": r.more,
        }
        # The codec writes the items after field 8 (pigeon.proto says so).
        return codec_sample("MailboxResponse", r, expected)

    return make


for _name in RESPONSES:
    sample(f"MailboxResponse: {_name}")(response_sample(_name))


@sample("Deliver")
def _(schema: Schema) -> Sample:
    return codec_sample("Deliver", Deliver(ENVELOPES), {"envelopes": list(ENVELOPES)})


STATUSES = (AckStatus.STORED, AckStatus.DUPLICATE, AckStatus.REFUSED)


@sample("Ack")
def _(schema: Schema) -> Sample:
    ack = Ack(tuple(AckEntry(digest(e), s) for e, s in zip(ENVELOPES, STATUSES, strict=True)))
    entries = [{"digest": e.digest, "status": e.status} for e in ack.entries]
    return codec_sample("Ack", ack, {"entries": entries})


@sample("AckEntry")
def _(schema: Schema) -> Sample:
    entry = AckEntry(digest(ENVELOPES[0]), AckStatus.REFUSED)
    return codec_sample("AckEntry", entry, {"digest": entry.digest, "status": entry.status})


@sample("Presence: online")
def _(schema: Schema) -> Sample:
    return codec_sample("Presence", Presence(True), {"online": True})


@sample("Presence: offline")
def _(schema: Schema) -> Sample:
    return codec_sample("Presence", Presence(False), {"online": False})


@sample("MailboxNotice")
def _(schema: Schema) -> Sample:
    return codec_sample("MailboxNotice", MailboxNotice(BOX), {"mailbox_id": BOX})


@sample("RecordRequest")
def _(schema: Schema) -> Sample:
    wanted = ALICE.identity_id
    return codec_sample(
        "RecordRequest", RecordRequest(wanted), {"identity_id": wanted, "prekey": False}
    )


@sample("RecordRequest: and a one-time prekey")
def _(schema: Schema) -> Sample:
    wanted = ALICE.identity_id
    return codec_sample(
        "RecordRequest", RecordRequest(wanted, True), {"identity_id": wanted, "prekey": True}
    )


@sample("RecordAnswer: a record")
def _(schema: Schema) -> Sample:
    record = b"\x0a\x01r" * 9  # opaque here: DirectoryRecord has samples of its own
    return codec_sample("RecordAnswer", RecordAnswer(record), {"record": record, "prekey": None})


@sample("RecordAnswer: a record and a one-time prekey")
def _(schema: Schema) -> Sample:
    record = b"\x0a\x01r" * 9
    prekey = b"\x08\x07" + b"p" * 100  # opaque here: OneTimePrekey has samples of its own
    return codec_sample(
        "RecordAnswer", RecordAnswer(record, prekey), {"record": record, "prekey": prekey}
    )


@sample("RecordAnswer: not this identity")
def _(schema: Schema) -> Sample:
    return codec_sample("RecordAnswer", RecordAnswer(None), {"record": None, "prekey": None})


@sample("DialbackRequest")
def _(schema: Schema) -> Sample:
    return codec_sample("DialbackRequest", DialbackRequest(65535), {"port": 65535})


@sample("DialbackAnswer: reached")
def _(schema: Schema) -> Sample:
    observed = "/ip6/2001:db8:ffff:ffff:ffff:ffff:ffff:ffff/tcp/65535"
    answer = DialbackAnswer(observed, True)
    return codec_sample("DialbackAnswer", answer, {"observed": observed, "reached": True})


@sample("DialbackAnswer: not reached")
def _(schema: Schema) -> Sample:
    answer = DialbackAnswer("/ip4/203.0.113.5/tcp/4001", False)
    expected = {"observed": "/ip4/203.0.113.5/tcp/4001", "reached": False}
    return codec_sample("DialbackAnswer", answer, expected)


# -- file transfer: the data-channel messages ------------------------------------

LEAVES = tuple(rng(f"leaf{i}")(32) for i in range(MAX_HASHES_PER_PAGE))
# One message of each protobuf-bodied type, with every field set and wide values.
TRANSFER_MESSAGES: dict[str, tuple[transfer_wire.Message, dict[str, Any]]] = {
    "TransferHello": (transfer_wire.Hello(TRANSFER_ID), {"transfer_id": TRANSFER_ID, "version": 1}),
    "TransferWantHashes": (
        transfer_wire.WantHashes(MAX_CHUNKS - MAX_HASHES_PER_PAGE, MAX_HASHES_PER_PAGE),
        {"start": MAX_CHUNKS - MAX_HASHES_PER_PAGE, "count": MAX_HASHES_PER_PAGE},
    ),
    "TransferHashes": (
        transfer_wire.Hashes(MAX_CHUNKS - len(LEAVES), LEAVES),
        {"start": MAX_CHUNKS - len(LEAVES), "hashes": b"".join(LEAVES)},
    ),
    "TransferWant": (
        transfer_wire.Want(MAX_CHUNKS - transfer_wire.MAX_WANT, transfer_wire.MAX_WANT),
        {"start": MAX_CHUNKS - transfer_wire.MAX_WANT, "count": transfer_wire.MAX_WANT},
    ),
    "TransferPing": (transfer_wire.Ping(U64), {"sequence": U64}),
    "TransferDone": (transfer_wire.Done(), {}),
    "TransferError": (
        transfer_wire.Error(transfer_wire.ErrorCode.FILE_CHANGED, "it changed ✂"),
        {"code": transfer_wire.ErrorCode.FILE_CHANGED, "text": "it changed ✂"},
    ),
}


def transfer_sample(name: str) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        message, expected = TRANSFER_MESSAGES[name]
        data = message.encode()
        kind = data[:1]  # the type byte before the protobuf body
        return Sample(
            name, data[1:], expected, lambda body: transfer_wire.decode(kind + body), message
        )

    return make


for _name in TRANSFER_MESSAGES:
    sample(_name)(transfer_sample(_name))


# -- sessions and ratchet states ----------------------------------------------


SPK_ID, OTK_ID = 7, 9


@dataclass
class Conversation:
    """Alice started a session with Bob (with or without a one-time prekey)."""

    alice: Session
    first: bytes  # Alice's first session message (a prekey message)
    bob: Session | None = None


def conversation(config: RatchetConfig, *, one_time: bool, seed: str) -> Conversation:
    random_ = rng(seed)
    spk_private, spk_public = x25519_keypair(random_)
    spk = SignedPrekey(SPK_ID, spk_public, NOW)
    otk, otk_private = OneTimePrekey.create(BOB, OTK_ID, random_)
    bundle = PrekeyBundle(BOB.public_key, spk, otk if one_time else None)
    alice = Session.initiate(ALICE, bundle, random_, config)
    first = alice.encrypt(b"first")
    talk = Conversation(alice, first)
    talk.bob, _ = Session.respond(
        BOB,
        IncomingMessage.decode(first),
        {SPK_ID: spk_private}.get,
        {OTK_ID: otk_private}.get,
        random_,
        config,
    )
    return talk


def answered(config: RatchetConfig, seed: str) -> Conversation:
    """Bob answered three times; Alice read only the last (two keys skipped),
    then sent again, so every counter and key of her state is set."""
    talk = conversation(config, one_time=True, seed=seed)
    assert talk.bob is not None
    replies = [talk.bob.encrypt(b"reply %d" % i) for i in range(3)]
    assert talk.alice.decrypt(IncomingMessage.decode(replies[2])) == b"reply 2"
    talk.alice.encrypt(b"again")
    return talk


def ratchet_fields(state: RatchetState) -> dict[str, Any]:
    return {
        "version": 1,
        "header_encryption": state.config.header_encryption,
        "dhs_private": state.dhs_private,
        "dhr": state.dhr,
        "rk": state.rk,
        "cks": state.cks,
        "ckr": state.ckr,
        "ns": state.ns,
        "nr": state.nr,
        "pn": state.pn,
        "hks": state.hks,
        "hkr": state.hkr,
        "nhks": state.nhks,
        "nhkr": state.nhkr,
        "skipped": [{"key_id": k, "n": n, "seed": s} for (k, n), s in state.skipped.items()],
    }


def prekey_message_sample(config: RatchetConfig, *, one_time: bool) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        talk = conversation(config, one_time=one_time, seed=f"prekey {one_time}")
        assert talk.first[0] == 1  # the session message kind byte, not protobuf
        incoming = IncomingMessage.decode(talk.first)
        expected = {
            "identity_key": ALICE.public_key,
            "base_key": talk.alice.base_key,
            "signed_prekey_id": SPK_ID,
            "one_time_prekey_id": OTK_ID if one_time else 0,
            "message": incoming.ratchet_message,
        }
        return Sample(
            "PrekeyMessage",
            talk.first[1:],
            expected,
            lambda data: IncomingMessage.decode(b"\x01" + data),
            incoming,
        )

    return make


sample("PrekeyMessage")(prekey_message_sample(PIGEON, one_time=True))
sample("PrekeyMessage: classic, no one-time prekey")(prekey_message_sample(CLASSIC, one_time=False))


def session_sample(*, pending: bool) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        if pending:
            session = conversation(PIGEON, one_time=True, seed="session").alice
        else:
            session = answered(PIGEON, "session").alice
        expected = {
            "version": 1,
            "local_key": ALICE.public_key,
            "remote_key": BOB.public_key,
            "ad": ALICE.public_key + BOB.public_key,  # X3DH's AD: initiator's key first
            "ratchet": ratchet_fields(session.ratchet),
            # Until Bob answers, Alice keeps the X3DH header she sends with every message.
            "pending": {
                "identity_key": ALICE.public_key,
                "base_key": session.base_key,
                "signed_prekey_id": SPK_ID,
                "one_time_prekey_id": OTK_ID,
            }
            if pending
            else None,
            "base_key": session.base_key,
        }
        data = session.serialize()
        return Sample(
            "SessionState",
            data,
            expected,
            lambda raw: Session.deserialize(raw, rng("load"), PIGEON).serialize(),
            data,
            # The codec writes the pending header after field 7 (pigeon.proto says so).
        )

    return make


sample("SessionState: pending")(session_sample(pending=True))
sample("SessionState: answered")(session_sample(pending=False))


def ratchet_sample(config: RatchetConfig) -> Callable[[Schema], Sample]:
    def make(schema: Schema) -> Sample:
        state = answered(config, f"ratchet {config.header_encryption}").alice.ratchet
        assert len(state.skipped) == 2
        data = state.serialize()
        return Sample(
            "RatchetState",
            data,
            ratchet_fields(state),
            lambda raw: RatchetState.deserialize(raw, config, rng("load")).serialize(),
            data,
        )

    return make


sample("RatchetState")(ratchet_sample(PIGEON))
sample("RatchetState: classic")(ratchet_sample(CLASSIC))


def logical_fingerprint(key: bytes, stable_id: bytes, iterations: int = 5200) -> bytes:
    """One side's half, as docs/protocol/keys.md (and libsignal) define it."""
    h = hashlib.sha512(b"\x00\x00" + key + stable_id + key).digest()
    for _ in range(iterations - 1):
        h = hashlib.sha512(h + key).digest()
    return h[:32]


@sample("CombinedFingerprints")
def _(schema: Schema) -> Sample:
    ours = scannable_fingerprint(
        ALICE.public_key, ALICE.identity_id, BOB.public_key, BOB.identity_id
    )
    theirs = scannable_fingerprint(
        BOB.public_key, BOB.identity_id, ALICE.public_key, ALICE.identity_id
    )
    expected = {
        "version": 1,
        "local": {"content": logical_fingerprint(ALICE.public_key, ALICE.identity_id)},
        "remote": {"content": logical_fingerprint(BOB.public_key, BOB.identity_id)},
    }
    return Sample(
        "CombinedFingerprints", ours, expected, lambda d: compare_scannable(d, theirs), True
    )


# -- the tests ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_protobuf_reads_what_the_codec_writes(schema: Schema, name):
    s = BUILDERS[name](schema)
    assert s.decode(s.data) == s.value  # the sample itself is sound
    check(schema, schema.parse(s.type, s.data), s.expected, s.type)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_the_codec_reads_what_protobuf_writes(schema: Schema, name):
    s = BUILDERS[name](schema)
    written = build(schema, s.type, s.expected).SerializeToString(deterministic=True)
    assert s.decode(written) == s.value
    assert written == s.data, "protobuf writes other bytes than our codec"


def test_device_certificate_signs_the_statement_in_the_schema(schema: Schema):
    # The statement is never sent, only signed: the certificate's signature
    # must be the one over the statement protobuf writes (Ed25519 is
    # deterministic), so the codec wrote these exact bytes.
    statement = build(
        schema,
        "DeviceCertificateStatement",
        {"identity_key": ALICE.public_key, "peer_id": CERT.peer_id, "issued_at": CERT.issued_at},
    ).SerializeToString(deterministic=True)
    assert ALICE.sign(DEVICE_CONTEXT + statement) == CERT.signature


def test_a_deposit_token_signs_the_statement_in_the_schema(schema: Schema):
    statement = build(
        schema,
        "DepositTokenStatement",
        {"mailbox_id": TOKEN.mailbox_id, "token_id": TOKEN.token_id, "expires_at": U64},
    ).SerializeToString(deterministic=True)
    assert MAILBOX_KEY.sign(b"pigeon/deposit-token/v1\x00" + statement) == TOKEN.signature


# Checked by the two tests above, with every field set: the codec writes
# these only under a signature.
SIGNED_ONLY = {
    "DeviceCertificateStatement": {"identity_key", "peer_id", "issued_at"},
    "DepositTokenStatement": {"mailbox_id", "token_id", "expires_at"},
}


def covered(schema: Schema, name: str, expected: dict[str, Any], seen: dict[str, set[str]]) -> None:
    descriptor = schema.descriptor(name)
    fields = seen.setdefault(name, set())
    for field_name, value in expected.items():
        if is_default(value):
            continue
        fields.add(field_name)
        field = descriptor.fields_by_name[field_name]
        for one in value if isinstance(value, list) else [value]:
            if isinstance(one, dict):
                covered(schema, field.message_type.name, one, seen)
            elif isinstance(one, Encoded):
                covered(schema, one.type, one.fields, seen)


def test_every_message_and_field_of_the_schema_is_checked(schema: Schema):
    # A field in the schema that no sample sets is one the codec may not
    # write at all (or write elsewhere): the schema would promise too much.
    seen: dict[str, set[str]] = {k: set(v) for k, v in SIGNED_ONLY.items()}
    for builder in BUILDERS.values():
        s = builder(schema)
        covered(schema, s.type, s.expected, seen)
    in_schema = {
        name: set(descriptor.fields_by_name)
        for name, descriptor in schema.file.message_types_by_name.items()
    }
    assert seen == in_schema


def test_the_schema_uses_only_wire_types_the_codec_reads(schema: Schema):
    # The codec reads varint and length-delimited fields only.
    allowed = {
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_ENUM,
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BYTES,
        FieldDescriptor.TYPE_MESSAGE,
    }
    for descriptor in schema.file.message_types_by_name.values():
        for field in descriptor.fields:
            assert field.type in allowed, f"{descriptor.name}.{field.name}"
            # A packed repeated scalar would be one length-delimited field.
            assert not field.is_repeated or field.type in {
                FieldDescriptor.TYPE_STRING,
                FieldDescriptor.TYPE_BYTES,
                FieldDescriptor.TYPE_MESSAGE,
            }, f"{descriptor.name}.{field.name}"


@pytest.mark.parametrize(
    ("enum", "codec"),
    [
        ("AppMessage.Kind", Kind),
        ("Receipt.Type", ReceiptType),
        ("WebRTCSignal.Type", SignalType),
        ("WebRTCSignal.Reason", ByeReason),
        ("TransferError.Code", transfer_wire.ErrorCode),
        ("SessionReset.Reason", ResetReason),
        ("MailboxRequest.Op", Op),
        ("AckEntry.Status", AckStatus),
    ],
)
def test_enums_are_the_codecs(schema: Schema, enum: str, codec: type[IntEnum]):
    descriptor = schema.pool.FindEnumTypeByName(f"{PACKAGE}.{enum}")
    # Values are prefixed with their enum's name (KIND_TEXT), as protobuf's style asks.
    prefix = descriptor.name.upper() + "_"
    values = {v.name.removeprefix(prefix): v.number for v in descriptor.values}
    # Proto3 needs a zero value; where the codec has none, it is never written.
    if 0 not in set(codec):
        assert values.pop("UNSPECIFIED", None) == 0
    assert values == {member.name: member.value for member in codec}
