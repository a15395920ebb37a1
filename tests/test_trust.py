"""Trust with real daemons (subprocesses on 127.0.0.1, real databases): QR
codes both ways, safety-number verification, message requests and blocking."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemons import Daemon, small_network, wait_for
from pigeon.protocol import safety_number
from pigeon.ui import qr

pytestmark = pytest.mark.slow


@pytest.fixture
def network(tmp_path: Path) -> Iterator[dict[str, Daemon]]:
    with small_network(tmp_path, ("alice", "bob", "carol")) as nodes:
        yield nodes


def contacts(daemon: Daemon) -> dict[str, dict[str, object]]:
    out = daemon.cli("contacts", "list", "--json").stdout
    return {c["label"]: c for c in map(json.loads, out.splitlines())}


def texts(daemon: Daemon, direction: str = "in") -> list[str]:
    return [m["text"] for m in daemon.inbox() if m["direction"] == direction]


def verify(daemon: Daemon, *args: str) -> dict[str, object]:
    return json.loads(daemon.cli("verify", *args, "--json").stdout)


def test_qr_round_trip_and_safety_numbers(network, tmp_path):
    alice, bob, carol = network["alice"], network["bob"], network["carol"]
    # Contact codes by QR picture, both ways.
    for me, other in ((alice, bob), (bob, alice), (alice, carol)):
        picture = tmp_path / f"{other.name}-code.png"
        other.cli("id", "--png", str(picture))
        added = me.cli("contacts", "add", str(picture)).stdout
        assert f"added {other.name} ({other.id()['identity_id']})" in added
    assert set(contacts(alice)) == {"bob", "carol"}

    # A damaged or unrelated picture: one clear line, nothing added.
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes((tmp_path / "bob-code.png").read_bytes()[:200])
    unrelated = tmp_path / "unrelated.png"
    qr.write_png("https://example.org/not-a-contact", unrelated)
    for picture, complaint in (
        (damaged, "is not an image file this can read"),
        (unrelated, "is not a Pigeon contact code"),
        (tmp_path / "missing.png", "no such file"),
    ):
        result = carol.cli("contacts", "add", str(picture), check=False)
        assert result.returncode == 1
        assert complaint in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert contacts(carol) == {}

    # Both sides compute the same 60 digits, and they are libsignal's function of the two keys.
    a_view, b_view = verify(alice, "bob"), verify(bob, "alice")
    number = a_view["safety_number"]
    assert isinstance(number, str) and len(number) == 60 and number.isdigit()
    assert b_view["safety_number"] == number
    a_id, b_id = alice.id(), bob.id()
    from pigeon.protocol import ContactCode

    a_key = ContactCode.parse(a_id["contact_code"]).identity_key
    b_key = ContactCode.parse(b_id["contact_code"]).identity_key
    assert number == safety_number(
        a_key, bytes.fromhex(a_id["identity_id"]), b_key, bytes.fromhex(b_id["identity_id"])
    )
    assert a_view["verified"] is False and a_view["identity_id"] == b_id["identity_id"]
    shown = alice.cli("verify", "bob").stdout
    assert " ".join(number[i : i + 5] for i in range(0, 20, 5)) in shown  # groups of five

    # Scanning the other's code marks both verified; a different identity's code does not match.
    for me, other in ((alice, bob), (bob, alice)):
        picture = tmp_path / f"{other.name}-verify.png"
        other.cli("verify", me.name, "--png", str(picture))
        assert verify(me, other.name, "--scan", str(picture))["verified"] is True
    carols = tmp_path / "carol-verify.png"
    carol.cli("contacts", "add", alice.id()["contact_code"])
    carol.cli("verify", "alice", "--png", str(carols))
    bob.cli("contacts", "add", carol.id()["contact_code"])
    result = bob.cli("verify", "carol", "--scan", str(carols), check=False)
    assert result.returncode == 1 and "does NOT match" in result.stderr
    assert contacts(bob)["carol"]["verified"] is False
    # A contact code is not a safety-number code.
    result = bob.cli("verify", "carol", "--scan", str(tmp_path / "alice-code.png"), check=False)
    assert result.returncode == 1 and "is a contact code, not a safety-number code" in result.stderr
    result = bob.cli("verify", "carol", "--scan", str(unrelated), check=False)
    assert result.returncode == 1 and "not a Pigeon safety-number code" in result.stderr
    # Read aloud instead: --accept.
    assert verify(bob, "carol", "--accept")["verified"] is True

    # Verified survives a restart, and shows in the list.
    bob.stop()
    bob.start()
    listed = contacts(bob)
    assert listed["alice"]["verified"] is True and listed["carol"]["verified"] is True
    assert "verified" in bob.cli("contacts", "list").stdout


def test_a_stranger_s_message_is_a_request_until_accepted_and_a_block_stops_it(network):
    alice, bob, carol = network["alice"], network["bob"], network["carol"]
    # Alice writes to Bob, who has not added her.
    alice.cli("contacts", "add", bob.id()["contact_code"])
    alice.cli("send", "bob", "hi bob, it's alice from the conference")

    def requests(daemon: Daemon) -> list[dict[str, object]]:
        out = daemon.cli("requests", "--json").stdout
        return [json.loads(line) for line in out.splitlines()]

    (request,) = wait_for(lambda: requests(bob))
    assert request["name"] == "alice" and request["identity_id"] == alice.id()["identity_id"]
    assert [m["text"] for m in request["messages"]] == ["hi bob, it's alice from the conference"]
    assert texts(bob) == [] and contacts(bob) == {}
    listing = bob.cli("requests").stdout
    assert "says they are alice" in listing and "from the conference" in listing
    # Her node stored-and-acked: sent, never delivered while he has not accepted.
    wait_for(lambda: [m["status"] for m in alice.inbox()] == ["sent"])

    shown = bob.cli("requests", "accept", str(request["identity_id"])[:10]).stdout
    assert "added alice" in shown and "from the conference" in shown
    assert requests(bob) == [] and "alice" in contacts(bob)
    wait_for(lambda: [m["status"] for m in alice.inbox()] == ["delivered"])
    bob.cli("send", "alice", "hello alice!")
    wait_for(lambda: texts(alice) == ["hello alice!"])
    alice.cli("send", "bob", "great")
    wait_for(lambda: texts(bob) == ["hi bob, it's alice from the conference", "great"])

    # Carol writes, Bob blocks her: her request goes and nothing after it arrives.
    carol.cli("contacts", "add", bob.id()["contact_code"])
    carol.cli("send", "bob", "buy my stuff")
    (spam,) = wait_for(lambda: requests(bob))
    blocked = bob.cli("block", str(spam["identity_id"])[:8]).stdout
    assert "blocked" in blocked
    assert requests(bob) == []
    carol.cli("send", "bob", "hello??")
    wait_for(lambda: [m["status"] for m in carol.inbox()][-1:] == ["failed"])
    assert requests(bob) == [] and contacts(bob).keys() == {"alice"}
    assert f"blocked: {str(spam['identity_id'])[:16]}" in bob.cli("requests").stdout
    bob.cli("unblock", str(spam["identity_id"])[:8])
    assert "blocked:" not in bob.cli("requests").stdout


def test_rotation_raises_the_alert_holds_everything_until_accepted_then_goes_on(network):
    alice, bob = network["alice"], network["bob"]
    alice.cli("contacts", "add", bob.id()["contact_code"])
    bob.cli("contacts", "add", alice.id()["contact_code"])
    old_id = alice.id()["identity_id"]
    alice.cli("send", "bob", "before the move")
    wait_for(lambda: texts(bob) == ["before the move"])
    bob.cli("verify", "alice", "--accept")

    # Rotating needs the daemon stopped: one clear line otherwise.
    refused = alice.cli("identity", "rotate", check=False)
    assert refused.returncode != 0 and "stop the daemon first" in refused.stderr
    alice.stop()
    rotated = alice.cli("identity", "rotate").stdout
    assert f"moved from identity {old_id}" in rotated
    alice.start()
    new_id = alice.id()["identity_id"]
    assert new_id != old_id
    alice.cli("send", "bob", "I moved to a new key")

    # Bob's node learns it from the old key's signed record: a loud alert, not verified.
    change = wait_for(lambda: contacts(bob)["alice"]["key_change"], timeout=60)
    assert change == {"identity_id": new_id, "signed": True}
    assert contacts(bob)["alice"]["verified"] is False
    assert "!! KEY CHANGE: alice moved to a new identity" in bob.cli("contacts", "list").stdout
    # Her new identity's message waits as a request that names the contact it moved from.
    out = bob.cli("requests", "--json").stdout
    (request,) = wait_for(
        lambda: [json.loads(x) for x in bob.cli("requests", "--json").stdout.splitlines()]
    )
    assert request["identity_id"] == new_id and request["moved_from"] == "alice", out
    # While the move is not accepted, nothing goes to either identity.
    bob.cli("send", "alice", "is that you?")
    time.sleep(3)
    assert "is that you?" not in texts(alice)
    (waiting,) = [m for m in bob.inbox() if m["text"] == "is that you?"]
    assert waiting["status"] == "pending" and "accept-key" in waiting["reason"]
    # The new key's safety number is what verify shows now.
    assert verify(bob, "alice")["identity_id"] == new_id

    accepted = bob.cli("contacts", "accept-key", "alice").stdout
    assert f"alice is now identity {new_id}" in accepted
    assert contacts(bob)["alice"]["key_change"] is None
    assert contacts(bob)["alice"]["identity_id"] == new_id
    wait_for(lambda: "is that you?" in texts(alice), timeout=60)
    wait_for(lambda: texts(bob) == ["before the move", "I moved to a new key"])
    alice.cli("send", "bob", "yes, it is me")
    wait_for(lambda: texts(bob)[-1:] == ["yes, it is me"], timeout=60)
    wait_for(lambda: {m["status"] for m in bob.inbox() if m["direction"] == "out"} == {"delivered"})
