"""``pigeon sim`` with real nodes: a mailbox killed mid-run, a partition that heals."""

from __future__ import annotations

import os
import subprocess

import pytest
from simcheck import check_lossless, events

from pigeon.sim.scenario import Scenario
from pigeon.sim.simulate import simulate


def test_killing_one_of_every_recipients_three_mailboxes_loses_nothing(tmp_path) -> None:
    scenario = Scenario(
        nodes=10, mailboxes=3, messages=60, churn=0.5, kill_mailboxes=1, seed=3, duration=40
    )
    report = simulate(scenario, tmp_path)
    check_lossless(report, tmp_path)
    kills = [e for e in events(tmp_path) if e["event"] == "kill"]
    assert len(kills) == 1 and kills[0]["node"].startswith("box")
    # Half the nodes were offline at some point: mailboxes carried messages.
    assert report["via_mailbox"] > 0


def check_partition_healed(out) -> None:
    """Messages sent across the partition while it lasted arrived, after it healed."""
    log = events(out)
    (split,) = [e for e in log if e["event"] == "partition"]
    (heal,) = [e for e in log if e["event"] == "heal"]
    side = set(split["side"])
    delivered = {e["id"]: e for e in log if e["event"] == "deliver"}
    across = [
        e
        for e in log
        if e["event"] == "send"
        and split["time"] <= e["time"] < heal["time"]
        and (e["from"] in side) != (e["to"] in side)
    ]
    assert len(across) >= 3
    for send in across:
        # Nothing crossed while the network was split: each arrived, after it healed.
        assert delivered[send["id"]]["received_at"] >= heal["time"], send


def test_a_partition_that_heals_delivers_everything_sent_across_it_after(tmp_path) -> None:
    scenario = Scenario(nodes=10, mailboxes=3, messages=60, churn=0, partition=10, duration=25)
    report = simulate(scenario, tmp_path)
    check_lossless(report, tmp_path)
    check_partition_healed(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_daemons_in_network_namespaces_survive_a_real_partition(tmp_path) -> None:
    """Each daemon in its own namespace on a bridge; the partition moves half
    of them to another bridge, so packets across are dropped, not refused."""
    before = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    )
    scenario = Scenario(
        nodes=8, mailboxes=2, messages=30, churn=0.3, partition=8, duration=20, seed=5
    )
    report = simulate(scenario, tmp_path, mode="netns")
    check_lossless(report, tmp_path)
    check_partition_healed(tmp_path)
    assert report["mode"] == "netns"
    after = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    )
    assert after == before, "the simulation left network namespaces behind"
