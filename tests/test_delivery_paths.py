"""Which way a message goes when its contact is away, and what that costs,
over real py-libp2p hosts, real mailboxes and real SQLCipher databases."""

from __future__ import annotations

from pathlib import Path

import trio
from test_routing import _dht_node, _run_node

from pigeon.protocol import ContactCode


def test_a_message_to_an_away_contact_goes_to_its_mailboxes_without_a_dht_lookup(
    tmp_path: Path,
) -> None:
    """Holding a current record of the contact that lists its mailboxes, a
    sender whose direct delivery fails deposits at once.  It looked the
    record up in the DHT first (10 s and some 30 requests on a busy
    network, for the record it already held): in a 100-node simulation
    under churn, those lookups were most of the event loop's work."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stops = {name: trio.Event() for name in ("box", "alice", "bob")}
            bob_ended = trio.Event()
            box = _dht_node(tmp_path, "box", None, serve_mailbox=True)
            await nursery.start(_run_node, box, stops["box"], trio.Event())
            alice = _dht_node(tmp_path, "alice", box)
            await nursery.start(_run_node, alice, stops["alice"], trio.Event())
            bob = _dht_node(tmp_path, "bob", box, mailbox_count=1, mailbox_interval=1.0)
            await nursery.start(_run_node, bob, stops["bob"], bob_ended)
            with trio.fail_after(90):
                while not bob.owner.my_mailboxes():
                    await trio.sleep(0.2)
                await alice.add_contact(ContactCode.parse(bob.contact_code()), None)
                await bob.add_contact(ContactCode.parse(alice.contact_code()), None)
                bob_key = bob.conversations.identity.public_key
                while not (alice.contacts.get(bob_key).record or None) or not (
                    alice.contacts.get(bob_key).record.mailboxes  # type: ignore[union-attr]
                ):
                    await alice.directory.refresh(bob_key)
                    await trio.sleep(0.5)
                stops["bob"].set()
                await bob_ended.wait()
                lookups = len(alice.directory.lookup_ms)
                alice.conversations.send_text(bob_key, "while you are away")
                alice.courier.wake(bob_key, now=True)
                while [m for m in alice.conversations.inbox() if m["status"] not in ("sent",)]:
                    await trio.sleep(0.2)
            assert len(alice.directory.lookup_ms) == lookups
            for stop in stops.values():
                stop.set()

    trio.run(main)
