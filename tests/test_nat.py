"""Daemons behind real NATs (iptables masquerade in network namespaces the
tests create; tests/netns.py): what they tell others and whether they know
they are reachable."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netns import NatNetwork, needs_nat

from daemons import FAST, Daemon, contact, incoming, introduce, relayed, status, wait_for

pytestmark = [needs_nat, pytest.mark.slow]


def test_status_says_public_or_behind_nat_and_why(tmp_path: Path) -> None:
    with NatNetwork({"home": "cone"}) as net:
        boot = Daemon(tmp_path, "boot", prefix=net.public).start()
        daemons = [boot]
        try:
            address = boot.address
            assert address.startswith(f"/ip4/{net.PUBLIC_IP}/tcp/")
            carol = Daemon(tmp_path, "carol", [address], prefix=net.public).start()
            daemons.append(carol)
            alice = Daemon(tmp_path, "alice", [address], prefix=net.home("home")).start()
            daemons.append(alice)
            # What alice tells others: her own address in her home, nothing of loopback.
            told = [a.split("/p2p/")[0] for a in alice.id()["addresses"]]
            assert [a.rsplit("/", 1)[0] for a in told] == [f"/ip4/{net.lan['home']}/tcp"]
            behind = wait_for(
                lambda: (s := status(alice))["reachability"] != "unknown" and s, timeout=40
            )
            assert behind["reachability"] == "behind NAT"
            assert f"peers see us at {net.wan['home']}" in behind["reachability_why"]
            assert "not an address of this machine" in behind["reachability_why"]
            public = wait_for(
                lambda: (s := status(carol))["reachability"] != "unknown" and s, timeout=40
            )
            assert public["reachability"] == "public"
            assert f"connected back to {net.PUBLIC_IP}" in public["reachability_why"]
        finally:
            for daemon in reversed(daemons):
                daemon.stop()


@contextlib.contextmanager
def people_behind_nats(
    tmp_path: Path, alice_nat: str, bob_nat: str, extra: tuple[str, ...] = ()
) -> Iterator[tuple[NatNetwork, Daemon, Daemon]]:
    """A public node that relays and keeps mailboxes; Alice and Bob behind
    routers of the kinds given, each holding a relay slot, each in the
    other's contacts.  ``extra``: options for Alice's and Bob's daemons."""
    with NatNetwork({"a": alice_nat, "b": bob_nat}) as net:
        boot = Daemon(tmp_path, "boot", prefix=net.public, extra=["--relay", "--mailbox"])
        daemons = [boot.start()]
        try:
            for name, home in (("alice", "a"), ("bob", "b")):
                person = Daemon(tmp_path, name, [boot.address], [*extra], net.home(home))
                daemons.append(person.start())
            alice, bob = daemons[1:]
            wait_for(lambda: relayed(alice) and relayed(bob), timeout=60)
            introduce(alice, bob)
            yield net, alice, bob
        finally:
            for daemon in reversed(daemons):
                daemon.stop()


def chat_both_ways(alice: Daemon, bob: Daemon) -> None:
    """A message each way, each arriving straight from the other (not from a mailbox)."""
    for sender, receiver, text in ((alice, bob, "hello"), (bob, alice, "and back")):
        sender.cli("send", receiver.name, text)
        (got,) = wait_for(lambda r=receiver: incoming(r), timeout=60)
        assert got["text"] == text and got["via"] != "mailbox"


def test_two_people_behind_nats_chat_through_a_relay_then_directly(tmp_path: Path) -> None:
    """Alice and Bob, each behind a home router, reserve slots at the public
    relay and tell their relayed addresses; their messages arrive straight
    from each other (never only through a mailbox), and the relayed
    connection is upgraded to a direct one by a hole punch."""
    with people_behind_nats(tmp_path, "cone", "cone") as (_, alice, bob):
        chat_both_ways(alice, bob)
        wait_for(lambda: contact(alice, "bob")["connection"] == "direct", timeout=30)
        assert status(alice)["contacts_connected"] == {"bob": "direct"}


def test_behind_a_symmetric_nat_the_relay_carries_the_conversation(tmp_path: Path) -> None:
    """Bob's router picks a new port for every connection, so no hole punch
    can work: the messages still arrive straight from each other, through
    the relay, and the connection says so."""
    with people_behind_nats(tmp_path, "cone", "symmetric") as (_, alice, bob):
        chat_both_ways(alice, bob)
        time.sleep(8)  # time for the hole punches to have failed (one every 2 s, 3 at most)
        assert contact(alice, "bob")["connection"] == "relayed"
        assert status(bob)["contacts_connected"] == {"alice": "relayed"}


TURN_USER, TURN_PASSWORD = "pigeon", "not-a-secret"


@pytest.mark.skipif(shutil.which("turnserver") is None, reason="needs coturn (.ci/run installs it)")
def test_a_file_between_two_symmetric_nats_goes_through_turn(tmp_path: Path) -> None:
    """No direct path exists between two routers that pick a new port for
    every connection, for UDP too: the WebRTC transfer finds none, and the
    5 MB arrive whole through the TURN server (coturn, in "the internet")."""
    turn_log = tmp_path / "turnserver.log"
    server = NatNetwork.PUBLIC_IP
    ice = ("--ice-server", f"turn:{TURN_USER}:{TURN_PASSWORD}@{server}:3478")
    with (
        people_behind_nats(tmp_path, "symmetric", "symmetric", ice) as (net, alice, bob),
        turn_log.open("wb") as log,
    ):
        turn = subprocess.Popen(
            [*net.public, "turnserver", "-n", "--listening-ip", server, "--relay-ip", server,
             "--listening-port", "3478", "--min-port", "49152", "--max-port", "49252",
             "--lt-cred-mech", "--user", f"{TURN_USER}:{TURN_PASSWORD}", "--realm", "pigeon.test",
             "--no-tls", "--no-dtls", "--no-cli", "--fingerprint", "--simple-log",
             "--log-file", "stdout", "--verbose"],  # verbose: it logs each session's usage
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            source = tmp_path / "five.bin"
            source.write_bytes(os.urandom(5_000_000))
            transfer = alice.cli("send-file", "bob", str(source), "--no-wait").stdout.strip()
            wait_for(lambda: any(f["id"] == transfer for f in files(bob)), timeout=60)
            bob.cli("accept", transfer, "--to", str(tmp_path / "got"))
            (done,) = [f for f in files(bob) if f["id"] == transfer]
            assert done["state"] == "done"
            assert Path(str(done["path"])).read_bytes() == source.read_bytes()

            # It went through the TURN server: its allocations, closed with
            # the connection, carried at least the file.
            def relayed_bytes() -> int:
                usage = re.findall(r"peer usage: .*?rb=(\d+)", turn_log.read_text())
                return sum(map(int, usage))

            wait_for(lambda: relayed_bytes() >= 5_000_000, timeout=60)
        finally:
            turn.terminate()
            turn.wait(timeout=10)


def files(daemon: Daemon) -> list[dict[str, object]]:
    return [json.loads(line) for line in daemon.cli("files", "--json").stdout.splitlines()]


def relays_of(daemon: Daemon) -> set[str]:
    """The relays a daemon tells others it can be reached through."""
    return {a.split("/p2p-circuit")[0].rsplit("/p2p/", 1)[1] for a in daemon.id()["addresses"]
            if "/p2p-circuit/" in a}  # fmt: skip


def test_relays_killed_mid_conversation_are_replaced_and_nothing_is_lost(tmp_path: Path) -> None:
    """Alice and Bob, behind routers no hole punch gets through, talk
    through relays.  Both relays Bob holds slots at are killed mid
    conversation: he reserves at the third and tells his new relayed
    address; what was sent meanwhile arrives, once each; then they talk
    straight to each other (not through a mailbox) again."""
    with NatNetwork({"a": "symmetric", "b": "symmetric"}) as net:
        boot = Daemon(tmp_path, "boot", prefix=net.public, extra=["--mailbox", *FAST])
        daemons = [boot.start()]
        try:
            relays = {}
            for name in ("r1", "r2", "r3"):
                relays[name] = Daemon(tmp_path, name, [boot.address], ["--relay"], net.public)
                daemons.append(relays[name].start())
            ids = {str(r.id()["peer_id"]): r for r in relays.values()}
            alice = Daemon(tmp_path, "alice", [boot.address], FAST, net.home("a")).start()
            daemons.append(alice)
            bob = Daemon(tmp_path, "bob", [boot.address], FAST, net.home("b")).start()
            daemons.append(bob)
            wait_for(lambda: len(relays_of(alice)) == 2 and len(relays_of(bob)) == 2, timeout=60)
            introduce(alice, bob)
            chat_both_ways(alice, bob)

            held = relays_of(bob)
            for relay in held:
                ids[relay].kill9()
            (left,) = set(ids) - held
            alice.cli("send", "bob", "while the relays go")
            bob.cli("send", "alice", "while the relays go")
            # The loss is noticed when the connection closes, not at the next check.
            wait_for(lambda: relays_of(bob) == {left} and left in relays_of(alice), timeout=20)
            for sender, receiver in ((alice, bob), (bob, alice)):
                vias = []
                for n in range(5):
                    sender.cli("send", receiver.name, f"after {n}")
                    (got,) = wait_for(
                        lambda r=receiver, n=n: [
                            m for m in incoming(r) if m["text"] == f"after {n}"
                        ],
                        timeout=60,
                    )
                    vias.append(got["via"])
                    if got["via"] != "mailbox":
                        break
                assert vias[-1] != "mailbox", vias  # straight to each other again
                texts = sorted(m["text"] for m in incoming(receiver))
                first = "hello" if receiver is bob else "and back"
                sent = [f"after {n}" for n in range(len(vias))]
                assert texts == sorted([first, "while the relays go", *sent])  # once each
        finally:
            for daemon in reversed(daemons):
                if daemon.alive():
                    daemon.stop()
