"""A session with a contact whose node is up starts with a one-time prekey
from that node itself (no mailbox, no proof of work), over real py-libp2p
hosts and real SQLCipher databases.  Contacts' devices only, and a bounded
number each: a stranger pays a mailbox with work instead."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio
from test_routing import dht_nodes

from pigeon.node.node import DIRECT_PREKEYS, Node
from pigeon.protocol import ContactCode
from pigeon.protocol.records import MailboxEntry


def key_of(node: Node) -> bytes:
    return node.conversations.identity.public_key


async def befriend(a: Node, b: Node) -> None:
    await a.add_contact(ContactCode.parse(b.contact_code()), None)


def test_a_contact_s_node_gives_its_contacts_one_time_prekeys_a_few_each(tmp_path: Path) -> None:
    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            alice = await start("alice", None)
            bob = await start("bob", alice)
            carol = await start("carol", alice)
            with trio.fail_after(60):
                await befriend(alice, bob)
                await befriend(bob, alice)
                await befriend(carol, bob)  # Bob has not added Carol
                bob_key = key_of(bob)
                given = [await alice.directory.ask_prekey(bob_key) for _ in range(DIRECT_PREKEYS)]
                # one more than the bound: none, until a session uses one up
                assert await alice.directory.ask_prekey(bob_key) is None
                assert await carol.directory.ask_prekey(bob_key) is None
            assert carol.contacts.get(bob_key).record is not None  # the record all the same
            ids = set()
            for prekey in given:
                assert prekey is not None
                prekey.verify(bob_key)
                # Bob keeps its private half, to answer the session it starts
                assert bob.conversations.prekeys.one_time_private(prekey.prekey_id) is not None
                ids.add(prekey.prekey_id)
            assert len(ids) == DIRECT_PREKEYS

    trio.run(main)


def test_the_first_message_to_a_contact_that_is_up_uses_a_prekey_from_its_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pigeon")

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            alice = await start("alice", None)
            bob = await start("bob", alice)  # neither has a mailbox
            with trio.fail_after(60):
                await befriend(alice, bob)
                await befriend(bob, alice)
                bob_key = key_of(bob)
                before = bob.conversations.db.all("SELECT id FROM one_time_prekeys")
                alice.conversations.send_text(bob_key, "hello")
                alice.courier.wake(bob_key, now=True)
                while not [m for m in bob.conversations.inbox() if m["direction"] == "in"]:
                    await trio.sleep(0.1)
            # the prekey Bob made for Alice is gone again: used, once
            assert bob.conversations.db.all("SELECT id FROM one_time_prekeys") == before

    trio.run(main)
    assert "with a one-time prekey (from its node)" in caplog.text


def test_taking_a_prekey_from_mailboxes_proves_work_once_for_all_of_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The contact's mailboxes share its mailbox ID, so one proof pays at each:
    three unreachable mailboxes cost one proof, not three."""
    from types import SimpleNamespace

    from pigeon.node import mailbox

    proofs: list[bytes] = []
    asked: list[bytes] = []

    async def prove(op: object, box: bytes, subject: bytes, bits: int, start: int) -> bytes:
        proofs.append(box)
        return b"nonce"

    async def call(host: object, info: object, requests: list[Any]) -> list[Any]:
        asked.append(requests[0].work)
        raise OSError("unreachable")

    monkeypatch.setattr(mailbox, "prove", prove)
    monkeypatch.setattr(mailbox, "call", call)
    peer = b"\x00\x24" + b"m" * 36
    entries = [MailboxEntry(peer[:-1] + bytes([i]), b"b" * 16) for i in range(3)]
    record = SimpleNamespace(mailboxes=entries, identity_key=b"k" * 32)
    taken = trio.run(mailbox.take_prekey, None, record, b"", lambda: 1_800_000_000.0)
    assert taken is None
    assert proofs == [b"b" * 16]
    assert asked == [b"nonce"] * 3


def test_a_prekey_not_signed_by_the_contact_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A node that answers with a one-time prekey its identity did not sign
    (a bug, or a device that is not what it claims) gives the asker nothing
    to start a session with: the asker falls back to the mailboxes."""
    import os

    from pigeon.protocol import IdentityKeyPair
    from pigeon.protocol.records import OneTimePrekey

    caplog.set_level(logging.WARNING, logger="pigeon")

    async def main() -> None:
        async with dht_nodes(tmp_path) as start:
            alice = await start("alice", None)
            bob = await start("bob", alice)
            with trio.fail_after(60):
                await befriend(alice, bob)
                await befriend(bob, alice)
                stranger = IdentityKeyPair(os.urandom(32))
                forged, _ = OneTimePrekey.create(stranger, 7, os.urandom)
                bob.directory.give_prekey = lambda peer: forged
                assert await alice.directory.ask_prekey(key_of(bob)) is None
            assert alice.contacts.get(key_of(bob)).record is not None  # the record still kept

    trio.run(main)
    assert "refused what" in caplog.text


def test_an_offline_contact_is_dialled_once_when_a_session_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting a session asks the contact's node for a prekey, dialling it;
    when that fails and the record held is not current, the refresh that
    follows dialled the same addresses again before the DHT (up to 5 s more
    where a dial times out rather than being refused)."""
    from test_routing import _dht_node, _run_node

    from pigeon.node import contacts

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stop_alice, stop_bob, bob_ended = trio.Event(), trio.Event(), trio.Event()
            alice = _dht_node(tmp_path, "alice", None)
            await nursery.start(_run_node, alice, stop_alice, trio.Event())
            bob = _dht_node(tmp_path, "bob", alice)
            await nursery.start(_run_node, bob, stop_bob, bob_ended)
            with trio.fail_after(60):
                await befriend(alice, bob)
                await befriend(bob, alice)
                bob_peer, bob_key = bob.host.get_id(), key_of(bob)
                stop_bob.set()
                await bob_ended.wait()
                while alice.host.get_network().get_connections(bob_peer):
                    await trio.sleep(0.1)
                monkeypatch.setattr(contacts, "RECORD_REFRESH_AGE", -1)  # none is current
                dials: list[object] = []
                connect = alice.host.connect

                async def counted(info: Any) -> None:
                    if info.peer_id == bob_peer:
                        dials.append(info)
                    await connect(info)

                alice.host.connect = counted  # type: ignore[method-assign]
                alice.conversations.send_text(bob_key, "while you are away")
                await alice.courier._encrypt(bob_key)
            assert len(dials) == 1
            assert alice.directory.lookup_ms  # the DHT was asked instead
            stop_alice.set()

    trio.run(main)
