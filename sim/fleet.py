"""Where a simulation's nodes run.

``Fleet`` is what the runner needs from them; two kinds provide it:

- ``LocalFleet``: every node a ``Node`` in this process, one trio loop, each
  with an encrypted database of its own and its own loopback address
  (127.1.x.y), so that the partition can tell nodes apart.  Fast, and the
  only place that can count one process's CPU and memory per run.
- ``ProcessFleet`` (processes.py): every node a ``pigeon daemon`` subprocess,
  driven over its control socket like the command line does.

Both run the same ``Node`` code: the DHT directory, sessions, sealed
envelopes, mailboxes; nothing is short-cut.  A partition in this process
works at the TCP level (``Wire``): dials across it fail, connections across
it are closed.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from pigeon.node.contacts import Contact
from pigeon.node.conversations import Conversations
from pigeon.node.host import ListenError, Wire
from pigeon.node.node import Node, NodeConfig
from pigeon.node.storage import Database
from pigeon.protocol import ContactCode

PASSPHRASE = "pigeon simulation"


class EarlierRuns:
    """What each node counted in its earlier runs (a restart is a new node,
    or a new process, that starts its counters at zero): wire bytes and DHT
    lookups, added to what the current run has counted."""

    def __init__(self) -> None:
        self._runs: dict[int, dict[str, Any]] = {}

    def keep(self, node: int, metrics: dict[str, Any]) -> None:
        """Add the counters of a run that is ending."""
        self._runs[node] = self.total(node, metrics)

    def total(self, node: int, current: dict[str, Any] | None) -> dict[str, Any]:
        """``current`` (None: the node is not running) with its earlier runs added."""
        earlier = self._runs.get(node, {})
        metrics = dict(current or {})
        for counter in ("wire_sent", "wire_received"):
            metrics[counter] = int(metrics.get(counter, 0)) + int(earlier.get(counter, 0))
        metrics["dht_lookups_ms"] = [
            *earlier.get("dht_lookups_ms", []),
            *metrics.get("dht_lookups_ms", []),
        ]
        return metrics


@dataclass(frozen=True)
class Arrival:
    """A message as its recipient's node stored it."""

    node: int
    text: str
    received_at: float  # the recipient's clock, seconds since the epoch
    via: str  # "direct" or "mailbox"


@dataclass(frozen=True)
class Usage:
    peak_rss_mb: float
    cpu_s: float
    wan: dict[str, Any] = field(default_factory=dict)  # packets the hub delayed, dropped


class Fleet(Protocol):
    async def start(self, node: int) -> None:
        """Bring a node up (the first time: create it); return once it listens."""

    async def stop(self, node: int) -> None:
        """Take a node offline, as a user stopping the daemon does."""

    async def kill(self, node: int) -> None:
        """Take a node away for good, with no goodbye (kill -9 where it is a process)."""

    def code(self, node: int) -> str:
        """The node's contact code, as its user would show it."""

    async def add_contact(self, node: int, code: str) -> None: ...

    async def send(self, node: int, to: int, text: str) -> None:
        """Queue a message; raises if the node would not take it."""

    async def arrivals(self, node: int) -> list[Arrival]:
        """Messages stored by a running node since the last call."""

    async def registered(self, node: int) -> int:
        """How many mailboxes a running node is registered with."""

    async def accept_files(self, node: int, max_bytes: int) -> None:
        """Have a node take its contacts' files up to ``max_bytes`` without asking."""

    async def send_file(self, node: int, to: int, name: str, data: bytes) -> None:
        """Offer a file (written to the sender's home first); raises if the node would not."""

    async def files(self, node: int) -> list[dict[str, Any]]:
        """A running node's transfers, as ``pigeon files --json`` lists them."""

    async def outgoing(self, node: int) -> dict[str, str]:
        """A running node's sent messages: text -> "status" or "status: reason"."""

    async def look_up(self, node: int, to: int) -> tuple[float, bool]:
        """Have a running node look a contact's record up in the DHT (even
        one it could ask directly): milliseconds, and whether it was found."""

    async def metrics(self, node: int) -> dict[str, object]:
        """``Node.metrics()`` over all the node's runs (its earlier runs' alone
        when it is not running): wire bytes and DHT lookups summed."""

    async def split(self, side: set[int] | None) -> None:
        """Partition the network (``side`` against the rest), or heal it (None)."""

    def settled(self) -> None:
        """The network is up and the timeline about to start."""

    def usage(self) -> Usage: ...

    async def close(self) -> None: ...


def loopback_address(node: int) -> str:
    return f"127.1.{node // 250}.{node % 250 + 1}"


class LocalFleet:
    """Nodes in this process, under one trio loop."""

    def __init__(
        self,
        root: Path,
        names: tuple[str, ...],
        mailboxes: tuple[int, ...],
        nursery: trio.Nursery,
        mailbox_interval: float,
    ) -> None:
        self.root = root
        self.names = names
        self.mailboxes = set(mailboxes)
        self.nursery = nursery
        self.mailbox_interval = mailbox_interval
        self.dbs: dict[int, Database] = {}
        self.nodes: dict[int, Node] = {}
        self.ports: dict[int, int] = {}
        self.codes: dict[int, str] = {}
        self.contacts: dict[tuple[int, int], Contact] = {}
        self.stops: dict[int, tuple[trio.Event, trio.Event]] = {}
        self.seen: dict[int, int] = {}  # last message row read, per node
        self.earlier = EarlierRuns()
        self.side: set[int] | None = None
        self.bootstrap: dict[int, str] = {}  # mailbox peers, the others' way in
        self.started = time.process_time() + _children_cpu_s()

    def _allows(self, node: int) -> Callable[[str], bool]:
        by_address = {loopback_address(i): i for i in range(len(self.names))}

        def allows(ip: str) -> bool:
            other = by_address.get(ip)
            if self.side is None or other is None:
                return True
            return (node in self.side) == (other in self.side)

        return allows

    async def start(self, node: int) -> None:
        if node not in self.dbs:
            db = Database.create(self.root / self.names[node], PASSPHRASE, fast_kdf=True)
            Conversations.initialise(db, self.names[node], os.urandom)
            self.dbs[node] = db
        wire = Wire(source=loopback_address(node))
        wire.allows = self._allows(node)
        config = NodeConfig(
            listen=[f"/ip4/{loopback_address(node)}/tcp/{self.ports.get(node, 0)}"],
            bootstrap=[a for i, a in sorted(self.bootstrap.items()) if i != node],
            serve_mailbox=node in self.mailboxes,
            mailbox_interval=self.mailbox_interval,
            wire=wire,
        )
        stop, stopped = trio.Event(), trio.Event()
        self.stops[node] = (stop, stopped)
        try:
            self.nodes[node] = await self.nursery.start(self._run, node, config, stop, stopped)
        except ListenError:
            # The port it had is taken meanwhile (by a connection's ephemeral
            # port, say): it comes back elsewhere, as a node on a laptop does.
            self.ports.pop(node, None)
            await self.start(node)

    async def _run(
        self,
        node: int,
        config: NodeConfig,
        stop: trio.Event,
        stopped: trio.Event,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            running = Node(self.dbs[node], config)
            async with running.running():
                self.ports[node] = int(running.addresses[0].split("/")[4])
                self.codes[node] = running.contact_code()
                if node in self.mailboxes:
                    self.bootstrap[node] = running.addresses[0]
                task_status.started(running)
                await stop.wait()
        finally:
            stopped.set()

    async def stop(self, node: int) -> None:
        running = self.nodes.pop(node)
        self.earlier.keep(node, running.metrics())
        stop, stopped = self.stops.pop(node)
        stop.set()
        await stopped.wait()

    async def kill(self, node: int) -> None:
        # One process cannot kill -9 a part of itself: the node's tasks are
        # cancelled and its connections closed at once, with no goodbye in
        # any protocol (the same as a graceful stop here), and it never
        # comes back; its database, with whatever it held, is closed.
        await self.stop(node)
        self.bootstrap.pop(node, None)
        self.dbs.pop(node).close()

    def code(self, node: int) -> str:
        return self.codes[node]

    async def add_contact(self, node: int, code: str) -> None:
        parsed = ContactCode.parse(code)
        contact, _ = await self.nodes[node].add_contact(parsed, None)
        other = self.names.index(parsed.name)
        self.contacts[(node, other)] = contact

    async def send(self, node: int, to: int, text: str) -> None:
        self.nodes[node].send_text(self.contacts[(node, to)], text)

    async def arrivals(self, node: int) -> list[Arrival]:
        conv = self.nodes[node].conversations
        rows = conv.inbox(after=self.seen.get(node, 0))
        if rows:
            self.seen[node] = max(int(str(r["seq"])) for r in rows)
        return [to_arrival(node, r) for r in rows if r["direction"] == "in"]

    async def outgoing(self, node: int) -> dict[str, str]:
        return outgoing(self.nodes[node].conversations.inbox())

    async def registered(self, node: int) -> int:
        return len(self.nodes[node].owner.my_mailboxes())

    async def accept_files(self, node: int, max_bytes: int) -> None:
        self.nodes[node].transfers.set_auto_accept(None, max_bytes)

    async def send_file(self, node: int, to: int, name: str, data: bytes) -> None:
        source = outgoing_file(self.root / self.names[node], name, data)
        contact = self.contacts[(node, to)]
        await self.nodes[node].transfers.offer(contact.identity_key, source)

    async def files(self, node: int) -> list[dict[str, Any]]:
        return self.nodes[node].transfers.list()

    async def look_up(self, node: int, to: int) -> tuple[float, bool]:
        return await self.nodes[node].directory.probe(self.contacts[(node, to)].identity_key)

    async def metrics(self, node: int) -> dict[str, object]:
        running = self.nodes.get(node)
        return self.earlier.total(node, running.metrics() if running is not None else None)

    async def split(self, side: set[int] | None) -> None:
        self.side = side
        for running in list(self.nodes.values()):
            await running.wire.cut()

    def usage(self) -> Usage:
        """This process and its children (the proof-of-work worker) together."""
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak += sum(peak_kb(pid) for pid in child_pids())
        cpu = time.process_time() + _children_cpu_s() - self.started
        return Usage(round(peak / 1024, 1), round(cpu, 2))

    def settled(self) -> None:
        """What the nodes hold once the network is up lives, most of it, to
        the end of the run: it is taken out of the cyclic garbage collector's
        reach (``gc.freeze``, after a last collection), and ``close`` gives it
        back.  A full collection traverses every object it tracks, and in one
        process that is every node's (about 1.5 million at 100 nodes, 1.5 s a
        pass, 7-9 passes every 30 s: about half of the workload's CPU);
        in a daemon it is one node's.  What the frozen objects leave as
        garbage in cycles (the nodes that churn away) waits for ``close``."""
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        async with trio.open_nursery() as nursery:
            for node in list(self.nodes):
                nursery.start_soon(self.stop, node)
        for db in self.dbs.values():
            db.close()
        self.dbs.clear()
        gc.unfreeze()


def to_arrival(node: int, row: dict[str, object]) -> Arrival:
    received = row["received_at"]
    return Arrival(
        node,
        str(row["text"]),
        float(str(received)) if received is not None else time.time(),
        str(row.get("via") or "direct"),
    )


def outgoing(rows: list[dict[str, object]]) -> dict[str, str]:
    return {
        str(r["text"]): str(r["status"]) + (f": {r['reason']}" if r["reason"] else "")
        for r in rows
        if r["direction"] == "out"
    }


def outgoing_file(home: Path, name: str, data: bytes) -> Path:
    """Where a simulated user keeps a file it sends: in its own home, so
    that it is there for as long as the transfer needs it."""
    folder = home / "to-send"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path.resolve()


def child_pids() -> list[int]:
    """This process's child processes (its proof-of-work workers)."""
    pids: list[int] = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def _children_cpu_s() -> float:
    """CPU seconds of this process's living children (Linux; 0 elsewhere)."""
    total = 0.0
    with contextlib.suppress(OSError):
        for pid in child_pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def peak_kb(pid: int) -> int:
    """A process's peak resident memory (VmHWM) in KiB, 0 if unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0
