"""``pigeon demo``: three real nodes on 127.0.0.1 in this process (a
bootstrap node, Alice and Bob), each with its own encrypted database in a
temporary directory, and a conversation between them.

Bob publishes his record and goes offline; Alice's messages wait in her
outbox; Bob comes back on a new port, Alice finds him through the DHT and
delivers; they reply with receipts; both compute the same safety number; all
nodes stop cleanly and the temporary directory is removed.
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


async def _demo(root: Path, out: Out) -> int:
    dbs = {name: _database(root, name) for name in ("boot", "alice", "bob")}
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
                alice_code, bob_code = alice.contact_code(), bob.contact_code()
                a_bob = alice.conversations.add_contact(ContactCode.parse(bob_code))
                b_alice = bob.conversations.add_contact(ContactCode.parse(alice_code))
                await bob.refresh_record(b_alice.identity_key)
                await alice.refresh_record(a_bob.identity_key)
                out("alice  and bob exchanged contact codes; records found in the DHT")
            out("bob    went offline")

            for text in ("Hi Bob, it's Alice.", "Are you there?", "Call me when you're back."):
                await alice.send_text(alice.conversations.contact(a_bob.identity_key), text)
                out(f"alice  -> bob: {text!r} (queued: bob is offline)")
            await trio.sleep(1)

            bob = Node(dbs["bob"], NodeConfig(bootstrap=bootstrap))
            async with bob.running():
                out(f"bob    is back online at a new address {bob.addresses[0]}")
                await _wait(lambda: len(_texts(bob, "in")) == 3)
                for text in _texts(bob, "in"):
                    out(f"bob    <- alice: {text!r}")
                for text in ("Back now. Safety number check?", "Matches mine. Talk soon!"):
                    await bob.send_text(bob.conversations.contact(b_alice.identity_key), text)
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

                a_id, b_id = alice.conversations.identity, bob.conversations.identity
                ours = safety_number(
                    a_id.public_key, a_id.identity_id, b_id.public_key, b_id.identity_id
                )
                theirs = safety_number(
                    b_id.public_key, b_id.identity_id, a_id.public_key, a_id.identity_id
                )
                out(f"alice  safety number {format_safety_number(ours)}")
                out(f"bob    safety number {format_safety_number(theirs)}")
    for db in dbs.values():
        db.close()
    if ours != theirs:
        out("safety numbers differ: something is wrong")
        return 1
    out("safety numbers match: no one sits in between")
    out("all nodes stopped")
    return 0


def run_demo(out: Out = print) -> int:
    logging.basicConfig(level=logging.CRITICAL)
    quiet_libp2p_logs()
    with tempfile.TemporaryDirectory(prefix="pigeon-demo-") as tmp:
        return trio.run(_demo, Path(tmp), out)
