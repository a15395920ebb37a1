"""End to end with real daemons (subprocesses, real py-libp2p hosts on
127.0.0.1, real SQLCipher databases)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import Daemon, pigeon, small_network, wait_for
from pigeon.node.control import Client

pytestmark = pytest.mark.slow


@pytest.fixture
def network(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    with small_network(tmp_path, ("alice", "bob")) as nodes:
        yield nodes


def befriend(a: Daemon, b: Daemon) -> None:
    a.cli("contacts", "add", b.id()["contact_code"], "--as", b.name)
    b.cli("contacts", "add", a.id()["contact_code"], "--as", a.name)


def texts(daemon: Daemon, direction: str) -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == direction]


def test_conversation_survives_restarts_without_loss_or_duplicates(network):
    alice, bob = network["alice"], network["bob"]
    befriend(alice, bob)

    alice.cli("send", "bob", "hello bob")
    wait_for(lambda: texts(bob, "in") == ["hello bob"])
    bob.cli("send", "alice", "hi alice")
    alice.cli("send", "bob", "how are you?")
    wait_for(lambda: texts(alice, "in") == ["hi alice"])
    wait_for(lambda: texts(bob, "in") == ["hello bob", "how are you?"])

    peer_ids = {d.name: d.id()["peer_id"] for d in (alice, bob)}
    port = int(alice.address.split("/tcp/")[1].split("/")[0])
    alice.stop()
    bob.stop()
    with socket.socket() as probe:  # the listener is really closed
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    alice.start()
    bob.start()
    assert {d.name: d.id()["peer_id"] for d in (alice, bob)} == peer_ids

    bob.cli("send", "alice", "after the restart")
    alice.cli("send", "bob", "still here")
    wait_for(lambda: texts(alice, "in") == ["hi alice", "after the restart"])
    wait_for(lambda: texts(bob, "in") == ["hello bob", "how are you?", "still here"])

    # every message once, statuses came back encrypted
    for daemon in (alice, bob):
        ids = [m["id"] for m in daemon.inbox()]
        assert len(ids) == len(set(ids)) == 5
    wait_for(
        lambda: all(m["status"] == "delivered" for m in alice.inbox() if m["direction"] == "out")
    )
    # reading sends a read receipt back
    reader = Client(bob.home)
    assert reader.request("read", contact="alice")["read"] == 3
    reader.close()
    wait_for(
        lambda: (
            [m["status"] for m in alice.inbox() if m["direction"] == "out"]
            == ["read", "read", "read"]
        )
    )
    message = next(m for m in bob.inbox() if m["text"] == "still here")
    assert message["from"] == alice.id()["identity_id"]
    assert message["from_name"] == "alice"
    assert {
        "id",
        "from",
        "from_name",
        "text",
        "sent_at",
        "received_at",
        "direction",
        "status",
    } <= set(message)


def test_both_start_the_conversation_at_once(network):
    alice, bob = network["alice"], network["bob"]
    befriend(alice, bob)
    import threading

    threads = [
        threading.Thread(target=alice.cli, args=("send", "bob", "first from alice")),
        threading.Thread(target=bob.cli, args=("send", "alice", "first from bob")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_for(lambda: texts(bob, "in") == ["first from alice"])
    wait_for(lambda: texts(alice, "in") == ["first from bob"])
    for i in range(3):
        alice.cli("send", "bob", f"a{i}")
        bob.cli("send", "alice", f"b{i}")
    wait_for(lambda: texts(bob, "in")[1:] == ["a0", "a1", "a2"])
    wait_for(lambda: texts(alice, "in")[1:] == ["b0", "b1", "b2"])


def test_contacts_list_shows_presence(network):
    alice, bob = network["alice"], network["bob"]
    befriend(alice, bob)
    alice.cli("send", "bob", "ping")
    wait_for(lambda: texts(bob, "in") == ["ping"])
    listing = [
        json.loads(line) for line in alice.cli("contacts", "list", "--json").stdout.splitlines()
    ]
    assert listing[0]["name"] == "bob" and listing[0]["online"] is True
    assert listing[0]["last_seen"] is not None
    # a node that opts out is never shown online, though messages flow
    carol = Daemon(bob.home.parent, "carol", [network["boot"].address], ["--no-presence"]).start()
    try:
        befriend(alice, carol)
        alice.cli("send", "carol", "are you there?")
        wait_for(lambda: texts(carol, "in") == ["are you there?"])
        carol.cli("send", "alice", "yes, quietly")
        wait_for(lambda: texts(alice, "in") == ["yes, quietly"])
        states = {
            c["name"]: c["online"]
            for c in map(json.loads, alice.cli("contacts", "list", "--json").stdout.splitlines())
        }
        assert states == {"bob": True, "carol": False}
    finally:
        carol.stop()
    bob.stop()
    wait_for(
        lambda: (
            not json.loads(alice.cli("contacts", "list", "--json").stdout.splitlines()[0])["online"]
        )
    )


def test_clear_errors(network, tmp_path):
    alice = network["alice"]
    result = alice.cli("send", "nobody", "hi", check=False)
    assert result.returncode != 0
    assert result.stderr.strip() == "pigeon: unknown contact 'nobody' (see: pigeon contacts list)"
    result = alice.cli("contacts", "add", "pigeon:not-a-code?name=x", check=False)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "contact code" in result.stderr
    result = pigeon(tmp_path / "nowhere", "status", check=False)
    assert result.returncode != 0
    assert "not running" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_kill_9_of_the_receiver_loses_no_acknowledged_message(network):
    from pigeon.node.control import Client

    alice, bob = network["alice"], network["bob"]
    befriend(alice, bob)
    client = Client(alice.home)
    total = 60
    for i in range(total):
        client.request("send", contact="bob", text=f"burst {i}")
        if i == 20:
            wait_for(lambda: sum(m["status"] != "pending" for m in alice.inbox()) >= 5, timeout=20)
            bob.kill9()
    client.close()
    acknowledged = {m["id"] for m in alice.inbox() if m["status"] != "pending"}
    assert len(acknowledged) >= 5
    bob.start()
    received = {m["id"] for m in bob.inbox() if m["direction"] == "in"}
    assert acknowledged <= received, "an acknowledged message was lost"
    # the rest arrive through retries, each exactly once and in order
    wait_for(lambda: len(texts(bob, "in")) == total, timeout=60)
    assert texts(bob, "in") == [f"burst {i}" for i in range(total)]


def test_a_reachable_contact_gives_its_record_itself(network):
    """Adding a contact whose node is up, and writing to it, takes no DHT
    lookup: its record comes from its own node, over one request, and the
    session's one-time prekey too."""
    alice, bob = network["alice"], network["bob"]
    befriend(alice, bob)
    alice.cli("send", "bob", "straight to you")
    wait_for(lambda: texts(bob, "in") == ["straight to you"])
    assert "with a one-time prekey (from its node)" in alice.log.read_text()
    for daemon in (alice, bob):
        client = Client(daemon.home)
        try:
            assert client.request("metrics")["dht_lookups_ms"] == [], daemon.name
        finally:
            client.close()
    # A lookup asked for (as `pigeon sim` asks) goes to the DHT all the same,
    # finds Bob's record there, and is counted.
    client = Client(alice.home)
    try:
        probe = client.request("lookup", contact="bob")
        assert probe["found"] is True and probe["ms"] > 0
        assert client.request("metrics")["dht_lookups_ms"] == [probe["ms"]]
    finally:
        client.close()
