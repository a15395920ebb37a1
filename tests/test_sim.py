"""``pigeon sim`` with real nodes: churn, and the same workload from the same seed."""

from __future__ import annotations

import subprocess
import sys

from simcheck import check_lossless, events, sends

from pigeon.sim.scenario import Scenario, plan
from pigeon.sim.simulate import simulate


def test_twenty_nodes_under_thirty_percent_churn_lose_nothing(tmp_path) -> None:
    scenario = Scenario(nodes=20, mailboxes=3, messages=200, churn=0.3, seed=1, duration=30)
    report = simulate(scenario, tmp_path)
    check_lossless(report, tmp_path)
    assert report["nodes"] == 20 and report["mailboxes"] == 3
    # The churn happened: 30% of the 17 nodes that are not mailboxes went
    # offline and came back, while messages were sent.
    offline = [e for e in events(tmp_path) if e["event"] == "offline"]
    online = [e for e in events(tmp_path) if e["event"] == "online"]
    assert len(offline) == len(online) == 5
    assert report["dht_lookup_ms"]["p50"] is not None
    assert report["bytes_per_message"] > 0
    assert report["schedule_sha256"] == plan(scenario).digest()


def test_the_same_seed_gives_the_same_workload_in_one_process_and_in_many(tmp_path) -> None:
    scenario = Scenario(nodes=6, mailboxes=2, messages=15, churn=0.5, seed=42, duration=8)
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
    # The daemons answered `metrics`: bytes on their wire, their lookups.
    assert processes["bytes_per_message"] > 0
    assert processes["dht_lookups"] > 0
    # Another seed, another workload.
    assert (
        plan(Scenario(nodes=6, mailboxes=2, messages=15, seed=43)).digest()
        != local["schedule_sha256"]
    )


def test_bad_options_are_one_line_and_nothing_runs(tmp_path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pigeon.ui.cli",
            "sim",
            "--nodes",
            "4",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "pigeon: --nodes 4 with --mailboxes 3 leaves 1 node(s) to chat: at least 2 are needed\n"
    )
    assert not (tmp_path / "o").exists()
