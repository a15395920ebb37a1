"""``pigeon sim`` with real nodes: churn, a killed mailbox, a partition that
heals (in one process and in network namespaces), the same workload from the
same seed.  All in one file, so that no two of these runs, each of which
keeps a core busy, share CI's two cores."""

from __future__ import annotations

import gc
import io
import os
import subprocess
import sys

import pytest
import trio
from simcheck import check_lossless, events, sends

from pigeon.sim.fleet import EarlierRuns, LocalFleet
from pigeon.sim.runner import Runner
from pigeon.sim.scenario import Scenario, plan
from pigeon.sim.simulate import simulate

# Time the runs may take for the last deliveries (they end as soon as all
# arrived): generous, so that a slow CI machine is not mistaken for a loss.
SETTLE = 240


def test_twenty_nodes_under_thirty_percent_churn_lose_nothing(tmp_path) -> None:
    scenario = Scenario(
        nodes=20, mailboxes=3, messages=200, churn=0.3, seed=1, duration=30, settle=SETTLE
    )
    report = simulate(scenario, tmp_path)
    check_lossless(report, tmp_path)
    assert report["nodes"] == 20 and report["mailboxes"] == 3
    # The churn happened: 30% of the 17 nodes that are not mailboxes went
    # offline and came back, while messages were sent.
    offline = [e for e in events(tmp_path) if e["event"] == "offline"]
    online = [e for e in events(tmp_path) if e["event"] == "online"]
    assert len(offline) == len(online) == 5
    # The timeline started once all 17 were registered with their 3 mailboxes.
    (start,) = [e for e in events(tmp_path) if e["event"] == "start"]
    assert start["registered"] == 17
    # Every chatting node timed a lookup before the timeline started, and each
    # one that came back another; on the settled network every record was
    # found (those made the moment a node came back are counted, not judged:
    # CI's machine may still be starting it).
    failed = [e for e in events(tmp_path) if e["event"] == "lookup_failed"]
    assert report["dht_probes"]["made"] == 17 + 5, failed
    probes = [e for e in events(tmp_path) if e["event"] == "lookup"]
    assert sorted(e["when"] for e in probes) == ["back online"] * 5 + ["start"] * 17
    assert all(e["found"] for e in probes if e["when"] == "start")
    assert report["dht_lookups"] >= 17 + 5 and report["dht_lookup_ms"]["p50"] is not None
    assert report["bytes_per_message"] > 0
    assert report["schedule_sha256"] == plan(scenario).digest()


def test_the_same_seed_gives_the_same_workload_in_one_process_and_in_many(tmp_path) -> None:
    scenario = Scenario(
        nodes=6, mailboxes=2, messages=15, churn=0.5, seed=42, duration=8, settle=SETTLE, files=3
    )
    local = simulate(scenario, tmp_path / "local")
    processes = simulate(scenario, tmp_path / "processes", mode="processes")
    for out, report in ((tmp_path / "local", local), (tmp_path / "processes", processes)):
        check_lossless(report, out)
    assert processes["mode"] == "processes"
    assert local["schedule_sha256"] == processes["schedule_sha256"] == plan(scenario).digest()
    # The same messages between the same pairs (each sent in a task of its
    # own, so two sent at nearly the same time may be logged either way round).
    expected = sorted((s.id, f"n{s.sender}", f"n{s.recipient}") for s in plan(scenario).sends)
    assert sorted(sends(tmp_path / "local")) == sorted(sends(tmp_path / "processes")) == expected
    # The files too, peer to peer (check_lossless: every one arrived, intact).
    assert local["files"]["sent"] == processes["files"]["sent"] == 3
    # The daemons answered `metrics`: bytes on their wire, their lookups.
    assert processes["bytes_per_message"] > 0
    assert processes["dht_lookups"] > 0
    # Another seed, another workload.
    assert (
        plan(Scenario(nodes=6, mailboxes=2, messages=15, seed=43)).digest()
        != local["schedule_sha256"]
    )


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        (
            ["--nodes", "4"],
            "--nodes 4 with --mailboxes 3 leaves 1 node(s) to chat: at least 2 are needed",
        ),
        (["--processes", "--partition", "5"], "--partition with --processes needs --netns"),
        (["--latency", "40ms"], "--latency and --loss need --processes --netns"),
        (["--processes", "--loss", "1%"], "--latency and --loss need --processes --netns"),
        (["--loss", "80%"], "--loss must be from 0% to 50%"),
    ],
    ids=["too-few", "partition-processes", "latency-local", "loss-processes", "loss-range"],
)
def test_bad_options_are_one_line_and_nothing_runs(tmp_path, options, complaint) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pigeon.ui.cli", "sim", *options, "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"pigeon: {complaint}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_killing_one_of_every_recipients_three_mailboxes_loses_nothing(tmp_path) -> None:
    scenario = Scenario(
        nodes=9,
        mailboxes=3,
        messages=50,
        churn=0.5,
        kill_mailboxes=1,
        seed=3,
        duration=35,
        settle=SETTLE,
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
    scenario = Scenario(
        nodes=9, mailboxes=3, messages=50, churn=0, partition=10, duration=25, settle=SETTLE
    )
    report = simulate(scenario, tmp_path)
    check_lossless(report, tmp_path)
    check_partition_healed(tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root (CI runs as root)")
def test_daemons_in_network_namespaces_survive_a_real_partition_and_a_wan(tmp_path) -> None:
    """Each daemon in its own namespace on a bridge; the partition moves half
    of them to another bridge, so packets across are dropped, not refused;
    every packet between two nodes is delayed 40 ms and 1% of them dropped."""
    before = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    )
    scenario = Scenario(
        nodes=8,
        mailboxes=2,
        messages=30,
        churn=0.3,
        partition=8,
        duration=20,
        seed=5,
        settle=SETTLE,
        latency=40,
        loss=0.01,
    )
    report = simulate(scenario, tmp_path, mode="netns")
    check_lossless(report, tmp_path)
    check_partition_healed(tmp_path)
    assert report["mode"] == "netns"
    assert report["wan"]["delayed"] > 1000 and report["wan"]["dropped"] > 0, report["wan"]
    assert report["latency_ms"]["p50"] >= 40  # at least one way across the hub
    after = set(
        subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
    )
    assert after == before, "the simulation left network namespaces behind"


def test_a_restarted_nodes_earlier_runs_still_count() -> None:
    earlier = EarlierRuns()
    first = {"wire_sent": 10, "wire_received": 4, "dht_lookups_ms": [5.0], "connections": 3}
    earlier.keep(0, first)
    earlier.keep(0, {"wire_sent": 1, "wire_received": 1, "dht_lookups_ms": [7.0]})
    now = earlier.total(0, {"wire_sent": 2, "wire_received": 0, "dht_lookups_ms": [], "x": 1})
    assert now == {"wire_sent": 13, "wire_received": 5, "dht_lookups_ms": [5.0, 7.0], "x": 1}
    # Offline at the end: its earlier runs alone; a node never stopped: nothing added.
    assert earlier.total(0, None)["dht_lookups_ms"] == [5.0, 7.0]
    assert earlier.total(1, {"wire_sent": 2, "wire_received": 0}) == {
        "wire_sent": 2,
        "wire_received": 0,
        "dht_lookups_ms": [],
    }


def test_an_in_process_network_once_settled_is_kept_out_of_full_collections(tmp_path) -> None:
    """What the nodes hold when the timeline starts is frozen out of the
    garbage collector's full passes (each traversed every node's objects: a
    third of a 100-node run's CPU), and given back when the run closes."""

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fleet = LocalFleet(tmp_path, ("n00",), (), nursery, mailbox_interval=30.0)
            alive = [[i] for i in range(1000)]  # tracked objects the network holds
            fleet.settled()
            assert gc.get_freeze_count() >= len(alive)
            await fleet.close()
            assert gc.get_freeze_count() == 0

    trio.run(main)


def test_every_mailbox_peer_runs_before_any_chatting_node_starts() -> None:
    """The chatting nodes bootstrap from every mailbox peer, and identify
    tells them those keep mailboxes: none has to search the DHT for one at
    the set-up's busiest (started alongside, the first ones knew one or two,
    and a search that found none waited 10, 20, 40 s before the next)."""
    the_plan = plan(Scenario(nodes=30, mailboxes=4, messages=10, seed=3))
    started: list[int] = []

    class Starts:
        async def start(self, node: int) -> None:
            await trio.sleep(0.01 * (node % 3))  # starts take their own time
            started.append(node)

    runner = Runner(the_plan, Starts(), io.StringIO(), lambda line: None)  # type: ignore[arg-type]
    trio.run(runner._start_all)
    mailboxes = set(the_plan.mailboxes)
    assert sorted(started) == list(range(30))
    assert set(started[: len(mailboxes)]) == mailboxes
