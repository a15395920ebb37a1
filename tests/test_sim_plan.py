"""The simulation's plan and report, without nodes: fast and exhaustive."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pigeon.sim.fleet import Arrival, Usage
from pigeon.sim.report import build, percentile
from pigeon.sim.runner import FileArrival, Record
from pigeon.sim.scenario import (
    FILE_SIZES,
    Scenario,
    ScenarioError,
    file_content,
    file_id,
    message_id,
    plan,
)

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_same_seed_same_workload_other_seed_another() -> None:
    a, b = plan(Scenario(seed=7)), plan(Scenario(seed=7))
    assert a == b
    assert a.digest() == b.digest()
    c = plan(Scenario(seed=8))
    assert c.sends != a.sends
    assert c.digest() != a.digest()


def test_digest_names_the_workload_not_the_waiting() -> None:
    # How long the run waits at the end changes no message, pair or churn.
    assert plan(Scenario(settle=10)).digest() == plan(Scenario(settle=300)).digest()
    assert plan(Scenario(messages=10)).digest() != plan(Scenario(messages=11)).digest()


@settings(max_examples=60, deadline=None)
@given(
    nodes=st.integers(6, 60),
    mailboxes=st.integers(1, 3),
    messages=st.integers(0, 300),
    churn=st.floats(0, 1),
    seed=st.integers(0, 2**32),
    partition=st.floats(0, 40),
)
def test_plans_keep_their_promises(nodes, mailboxes, messages, churn, seed, partition) -> None:
    scenario = Scenario(
        nodes=nodes,
        mailboxes=mailboxes,
        messages=messages,
        churn=churn,
        seed=seed,
        contacts=min(3, nodes - mailboxes - 1),
        duration=60,
        partition=partition,
        kill_mailboxes=mailboxes // 2,
    )
    p = plan(scenario)
    users = set(p.users)
    assert users == set(range(mailboxes, nodes))
    assert len(p.sends) == messages
    assert len({s.id for s in p.sends}) == messages
    pairs = set(p.contacts)
    for s in p.sends:
        assert (min(s.sender, s.recipient), max(s.sender, s.recipient)) in pairs
        assert p.online_at(s.sender, s.at), "a message is sent from a node that is offline"
        assert message_id(s.text) == s.id
        assert 0 <= s.at <= 0.8 * scenario.duration
    for a, b in p.contacts:
        assert a in users and b in users and a != b
    assert len(p.offline) == round(churn * len(users))
    for o in p.offline:
        assert o.node in users  # mailbox peers never churn, they are killed
        assert 0 < o.start < o.end <= 0.9 * scenario.duration
    assert {k.node for k in p.kills} <= set(p.mailboxes)
    assert len(p.kills) == mailboxes // 2
    if partition:
        assert p.partition is not None
        assert p.partition.end - p.partition.start == pytest.approx(partition, abs=0.01)
        assert 0 < len(p.partition.side) < nodes
    else:
        assert p.partition is None


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"mailboxes": 0}, "--mailboxes"),
        ({"nodes": 4, "mailboxes": 3}, "at least 2"),
        ({"contacts": 0}, "--contacts"),
        ({"churn": 1.5}, "--churn"),
        ({"kill_mailboxes": 4}, "--kill-mailboxes"),
        ({"partition": 50, "duration": 60}, "--partition"),
        ({"duration": 1}, "--duration"),
        ({"messages": -1}, "--messages"),
    ],
    ids=[
        "no-mailbox",
        "too-few-users",
        "no-contacts",
        "churn",
        "kill",
        "partition",
        "short",
        "neg",
    ],
)
def test_bad_options_say_which(options, complaint) -> None:
    with pytest.raises(ScenarioError, match=complaint):
        plan(Scenario(**options))


def test_files_join_the_workload_without_changing_its_messages() -> None:
    without, with_files = plan(Scenario(seed=5)), plan(Scenario(seed=5, files=12))
    # The same messages, pairs and churn: files are drawn after them, and a
    # workload without files keeps the digest it had before files existed.
    assert with_files.sends == without.sends and with_files.offline == without.offline
    assert with_files.digest() != without.digest()
    assert plan(Scenario(seed=5, files=12)) == with_files
    assert plan(Scenario(seed=6, files=12)).files != with_files.files
    assert len(with_files.files) == 12 and len({f.id for f in with_files.files}) == 12
    pairs = set(with_files.contacts)
    for f in with_files.files:
        assert (min(f.sender, f.recipient), max(f.sender, f.recipient)) in pairs
        assert with_files.online_at(f.sender, f.at)
        assert FILE_SIZES[0] <= f.size <= FILE_SIZES[1]
        assert file_id(f.name) == f.id
        content = file_content(5, f)
        assert len(content) == f.size and content == file_content(5, f)
        assert content != file_content(6, f)
    assert file_id("f0001.txt") is None and file_id("notes.bin") is None
    with pytest.raises(ScenarioError, match="--files"):
        plan(Scenario(files=-1))


def test_report_counts_files_that_arrived_intact() -> None:
    p = plan(Scenario(nodes=6, mailboxes=1, messages=0, contacts=2, churn=0, files=4))
    record = Record(p, started_at=1000.0, ended_at=1010.0)
    intact, damaged, refused, missing = p.files
    for f in p.files:
        record.files_sent[f.id] = 1000.0
    record.file_arrivals = {
        intact.id: [FileArrival("done", 1002.0, True, None)],
        damaged.id: [FileArrival("done", 1001.0, False, None)],
        refused.id: [FileArrival("refused", 1001.0, False, "too large")],
    }
    record.files_missing = {missing.id: "offered"}
    files = build(record, Usage(1.0, 1.0), "local")["files"]
    assert files["sent"] == 4
    assert files["delivered"] == 1
    assert files["corrupt"] == 1 and files["failed"] == 1
    assert files["lost"] == 3
    assert files["latency_ms"]["max"] == 2000
    assert files["bytes"] == sum(f.size for f in p.files)
    assert files["undelivered"] == {missing.id: "offered"}


def test_message_ids_only_from_simulated_texts() -> None:
    assert message_id("sim m00012: hello") == "m00012"
    assert message_id("sim m00012 hello") is None
    assert message_id("hello") is None


def test_percentiles_are_nearest_rank() -> None:
    assert percentile([], 50) is None
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([5.0], 99) == 5


def test_report_counts_what_arrived_not_what_was_sent() -> None:
    p = plan(Scenario(nodes=6, mailboxes=1, messages=4, contacts=2, churn=0))
    record = Record(p, started_at=1000.0, ended_at=1010.0)
    sends = p.sends
    for s in sends:
        record.sent[s.id] = 1000.0
    first, second, third, _ = sends
    record.arrivals[first.id] = [Arrival(first.recipient, first.text, 1000.5, "direct")]
    record.arrivals[second.id] = [
        Arrival(second.recipient, second.text, 1002.0, "mailbox"),
        Arrival(second.recipient, second.text, 1003.0, "direct"),
    ]
    record.arrivals[third.id] = [Arrival(third.recipient, third.text, 1001.0, "direct")]
    record.metrics = {
        i: {"wire_sent": 300, "wire_received": 100, "dht_lookups_ms": [5]} for i in range(6)
    }
    report = build(record, Usage(100.0, 2.0), "local")
    assert report["messages_sent"] == 4
    assert report["delivered"] == 3
    assert report["lost"] == 1
    assert report["duplicates"] == 1
    assert report["delivery_ratio"] == 0.75
    assert report["via_mailbox"] == 1
    assert report["latency_ms"]["max"] == 2000
    assert report["bytes_per_message"] == 600
    assert report["undelivered"] == [sends[3].id]
    assert report["schedule_sha256"] == p.digest()


def test_latency_from_reachable_counts_from_when_the_recipient_was_back() -> None:
    p = plan(Scenario(nodes=8, mailboxes=1, messages=4, contacts=2, churn=0, duration=60))
    late, prompt = p.sends[0], next(s for s in p.sends if s.recipient != p.sends[0].recipient)
    record = Record(p, started_at=1000.0, ended_at=1100.0)
    record.sent = {late.id: 1010.0, prompt.id: 1010.0}
    record.ups = {late.recipient: [990.0, 1030.0]}  # stopped at 1005, back at 1030
    record.downs = {late.recipient: [1005.0]}
    record.arrivals[late.id] = [Arrival(late.recipient, late.text, 1031.0, "mailbox")]
    record.arrivals[prompt.id] = [Arrival(prompt.recipient, prompt.text, 1010.5, "direct")]
    report = build(record, Usage(1.0, 1.0), "local")
    assert report["latency_ms"]["max"] == 21000  # send to inbox
    assert report["latency_reachable_ms"]["max"] == 1000  # back at 1030, stored at 1031
    assert report["latency_reachable_ms"]["p50"] == 500


def test_a_partition_makes_the_other_side_unreachable_until_it_heals() -> None:
    p = plan(Scenario(nodes=8, mailboxes=1, messages=4, contacts=2, duration=60, partition=20))
    assert p.partition is not None
    inside = p.partition.side[0]
    outside = next(n for n in range(8) if n not in p.partition.side)
    record = Record(p, split=(1000.0, 1020.0))
    assert record.reachable_from(inside, outside, 1010.0) == 1020.0
    assert record.reachable_from(inside, p.partition.side[1], 1010.0) == 1010.0
    assert record.reachable_from(inside, outside, 1025.0) == 1025.0


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_examples_run_nothing_when_a_worker_process_imports_them(example, monkeypatch) -> None:
    """The proof-of-work worker is a spawned process: it imports the script it
    was started from (as ``__mp_main__``), and a script without a main guard
    would run a whole second simulation inside it."""
    import pigeon.ui.sim

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError(f"{example.name} ran a simulation on import")

    monkeypatch.setattr(pigeon.ui.sim, "run_and_print", refuse)
    runpy.run_path(str(example), run_name="__mp_main__")
    with pytest.raises(AssertionError, match="ran a simulation"):
        runpy.run_path(str(example), run_name="__main__")
