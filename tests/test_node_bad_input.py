"""Garbage at every door of a running daemon: the envelope stream protocol,
the DHT, the transport security handshake and the control socket.  Each time
the daemon keeps running, logs one line, and still delivers real messages."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.records.validator import Validator
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.tools.anyio_service import background_trio_service

from daemons import PASSPHRASE, Daemon, wait_for
from pigeon.node.control import MAX_REQUEST
from pigeon.node.delivery import ENVELOPE_PROTOCOL
from pigeon.node.directory import RECORD_PROTOCOL
from pigeon.node.framing import frame, read_frame
from pigeon.node.host import build_host, close_host
from pigeon.node.storage import Database
from pigeon.protocol import (
    AppMessage,
    ContactCode,
    DirectoryRecord,
    IdentityKeyPair,
    Session,
    SignedPrekey,
    Text,
    seal,
)
from pigeon.protocol.frames import MAX_RECORD_ANSWER_FRAME, RecordAnswer, RecordRequest
from pigeon.protocol.wire import Fields, Writer, encode_varint

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    boot = Daemon(tmp_path, "boot").start()
    bob = Daemon(tmp_path, "bob", [boot.address]).start()
    try:
        yield boot, bob
    finally:
        for daemon in (bob, boot):
            if daemon.alive():
                daemon.stop()


def log_of(daemon: Daemon) -> str:
    return daemon.log.read_text()


def healthy(daemon: Daemon) -> bool:
    return daemon.alive() and daemon.cli("status").returncode == 0


def bob_bundle(bob: Daemon) -> tuple[bytes, SignedPrekey]:
    """Read Bob's public prekey from his database, as a directory lookup would give it."""
    db = Database.open(bob.home, PASSPHRASE)
    try:
        seed = db.get_meta("identity_seed")
        row = db.one("SELECT id, public, created_at FROM signed_prekeys ORDER BY id DESC")
    finally:
        db.close()
    assert seed is not None
    return IdentityKeyPair(seed).public_key, SignedPrekey(row[0], bytes(row[1]), row[2])


async def exchange(address: str, frames: list[bytes], read_acks: int) -> list[bytes]:
    host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
    acks = []
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [ENVELOPE_PROTOCOL])
            for data in frames:
                await stream.write(data)
            with trio.move_on_after(5):
                for _ in range(read_acks):
                    try:
                        header = await stream.read(1)
                        acks.append(await stream.read(header[0]))
                    except StreamEOF:
                        break  # the daemon closed the stream on garbage
        finally:
            await close_host(host)
    return acks


def test_garbage_on_the_envelope_protocol(pair):
    _, bob = pair
    me = IdentityKeyPair.generate(os.urandom)
    bob.cli("contacts", "add", ContactCode(me.public_key, "tester").to_uri())
    bob_key, spk = bob_bundle(bob)
    record = DirectoryRecord(bob_key, "bob", 1, int(time.time()), int(time.time()) + 60, spk)
    session = Session.initiate(me, record.bundle(), os.urandom)
    text = AppMessage.new(Text("made by hand"), lamport=1, sent_at_ms=0, random=os.urandom)
    good = seal(me, bob_key, session.encrypt(text.encode()), os.urandom)
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0x01
    stranger = IdentityKeyPair.generate(os.urandom)
    cases = {
        "random bytes": os.urandom(300),
        "oversized frame": encode_varint(50 * 1024 * 1024) + b"x" * 100,
        "not a deliver frame": frame(b"\xff\xff\xff"),
        "truncated envelope": frame(Writer().bytes_(1, good[:-40]).finish()),
        "tampered envelope": frame(Writer().bytes_(1, bytes(tampered)).finish()),
        "envelope from a stranger": frame(
            Writer().bytes_(1, seal(stranger, bob_key, b"hello", os.urandom)).finish()
        ),
    }
    address = bob.address
    for name, data in cases.items():
        before = log_of(bob).count("\n")
        trio.run(exchange, address, [data], 1)
        assert healthy(bob), name
        wait_for(
            lambda: any(
                "refused" in line or "bad envelope frame" in line
                for line in log_of(bob).splitlines()[before:]  # noqa: B023
            ),
            timeout=5,
        )
    # a real envelope is still accepted (and acknowledged as stored) afterwards
    acks = trio.run(exchange, address, [frame(Writer().bytes_(1, good).finish())], 1)
    assert Fields(acks[0]).uint(2) == 0
    assert any(m["text"] == "made by hand" for m in bob.inbox())


def test_a_plaintext_dialer_is_refused(pair):
    _, bob = pair
    address = bob.address

    async def dial() -> str:
        key_pair = create_new_key_pair(os.urandom(32))
        host = new_host(
            key_pair=key_pair,
            sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)},
            listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")],
        )
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                with trio.fail_after(15):
                    await host.connect(info_from_p2p_addr(multiaddr.Multiaddr(address)))
                    await host.new_stream(
                        info_from_p2p_addr(multiaddr.Multiaddr(address)).peer_id,
                        [ENVELOPE_PROTOCOL],
                    )
                return "connected"
            except Exception as error:
                return type(error).__name__
            finally:
                await close_host(host)

    outcome = trio.run(dial)
    assert outcome != "connected"
    assert healthy(bob)


class AcceptAnything(Validator):  # type: ignore[misc]
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return 0


def bob_identity(bob: Daemon) -> tuple[IdentityKeyPair, int]:
    db = Database.open(bob.home, PASSPHRASE)
    try:
        seed = db.get_meta("identity_seed")
        sequence = int(db.get_meta("record_sequence") or b"0")
    finally:
        db.close()
    assert seed is not None
    return IdentityKeyPair(seed), sequence


def test_forged_expired_and_older_records_are_refused(pair):
    boot, bob = pair
    bob_key, spk = bob_bundle(bob)
    real_bob, current = bob_identity(bob)
    assert current >= 1
    eve = IdentityKeyPair.generate(os.urandom)
    now = int(time.time())
    # Bob's key and a newer sequence, but Eve's signature
    genuine = DirectoryRecord(bob_key, "bob", 10**6, now, now + 600, spk).sign(real_bob)
    body = Fields(genuine).bytes_(1)
    forged = Writer().bytes_(1, body).bytes_(2, eve.sign(b"pigeon/record/v1\x00" + body)).finish()
    expired = DirectoryRecord(bob_key, "bob", 10**6, now - 7200, now - 3600, spk).sign(real_bob)
    older = DirectoryRecord(bob_key, "bob", 0, now, now + 600, spk).sign(real_bob)
    key = f"/pigeon/{bob.id()['identity_id']}"
    seen: list[int] = []

    async def attack() -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        dht = KadDHT(host, DHTMode.SERVER)
        dht.register_validator("pigeon", AcceptAnything())
        async with (
            host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]),
            background_trio_service(dht),
        ):
            try:
                peers = []
                for address in (boot.address, bob.address):
                    info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                    await host.connect(info)
                    await dht.add_peer(info.peer_id)
                    peers.append(info.peer_id)
                for value in (forged, b"\x00garbage", expired, older):
                    with trio.move_on_after(10):
                        await dht.put_value(key, value)
                for peer in peers:  # what the honest nodes now serve
                    record = await dht.value_store._get_from_peer(
                        peer, key.encode(), return_record=True
                    )
                    served = DirectoryRecord.verify(record.value, now=int(time.time()))
                    seen.append(served.sequence)
            finally:
                await close_host(host)

    trio.run(attack)
    assert healthy(bob) and healthy(boot)
    assert seen and all(sequence >= current for sequence in seen)
    assert "refused directory record" in log_of(bob) + log_of(boot)
    # the genuine record still wins: a new contact of Bob's can reach him
    alice = Daemon(bob.home.parent, "alice", [boot.address]).start()
    try:
        alice.cli("contacts", "add", bob.id()["contact_code"], "--as", "bob")
        bob.cli("contacts", "add", alice.id()["contact_code"], "--as", "alice")
        alice.cli("send", "bob", "through the noise")
        wait_for(lambda: any(m["text"] == "through the noise" for m in bob.inbox()))
    finally:
        alice.stop()


def test_junk_on_the_control_socket(pair):
    _, bob = pair
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(bob.home / "control.sock"))
        replies = []
        for junk in (
            b"\x00\xff\xfe not json\n",
            b"[1, 2]\n",
            b'{"cmd": "fly"}\n',
            b'{"cmd": "send"}\n',
        ):
            sock.sendall(junk)
            replies.append(json.loads(sock.makefile("rb").readline()))
        sock.sendall(b"x" * (MAX_REQUEST + 10))
        replies.append(json.loads(sock.makefile("rb").readline()))
    assert all(r["ok"] is False and "\n" not in r["error"] for r in replies)
    assert healthy(bob)
    assert "control client sent junk" in log_of(bob)


def test_garbage_on_the_presence_record_and_dht_protocols(pair):
    _, bob = pair
    address = bob.address

    async def send_garbage(protocol: str, data: bytes) -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(address))
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [TProtocol(protocol)])
                await stream.write(data)
                with trio.move_on_after(2):
                    with contextlib.suppress(StreamEOF):
                        await stream.read(100)
            finally:
                await close_host(host)

    protocols = ("/pigeon/presence/1.0.0", "/pigeon/record/1.0.0", "/pigeon/dialback/1.0.0")
    for protocol in (*protocols, "/ipfs/kad/1.0.0"):
        for data in (os.urandom(64), encode_varint(10**9) + b"x", b"\x05\x08\x01"):
            trio.run(send_garbage, protocol, data)
            assert healthy(bob), protocol
    wait_for(lambda: "bad presence frame" in log_of(bob), timeout=5)
    wait_for(lambda: "bad record frame" in log_of(bob), timeout=5)
    wait_for(lambda: "dial-back request refused" in log_of(bob), timeout=5)


def test_a_node_gives_its_record_only_to_whoever_names_its_identity(pair):
    _, bob = pair
    code = ContactCode.parse(bob.id()["contact_code"])

    async def ask(identity: bytes, prekey: bool = False) -> RecordAnswer:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(bob.address))
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [RECORD_PROTOCOL])
                await stream.write(frame(RecordRequest(identity, prekey).encode()))
                return RecordAnswer.decode(await read_frame(stream, MAX_RECORD_ANSWER_FRAME, 5))
            finally:
                await close_host(host)

    assert trio.run(ask, os.urandom(20)).record is None
    answer = trio.run(ask, code.identity_id)
    assert answer.record is not None
    record = DirectoryRecord.verify(
        answer.record, now=int(time.time()), identity_key=code.identity_key
    )
    assert bob.address.endswith(str(ID(record.devices[0].certificate.peer_id)))
    # a one-time prekey only for its contacts' devices: a stranger gets none
    answer = trio.run(ask, code.identity_id, True)
    assert answer.record is not None and answer.prekey is None


def test_a_silent_presence_or_notice_stream_is_said_to_be_late_not_bad(pair):
    """Under load, a peer's loop may not say its presence hello, or a
    mailbox its notice, within the 5 s given.  The log said "bad presence
    frame", as for hostile input: it now says the peer was late."""
    _, bob = pair

    async def say_nothing(protocol: str) -> None:
        host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(bob.address))
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [TProtocol(protocol)])
                with trio.move_on_after(7):
                    with contextlib.suppress(StreamEOF):
                        await stream.read(100)
            finally:
                await close_host(host)

    before = len(log_of(bob))
    trio.run(say_nothing, "/pigeon/presence/1.0.0")
    trio.run(say_nothing, "/pigeon/mailbox-notify/1.0.0")
    wait_for(lambda: "sent no presence hello in time" in log_of(bob)[before:], timeout=5)
    wait_for(lambda: "sent no mailbox notice in time" in log_of(bob)[before:], timeout=5)
    assert "bad presence frame" not in log_of(bob)[before:]
    assert "bad mailbox notice" not in log_of(bob)[before:]
    assert healthy(bob)
