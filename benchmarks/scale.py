"""What a network of idle nodes costs, and whether its records are found, as it grows.

    python benchmarks/scale.py [--json] [--sizes 10,40,100] [--mode local|processes|both]
                               [--idle 600] [--settle 30] [--askers 3] [--mailboxes 2]

For each mode and size, in a fresh process of its own (so that memory is that
run's): two nodes start and publish their records while they are the whole
network; the others join, 8 at a time, and register with the mailbox peers
(the first ``--mailboxes`` nodes, which everyone bootstraps from); the
network settles (``--settle`` seconds after the last registration, or after
10 minutes); then nothing is asked of it for ``--idle`` seconds, over which
its CPU is counted: by default 600, the period of the DHT's routing-table
refresh and of a node's republishing, so that each node's periodic work is
counted once whatever its phase (a shorter window at 100 nodes, whose
set-up takes about as long, caught many of them refreshing at once).
After that, ``--askers`` nodes look up every node's record in the DHT, one
lookup at a time.

- ``local``: every node a ``Node`` in this process (the simulation's
  ``LocalFleet``); idle CPU is this process's and its proof-of-work
  worker's; the askers are random nodes of the fleet.
- ``processes``: every node a ``pigeon daemon`` (the simulation's
  ``ProcessFleet``); idle CPU is the daemons' (and their children's), read
  from /proc; the askers are nodes started in this process after the idle
  window, each bootstrapped from a random daemon (a daemon has no lookup
  command).

Per run: ``idle_cpu_pct_per_node`` (percent of one core), the bytes each node
wrote to TCP per second while idle (and, in one process, the DHT lookups
and connections each made a minute, and the connections each held),
``rss_mb_per_node`` (in one process: its
growth since before the first node, over the nodes), how many lookups found
a valid record (``found``, and ``early_found`` for the two records published
while the network had two nodes) and lookup p50/p99 in milliseconds.  The
baseline is the smallest size of the same mode and run:
``idle_cpu_per_node_ratio`` is each size's idle CPU per node over its.  One
JSON line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
from libp2p.kad_dht.peer_routing import PeerRouting

from pigeon.node.conversations import Conversations
from pigeon.node.directory import lookup
from pigeon.node.host import quiet_libp2p_logs
from pigeon.node.node import Node, NodeConfig
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode, DirectoryRecord, ProtocolError, dht_key
from pigeon.protocol.keys import identity_id
from pigeon.sim import processes
from pigeon.sim.fleet import PASSPHRASE, LocalFleet, child_pids, loopback_address
from pigeon.sim.processes import ProcessFleet
from pigeon.sim.report import percentile

STARTS_AT_ONCE = 8
# Daemons started together, and how long each may take to answer: a daemon's
# start (imports, database, host) is a few seconds of CPU, and with a hundred
# already running on two cores, eight at once overran the fleet's minute.
PROCESS_STARTS_AT_ONCE = 4
PROCESS_READY_TIMEOUT = 300.0
FIRST = 2  # nodes that publish while they are the whole network
REGISTER_WAIT = 600.0  # longest wait for every node to hold its mailboxes
MAILBOXES_EACH = 3  # NodeConfig.mailbox_count
MAILBOX_INTERVAL = 30.0  # NodeConfig.mailbox_interval, as a daemon runs


def progress(line: str) -> None:
    """What a run is doing, on stderr (to attach a profiler to the idle window, say)."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """CPU seconds (user and system) of a process and its living children."""
    total = 0.0
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / clock_ticks()
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                for child in (task / "children").read_text().split():
                    total += proc_cpu_s(int(child))
    return total


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def valid(data: bytes, key: bytes) -> bool:
    try:
        DirectoryRecord.verify(data, now=int(time.time()), key_id=identity_id(key))
    except ProtocolError:
        return False
    return True


class Lookups:
    """Every lookup's time and whether it found a valid record."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.found = 0
        self.early = 0
        self.early_found = 0

    async def look_up(self, node: Node, key: bytes, early: bool) -> None:
        started = trio.current_time()
        copies = await lookup(node.dht, key)
        self.ms.append((trio.current_time() - started) * 1000)
        ok = any(valid(copy, key) for copy in copies)
        self.found += ok
        if early:
            self.early += 1
            self.early_found += ok

    def report(self) -> dict[str, Any]:
        return {
            "lookups": len(self.ms),
            "found": self.found,
            "found_share": round(self.found / len(self.ms), 3) if self.ms else None,
            "early_lookups": self.early,
            "early_found": self.early_found,
            "lookup_p50_ms": percentile(self.ms, 50),
            "lookup_p99_ms": percentile(self.ms, 99),
        }


async def grow(fleet: Any, nodes: int, first: int, holds: Any, at_once: int) -> None:
    """The first nodes alone until each holds the others' records, then the rest."""
    for node in range(first):
        await fleet.start(node)
    with trio.move_on_after(60):
        while not await holds():
            await trio.sleep(0.5)
    limit = trio.CapacityLimiter(at_once)

    async def start(node: int) -> None:
        async with limit:
            await fleet.start(node)

    async with trio.open_nursery() as nursery:
        for node in range(first, nodes):
            nursery.start_soon(start, node)


async def wait_registered(fleet: Any, nodes: int, mailboxes: int) -> int:
    """Until every node holds as many mailboxes as it can (the mailbox peers
    one fewer: not themselves); how many do."""

    def want(node: int) -> int:
        return min(MAILBOXES_EACH, mailboxes - (node < mailboxes))

    short = list(range(nodes))
    said = trio.current_time()
    with trio.move_on_after(REGISTER_WAIT):
        while short:
            short = [n for n in short if await fleet.registered(n) < want(n)]
            if short:
                if trio.current_time() - said > 30:
                    said = trio.current_time()
                    progress(f"{len(short)} nodes hold fewer mailboxes than they can")
                await trio.sleep(2)
    return nodes - len(short)


async def run_local(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n = args.nodes
    names = tuple(f"n{i}" for i in range(n))
    base_kb = rss_kb(os.getpid())
    result: dict[str, Any] = {"mode": "local", "nodes": n, "mailboxes": args.mailboxes}
    counter = CountLookups()
    async with trio.open_nursery() as nursery:
        fleet = LocalFleet(root, names, tuple(range(args.mailboxes)), nursery, MAILBOX_INTERVAL)
        started = trio.current_time()

        async def holds() -> bool:
            keys = [fleet.nodes[i].conversations.identity.public_key for i in range(FIRST)]
            return all(
                node.dht.value_store.get(dht_key(key).encode()) is not None
                for node in fleet.nodes.values()
                for key in keys
            )

        await grow(fleet, n, FIRST, holds, STARTS_AT_ONCE)
        result["registered"] = await wait_registered(fleet, n, args.mailboxes)
        result["startup_s"] = round(trio.current_time() - started, 1)
        progress(f"{n} nodes up, {result['registered']} registered; settling")
        await trio.sleep(args.settle)
        progress(f"idle for {args.idle:g} s")

        cpu = time.process_time() + sum(proc_cpu_s(pid) for pid in child_pids())
        wire = sum(node.wire.sent for node in fleet.nodes.values())
        opened = sum(node.wire.opened for node in fleet.nodes.values())
        counter.on = True
        await trio.sleep(args.idle)
        counter.on = False
        cpu = time.process_time() + sum(proc_cpu_s(pid) for pid in child_pids()) - cpu
        wire = sum(node.wire.sent for node in fleet.nodes.values()) - wire
        opened = sum(node.wire.opened for node in fleet.nodes.values()) - opened
        result["idle_lookups_per_node_min"] = round(counter.count / n / args.idle * 60, 2)
        # each connection counted at both ends
        result["idle_connections_per_node_min"] = round(opened / 2 / n / args.idle * 60, 2)
        result["connections_per_node"] = round(
            sum(len(node.host.get_network().connections) for node in fleet.nodes.values()) / n, 1
        )
        rss = rss_kb(os.getpid()) - base_kb
        result.update(_idle(cpu, wire, args.idle, n))
        result["rss_mb_per_node"] = round(rss / 1024 / n, 2)
        result["rss_mb_total"] = round(rss_kb(os.getpid()) / 1024, 1)

        progress("looking up")
        keys = [fleet.nodes[i].conversations.identity.public_key for i in range(n)]
        lookups = Lookups()
        for asker in random.Random(args.seed).sample(range(n), min(args.askers, n)):
            for target in range(n):
                if target != asker:
                    await lookups.look_up(fleet.nodes[asker], keys[target], target < FIRST)
        result.update(lookups.report())
        with trio.CancelScope(shield=True):
            await fleet.close()
        nursery.cancel_scope.cancel()
    return result


class CountLookups:
    """Counts DHT lookups (``find_closest_peers_network``) of every node of
    this process while ``on``; nothing else changes."""

    def __init__(self) -> None:
        self.on = False
        self.count = 0
        find = PeerRouting.find_closest_peers_network

        async def counted(routing: PeerRouting, key: bytes, count: int = 20) -> list[Any]:
            self.count += self.on
            return await find(routing, key, count)

        PeerRouting.find_closest_peers_network = counted  # type: ignore[method-assign]


def _idle(cpu_s: float, wire_bytes: int, window: float, n: int) -> dict[str, Any]:
    return {
        "idle_window_s": window,
        "idle_cpu_s": round(cpu_s, 2),
        "idle_cpu_pct_per_node": round(cpu_s / window / n * 100, 3),
        "idle_bytes_per_node_s": round(wire_bytes / window / n, 1),
    }


async def run_processes(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    n = args.nodes
    names = tuple(f"n{i}" for i in range(n))
    result: dict[str, Any] = {"mode": "processes", "nodes": n, "mailboxes": args.mailboxes}
    processes.READY_TIMEOUT = PROCESS_READY_TIMEOUT
    fleet = ProcessFleet(root, names, tuple(range(args.mailboxes)), MAILBOX_INTERVAL)
    try:
        started = trio.current_time()

        async def holds() -> bool:
            # A daemon says nothing of its DHT store; each publishes again
            # once registered with the other (a mailbox peer), which then
            # holds its record.
            if all([await fleet.registered(i) >= 1 for i in range(FIRST)]):
                await trio.sleep(5)
                return True
            return False

        await grow(fleet, n, FIRST, holds, PROCESS_STARTS_AT_ONCE)
        result["registered"] = await wait_registered(fleet, n, args.mailboxes)
        result["startup_s"] = round(trio.current_time() - started, 1)
        progress(f"{n} nodes up, {result['registered']} registered; settling")
        await trio.sleep(args.settle)
        progress(f"idle for {args.idle:g} s")

        pids = [fleet.processes[i].pid for i in range(n)]

        async def wire() -> int:
            total = 0
            for i in range(n):
                metrics = await fleet._call(i, "metrics")
                total += int(metrics["wire_sent"])
            return total

        sent = await wire()
        cpu = sum(proc_cpu_s(pid) for pid in pids)
        await trio.sleep(args.idle)
        cpu = sum(proc_cpu_s(pid) for pid in pids) - cpu
        sent = await wire() - sent
        result.update(_idle(cpu, sent, args.idle, n))
        rss = [rss_kb(pid) for pid in pids]
        result["rss_mb_per_node"] = round(sum(rss) / 1024 / n, 2)
        result["rss_mb_total"] = round(sum(rss) / 1024, 1)

        progress("looking up")
        keys = [ContactCode.parse(fleet.code(i)).identity_key for i in range(n)]
        lookups = Lookups()
        pick = random.Random(args.seed)
        for asker in range(args.askers):
            via = fleet.addresses[pick.randrange(n)]
            await _probe(root / f"asker{asker}", n + asker, via, keys, lookups)
        result.update(lookups.report())
    finally:
        with trio.CancelScope(shield=True):
            await fleet.close()
    return result


async def _probe(
    home: Path, index: int, bootstrap: str, keys: list[bytes], lookups: Lookups
) -> None:
    """A node of this process that joins through ``bootstrap`` and looks up every record."""
    db = Database.create(home, PASSPHRASE, fast_kdf=True)
    Conversations.initialise(db, home.name, os.urandom)
    config = NodeConfig(
        listen=[f"/ip4/{loopback_address(index)}/tcp/0"],
        bootstrap=[bootstrap],
        announce_presence=False,
        mailbox_count=0,
    )
    try:
        async with Node(db, config).running() as node:
            for target, key in enumerate(keys):
                await lookups.look_up(node, key, target < FIRST)
    finally:
        db.close()


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("pigeon").setLevel(logging.CRITICAL)
    quiet_libp2p_logs()
    with tempfile.TemporaryDirectory(prefix="pigeon-scale-") as tmp:
        run = run_local if args.mode == "local" else run_processes
        return trio.run(run, args, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="only the final JSON line")
    parser.add_argument("--sizes", default="10,40,100")
    parser.add_argument("--mode", choices=("local", "processes", "both"), default="both")
    parser.add_argument("--idle", type=float, default=600.0, help="seconds of idle counted")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds before the count")
    parser.add_argument("--askers", type=int, default=3, help="nodes that look up every record")
    parser.add_argument("--mailboxes", type=int, default=2, help="mailbox peers (at least 2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)  # one run, in this process
    args = parser.parse_args()
    if args.nodes is not None:
        print(json.dumps(run_one(args)), flush=True)
        return
    modes = ["local", "processes"] if args.mode == "both" else [args.mode]
    sizes = sorted(int(size) for size in args.sizes.split(","))
    if args.mailboxes < FIRST or sizes[0] < max(args.mailboxes, FIRST + 1):
        parser.error(f"at least {FIRST} mailbox peers, and more nodes than mailbox peers")
    runs = []
    for mode in modes:
        for nodes in sizes:
            command = [
                sys.executable, __file__, "--mode", mode, "--nodes", str(nodes),
                "--idle", str(args.idle), "--settle", str(args.settle),
                "--askers", str(args.askers), "--mailboxes", str(args.mailboxes),
                "--seed", str(args.seed),
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, timeout=7200)
            if done.returncode == 0:
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            else:  # said in the line, and the other sizes still run
                error = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
                runs.append({"mode": mode, "nodes": nodes, "error": error[0]})
            if not args.json:
                print(json.dumps(runs[-1]), flush=True)
    for mode in modes:
        mine = [run for run in runs if run["mode"] == mode and "error" not in run]
        for run in mine:
            base = mine[0]["idle_cpu_pct_per_node"] or 1e-9
            run["idle_cpu_per_node_ratio"] = round(run["idle_cpu_pct_per_node"] / base, 2)
    print(json.dumps({"benchmark": "scale", "baseline_nodes": sizes[0], "runs": runs}))


if __name__ == "__main__":
    main()
