"""Daemons behind real NATs (iptables masquerade in network namespaces the
tests create; tests/netns.py): what they tell others and whether they know
they are reachable."""

from __future__ import annotations

from pathlib import Path

import pytest
from netns import NatNetwork, needs_nat

from daemons import Daemon, status, wait_for

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
