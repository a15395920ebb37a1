"""Where a daemon listens by default and what it tells others
(node/addresses.py): unit tests, and real daemons in network namespaces the
tests create (a daemon on every interface must not listen on the machine's
own network)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from multiaddr import Multiaddr
from netns import namespace, needs_root

from daemons import Daemon, contact, incoming, introduce, pigeon, status, wait_for
from pigeon.node import addresses
from pigeon.node.addresses import default_listen, published
from pigeon.node.host import ListenError
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode

MACHINE = [
    ipaddress.ip_address(a)
    for a in ("127.0.0.1", "::1", "192.0.2.10", "fe80::1", "169.254.3.4", "fd00:77::10")
]


def test_a_wildcard_is_told_as_the_dialable_interface_addresses_of_its_family() -> None:
    told = published(
        [Multiaddr("/ip4/0.0.0.0/tcp/4001"), Multiaddr("/ip6/::/tcp/4001")], lambda: MACHINE
    )
    assert told == ["/ip4/192.0.2.10/tcp/4001", "/ip6/fd00:77::10/tcp/4001"]


def test_an_address_listened_on_by_name_is_told_as_it_is() -> None:
    """Listening on loopback by name asks for loopback (a node for this
    machine only, as every test and the demo run); the interfaces are not
    even read."""

    def unread() -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise AssertionError("the interfaces were read")

    told = published([Multiaddr("/ip4/127.0.0.1/tcp/4001")], unread)
    assert told == ["/ip4/127.0.0.1/tcp/4001"]


def test_a_machine_with_no_dialable_address_tells_none() -> None:
    loopback = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert published([Multiaddr("/ip4/0.0.0.0/tcp/4001")], lambda: loopback) == []


def test_the_default_port_is_chosen_once_and_kept(tmp_path: Path) -> None:
    db = Database.create(tmp_path / "home", "pw", fast_kdf=True)
    first = default_listen(db)
    assert first[0].startswith("/ip4/0.0.0.0/tcp/")
    port = int(first[0].split("/")[4])
    assert port > 0
    if addresses.ipv6_available():
        assert first[1] == f"/ip6/::/tcp/{port}"
    assert default_listen(db) == first
    db.close()
    reopened = Database.open(tmp_path / "home", "pw")
    assert default_listen(reopened) == first
    reopened.close()


def test_the_kept_port_taken_by_another_program_is_one_clear_line(tmp_path: Path) -> None:
    db = Database.create(tmp_path / "home", "pw", fast_kdf=True)
    port = int(default_listen(db)[0].split("/")[4])
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        with pytest.raises(ListenError, match=f"TCP port {port}, this node's port") as caught:
            default_listen(db)
    assert "\n" not in str(caught.value)
    assert default_listen(db)[0] == f"/ip4/0.0.0.0/tcp/{port}"  # free again: the same port
    db.close()


@needs_root
@pytest.mark.slow
def test_a_daemon_listens_everywhere_on_its_own_port_and_tells_only_dialable_addresses(
    tmp_path: Path,
) -> None:
    with namespace("192.0.2.10/24", "fd00:77::10/64") as inside:
        daemon = Daemon(tmp_path, "alice", prefix=inside).start()
        try:
            told = daemon.id()["addresses"]
            port = told[0].split("/")[4]
            assert [a.split("/p2p/")[0] for a in told] == [
                f"/ip4/192.0.2.10/tcp/{port}",
                f"/ip6/fd00:77::10/tcp/{port}",
            ]
            code = ContactCode.parse(daemon.id()["contact_code"])
            assert [a.split("/p2p/")[0] for a in code.addresses] == [
                f"/ip4/192.0.2.10/tcp/{port}",
                f"/ip6/fd00:77::10/tcp/{port}",
            ]
            daemon.stop()
            daemon.start()
            assert daemon.id()["addresses"] == told  # the same port after a restart
            assert pigeon(daemon.home, "status").returncode == 0
        finally:
            daemon.stop()


@needs_root
@pytest.mark.slow
def test_two_daemons_with_only_ipv6_find_each_other_and_chat(tmp_path: Path) -> None:
    """A network with no IPv4 at all (loopback aside): each daemon tells
    only its IPv6 address, the second finds the first through it, and they
    chat both ways over a direct connection, not through a mailbox."""
    with namespace("fd00:66::10/64") as inside:
        alice = Daemon(tmp_path, "alice", prefix=inside, extra=["--mailbox"]).start()
        bob = None
        try:
            (told,) = alice.id()["addresses"]
            assert told.startswith("/ip6/fd00:66::10/tcp/")
            bob = Daemon(tmp_path, "bob", [told], prefix=inside).start()
            assert all(a.startswith("/ip6/fd00:66::10/") for a in bob.id()["addresses"])
            introduce(alice, bob)
            for sender, receiver, to in ((alice, bob, "bob"), (bob, alice, "alice")):
                sender.cli("send", to, f"from {sender.name}")
                (got,) = wait_for(lambda r=receiver: incoming(r), timeout=60)
                assert got["text"] == f"from {sender.name}" and got["via"] != "mailbox"
            assert contact(alice, "bob")["connection"] == "direct"
            # A peer dialled back over IPv6: reachable.
            wait_for(lambda: status(bob)["reachability"] != "unknown", timeout=40)
            assert status(bob)["reachability"] == "public", status(bob)["reachability_why"]
        finally:
            for daemon in (bob, alice):
                if daemon is not None:
                    daemon.stop()
