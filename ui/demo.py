"""``pigeon demo``: three real nodes on 127.0.0.1 in this process (a
bootstrap node, Alice and Bob), each with its own encrypted database in a
temporary directory, and a conversation between them.

Alice and Bob exchange contact codes and compare safety numbers, each
computed from the key it *received*, as people do; Bob goes offline; Alice's
messages wait in her outbox; Bob comes back on a new port, Alice finds him
through the DHT and delivers; they reply with receipts; all nodes stop
cleanly and the temporary directory is removed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import trio

from pigeon.node.conversations import Conversations
from pigeon.node.host import quiet_libp2p_logs
from pigeon.node.node import Node, NodeConfig
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode, format_safety_number, safety_number

Out = Callable[[str], None]
# How a contact code reaches the other person (a chat, a QR code, a letter):
# the demo hands it over unchanged; a test may put someone in between.
Channel = Callable[[str], str]


def _database(root: Path, name: str) -> Database:
    db = Database.create(root / name, "demo passphrase", fast_kdf=True)
    Conversations.initialise(db, name, os.urandom)
    return db


async def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.05)


def _texts(node: Node, direction: str) -> list[str]:
    return [str(m["text"]) for m in node.conversations.inbox() if m["direction"] == direction]


def _safety_number(node: Node, their_key: bytes) -> str:
    """The number ``node`` shows for a contact: its own key and the one it holds for them."""
    me = node.conversations.identity
    received = node.contacts.get(their_key)
    return safety_number(
        me.public_key, me.identity_id, received.identity_key, bytes.fromhex(received.identity_id)
    )


async def _demo(root: Path, out: Out, channel: Channel) -> int:
    dbs = {name: _database(root, name) for name in ("boot", "alice", "bob")}
    try:
        return await _conversation(dbs, out, channel)
    finally:
        for db in dbs.values():
            db.close()


async def _conversation(dbs: dict[str, Database], out: Out, channel: Channel) -> int:
    boot = Node(dbs["boot"], NodeConfig())
    async with boot.running():
        bootstrap = [boot.addresses[0]]
        out(f"boot   node up at {bootstrap[0]}")
        alice = Node(dbs["alice"], NodeConfig(bootstrap=bootstrap))
        async with alice.running():
            bob = Node(dbs["bob"], NodeConfig(bootstrap=bootstrap))
            async with bob.running():
                for node in (alice, bob):
                    ident = node.conversations.identity.identity_id.hex()
                    out(f"{node.conversations.name:6} node up, identity {ident}")
                a_bob, _ = await alice.add_contact(
                    ContactCode.parse(channel(bob.contact_code())), None
                )
                b_alice, _ = await bob.add_contact(
                    ContactCode.parse(channel(alice.contact_code())), None
                )
                out("alice  and bob exchanged contact codes")
                ours = _safety_number(alice, a_bob.identity_key)
                theirs = _safety_number(bob, b_alice.identity_key)
                out(f"alice  safety number {format_safety_number(ours)}")
                out(f"bob    safety number {format_safety_number(theirs)}")
                if ours != theirs:
                    out("safety numbers differ: someone sits in between; stopping")
                    return 1
                out("safety numbers match: no one sits in between")
            out("bob    went offline")

            for text in ("Hi Bob, it's Alice.", "Are you there?", "Call me when you're back."):
                alice.send_text(a_bob, text)
                out(f"alice  -> bob: {text!r} (queued: bob is offline)")
            await trio.sleep(1)

            bob = Node(dbs["bob"], NodeConfig(bootstrap=bootstrap))
            async with bob.running():
                out(f"bob    is back online at a new address {bob.addresses[0]}")
                await _wait(lambda: len(_texts(bob, "in")) == 3)
                for text in _texts(bob, "in"):
                    out(f"bob    <- alice: {text!r}")
                for text in ("Back now.", "Talk soon!"):
                    bob.send_text(b_alice, text)
                await _wait(lambda: len(_texts(alice, "in")) == 2)
                for text in _texts(alice, "in"):
                    out(f"alice  <- bob: {text!r}")
                await _wait(
                    lambda: all(
                        m["status"] == "delivered"
                        for m in alice.conversations.inbox()
                        if m["direction"] == "out"
                    )
                )
                out("alice  sees all three of her messages as delivered")
    out("all nodes stopped")
    return 0


def run_demo(out: Out = print, channel: Channel = lambda code: code) -> int:
    logging.basicConfig(level=logging.CRITICAL)
    quiet_libp2p_logs()
    with tempfile.TemporaryDirectory(prefix="pigeon-demo-") as tmp:
        return trio.run(_demo, Path(tmp), out, channel)
