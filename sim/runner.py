"""Carry out a plan on a fleet, and record what happened.

The runner starts the mailbox peers (the others' bootstrap peers), then the
other nodes, has every contact pair exchange contact codes, and plays the
plan's timeline: sends, offline periods, mailbox kills, the partition.  A
watcher reads what each running node stored, every half second, into
``events.jsonl``.  After the timeline every node is online and the network
whole again; the run waits (at most ``settle`` seconds) until every message
sent has arrived, then reads each node's last arrivals and metrics.

Only what the nodes themselves stored counts as delivered: a message is
"sent" when its sender's node took it, "delivered" when the recipient's
node stored it (its ``received_at`` on the recipient's clock).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import trio

from .fleet import Arrival, Fleet
from .scenario import FILE_SIZES, FileSend, Plan, file_content, file_id, message_id

Progress = Callable[[str], None]
STARTS_AT_ONCE = 8  # nodes started together (each start does a DHT bootstrap)
EXCHANGES_AT_ONCE = 32  # contact pairs exchanging codes together (each waits on lookups)
MAILBOXES_EACH = 3  # mailboxes a node registers with (NodeConfig.mailbox_count)
# How long set-up waits for every node to hold its mailboxes before the
# timeline starts anyway (each registration is a proof of work, and all the
# nodes of one process share one worker).
REGISTER_WAIT = 600.0
PROBES = 4  # nodes timing a DHT lookup together before the timeline starts
ENDED = frozenset({"done", "failed", "refused", "cancelled"})  # a transfer's last states


@dataclass(frozen=True)
class FileArrival:
    """An incoming transfer that ended, as its recipient's node tells it."""

    state: str  # "done", or why it ended without the file
    received_at: float  # when the file was written in full (or the end was seen)
    intact: bool  # the bytes written are the bytes sent
    error: str | None


@dataclass
class Record:
    """What the run saw, for the report."""

    plan: Plan
    sent: dict[str, float] = field(default_factory=dict)  # message -> wall time it was sent
    failed: dict[str, str] = field(default_factory=dict)  # message -> why its node refused it
    arrivals: dict[str, list[Arrival]] = field(default_factory=dict)
    misdelivered: int = 0  # arrived at a node that was not its recipient
    metrics: dict[int, dict[str, Any]] = field(default_factory=dict)
    # message -> what its sender's node says of it, for each one not delivered
    missing: dict[str, str] = field(default_factory=dict)
    online: list[tuple[float, int]] = field(default_factory=list)  # (wall time, nodes online)
    # node -> wall times it stopped (or was killed) and started again, in order
    downs: dict[int, list[float]] = field(default_factory=dict)
    ups: dict[int, list[float]] = field(default_factory=dict)
    split: tuple[float, float] | None = None  # wall times the partition began and healed
    files_sent: dict[str, float] = field(default_factory=dict)  # file -> wall time offered
    files_failed: dict[str, str] = field(default_factory=dict)  # file -> why it was not offered
    file_arrivals: dict[str, list[FileArrival]] = field(default_factory=dict)
    files_missing: dict[str, str] = field(default_factory=dict)  # file -> its sender's word
    started_at: float = 0.0  # wall time the timeline began
    ended_at: float = 0.0
    setup_s: float = 0.0
    probes: list[tuple[float, bool]] = field(default_factory=list)  # (ms, found) of each probe

    def reachable_from(self, sender: int, recipient: int, sent: float) -> float:
        """When a message sent at ``sent`` could first reach its recipient:
        once the recipient's node was running again, and once the network
        was whole again when the partition kept the two apart."""
        at = sent
        downs = [t for t in self.downs.get(recipient, []) if t <= sent]
        ups = [t for t in self.ups.get(recipient, []) if t <= sent]
        if downs and (not ups or downs[-1] > ups[-1]):  # stopped when it was sent
            at = min((t for t in self.ups.get(recipient, []) if t > sent), default=math.inf)
        partition = self.plan.partition
        if self.split is not None and partition is not None:
            began, healed = self.split
            apart = (sender in partition.side) != (recipient in partition.side)
            if apart and began <= sent < healed:
                at = max(at, healed)
        return at


class Runner:
    def __init__(self, plan: Plan, fleet: Fleet, events: TextIO, progress: Progress) -> None:
        self.plan = plan
        self.fleet = fleet
        self.events = events
        self.progress = progress
        self.record = Record(plan)
        self.up: set[int] = set()
        self.dead: set[int] = set()
        self.recipient = {s.id: s.recipient for s in plan.sends}
        self.planned_files = {f.id: f for f in plan.files}
        self.ended_transfers: set[str] = set()  # incoming transfers already counted
        self.probed: dict[int, int] = {}  # node -> DHT lookups the run had it make
        # One node's start, stop, sends and reads do not interleave.
        self.locks = {node: trio.Lock() for node in range(len(plan.names))}

    def log(self, event: str, **fields: Any) -> None:
        now = time.time()
        at = now - self.record.started_at if self.record.started_at else 0.0
        line = {"t": round(at, 3), "time": round(now, 3), "event": event, **fields}
        self.events.write(json.dumps(line) + "\n")

    async def run(self, settle: float) -> Record:
        setup = time.monotonic()
        await self._start_all()
        await self._exchange_codes()
        registered = await self._wait_for_mailboxes()
        if self.plan.files:
            for node in self.plan.users:
                await self.fleet.accept_files(node, FILE_SIZES[1])
        self.record.setup_s = round(time.monotonic() - setup, 2)
        # Every user's lookup is timed on the settled network, before any
        # churn: one begun alongside the timeline missed a node that went
        # offline before its turn came.
        await self._many(self._probe, list(self.plan.users), "probed", PROBES)
        self.fleet.settled()
        self.record.started_at = time.time()
        self.log("start", nodes=len(self.plan.names), online=len(self.up), registered=registered)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            await self._timeline()
            self.progress("workload done; waiting for the last deliveries")
            with trio.move_on_after(settle):
                while self._delivered() < len(self.record.sent) or self._files_open():
                    await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        for node in sorted(self.up):
            await self._read(node)
        for node in range(len(self.plan.names)):  # offline ones too: their earlier runs
            self.record.metrics[node] = await self.fleet.metrics(node)
        await self._explain_missing()
        self.record.ended_at = time.time()
        self.log("end", delivered=self._delivered(), sent=len(self.record.sent))
        return self.record

    # -- set-up --------------------------------------------------------------------------------

    async def _start_all(self) -> None:
        plan = self.plan
        first, *others = plan.mailboxes
        await self._start(first)  # the first mailbox peer is the others' way in
        # Every mailbox peer is running before the chatting nodes start, so
        # that each of them has all of them as its bootstrap peers and knows
        # from identify that they keep mailboxes (no DHT search for them).
        # Started alongside, the first chatting nodes knew one or two, and
        # searched the DHT for the rest at a start-up's busiest: a search that
        # found none waited 10, 20, 40 s... before the next.
        await self._many(self._start, others, "mailbox peers started", STARTS_AT_ONCE)
        await self._many(self._start, list(plan.users), "started", STARTS_AT_ONCE)

    async def _many(
        self, task: Callable[[Any], Any], items: list[Any], what: str, at_once: int
    ) -> None:
        limit = trio.CapacityLimiter(at_once)
        done = 0

        async def one(item: Any) -> None:
            nonlocal done
            async with limit:
                await task(item)
            done += 1
            self.progress(f"{what} {done}/{len(items)}")

        async with trio.open_nursery() as nursery:
            for item in items:
                nursery.start_soon(one, item)

    async def _start(self, node: int) -> None:
        await self.fleet.start(node)
        self.up.add(node)
        self.record.ups.setdefault(node, []).append(time.time())
        self.record.online.append((time.time(), len(self.up)))

    async def _exchange_codes(self) -> None:
        async def pair(edge: tuple[int, int]) -> None:
            a, b = edge
            await self.fleet.add_contact(a, self.fleet.code(b))
            await self.fleet.add_contact(b, self.fleet.code(a))

        await self._many(
            pair, list(self.plan.contacts), "contact codes exchanged", EXCHANGES_AT_ONCE
        )

    async def _wait_for_mailboxes(self) -> int:
        """The timeline starts on a network already running: every chatting
        node registered with its mailboxes, as people's nodes that have been
        up for a while are.  Without this the first messages' proofs of work
        queue behind the registrations (the nodes of one process share one
        worker), and the latencies measure the start-up, not delivery.  A
        node that comes back from churn keeps its mailboxes.  How many
        chatting nodes are registered when it starts."""
        want = min(MAILBOXES_EACH, len(self.plan.mailboxes))
        short = list(self.plan.users)
        with trio.move_on_after(REGISTER_WAIT):
            while True:
                short = [n for n in self.plan.users if await self.fleet.registered(n) < want]
                if not short:
                    break
                self.progress(
                    f"{len(self.plan.users) - len(short)}/{len(self.plan.users)}"
                    f" nodes registered with {want} mailboxes"
                )
                await trio.sleep(1.0)
        return len(self.plan.users) - len(short)

    # -- the timeline ------------------------------------------------------------------------------

    def _timeline_items(self) -> list[tuple[float, int, str, Any]]:
        plan = self.plan
        items: list[tuple[float, int, str, Any]] = []
        for o in plan.offline:
            items += [(o.start, 0, "offline", o.node), (o.end, 1, "online", o.node)]
        for k in plan.kills:
            items.append((k.at, 2, "kill", k.node))
        if plan.partition is not None:
            items.append((plan.partition.start, 3, "partition", plan.partition.side))
            items.append((plan.partition.end, 4, "heal", None))
        for s in plan.sends:
            items.append((s.at, 5, "send", s))
        for f in plan.files:
            items.append((f.at, 6, "file", f))
        return sorted(items, key=lambda item: (item[0], item[1]))

    async def _timeline(self) -> None:
        """Each event at its time, in a task of its own, so that a slow stop
        delays nothing else; one node's events still happen in order."""
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for at, _, kind, arg in self._timeline_items():
                await trio.sleep_until(start + at)
                nursery.start_soon(self._event, kind, arg)

    async def _event(self, kind: str, arg: Any) -> None:
        if kind == "send":
            async with self.locks[arg.sender]:
                await self._send(arg)
        elif kind == "file":
            async with self.locks[arg.sender]:
                await self._send_file(arg)
        elif kind == "offline" and arg not in self.dead:
            async with self.locks[arg]:
                await self._read(arg)
                self.up.discard(arg)
                self._online_now("offline", arg)
                await self.fleet.stop(arg)
        elif kind == "online" and arg not in self.dead:
            async with self.locks[arg]:
                await self._start(arg)
            self.log("online", node=self.plan.names[arg], online=len(self.up))
            await self._probe(arg, "back online")
        elif kind == "kill":
            async with self.locks[arg]:
                self.up.discard(arg)
                self.dead.add(arg)
                self._online_now("kill", arg)
                await self.fleet.kill(arg)
        elif kind == "partition":
            await self.fleet.split(set(arg))
            self.record.split = (time.time(), math.inf)
            self.log("partition", side=[self.plan.names[i] for i in arg])
        elif kind == "heal":
            await self.fleet.split(None)
            if self.record.split is not None:
                self.record.split = (self.record.split[0], time.time())
            self.log("heal")

    async def _probe(self, node: int, when: str = "start") -> None:
        """Time a DHT lookup of one of the node's contacts (chosen from the
        seed): the nodes themselves look records up only when they cannot
        ask the contact directly, which may be never in a run."""
        contacts = sorted(
            {b for a, b in self.plan.contacts if a == node}
            | {a for a, b in self.plan.contacts if b == node}
        )
        self.probed[node] = self.probed.get(node, 0) + 1
        rng = random.Random(f"{self.plan.scenario.seed}:{node}:{self.probed[node]}")
        to = rng.choice(contacts)
        fields = {"node": self.plan.names[node], "of": self.plan.names[to], "when": when}
        async with self.locks[node]:
            if node not in self.up:
                return
            try:
                ms, found = await self.fleet.look_up(node, to)
            except Exception as error:
                self.log("lookup_failed", reason=str(error), **fields)
                return
        self.record.probes.append((ms, found))
        self.log("lookup", ms=round(ms, 1), found=found, **fields)

    def _online_now(self, event: str, node: int) -> None:
        self.record.downs.setdefault(node, []).append(time.time())
        self.record.online.append((time.time(), len(self.up)))
        self.log(event, node=self.plan.names[node], online=len(self.up))

    async def _send(self, send: Any) -> None:
        names = self.plan.names
        fields = {"id": send.id, "from": names[send.sender], "to": names[send.recipient]}
        if send.sender not in self.up:
            # The plan only sends from nodes it has online; a node that failed
            # to come back is the one way to get here.
            self.record.failed[send.id] = "the sender's node was not running"
            self.log("send_failed", reason=self.record.failed[send.id], **fields)
            return
        sent_at = time.time()
        try:
            await self.fleet.send(send.sender, send.recipient, send.text)
        except Exception as error:
            self.record.failed[send.id] = str(error)
            self.log("send_failed", reason=str(error), **fields)
            return
        self.record.sent[send.id] = sent_at
        self.log("send", **fields)

    async def _send_file(self, send: FileSend) -> None:
        names = self.plan.names
        fields = {"id": send.id, "from": names[send.sender], "to": names[send.recipient]}
        if send.sender not in self.up:
            self.record.files_failed[send.id] = "the sender's node was not running"
            self.log("file_send_failed", reason=self.record.files_failed[send.id], **fields)
            return
        data = file_content(self.plan.scenario.seed, send)
        sent_at = time.time()
        try:
            await self.fleet.send_file(send.sender, send.recipient, send.name, data)
        except Exception as error:
            self.record.files_failed[send.id] = str(error)
            self.log("file_send_failed", reason=str(error), **fields)
            return
        self.record.files_sent[send.id] = sent_at
        self.log("file_send", bytes=send.size, **fields)

    def _files_open(self) -> int:
        """Files offered whose transfer has not ended at the recipient."""
        return sum(1 for fid in self.record.files_sent if fid not in self.record.file_arrivals)

    async def _explain_missing(self) -> None:
        texts = {s.id: s for s in self.plan.sends}
        for mid in sorted(set(self.record.sent) - set(self.record.arrivals)):
            send = texts[mid]
            if send.sender in self.up:
                said = (await self.fleet.outgoing(send.sender)).get(send.text)
                self.record.missing[mid] = said or "not in the sender's history"
            else:
                self.record.missing[mid] = "the sender's node is gone"
            self.log("missing", id=mid, sender_says=self.record.missing[mid])
        for fid in sorted(set(self.record.files_sent) - set(self.record.file_arrivals)):
            offered = self.planned_files[fid]
            said = "the sender's node is gone"
            if offered.sender in self.up:
                said = "not in the sender's transfers"
                for item in await self.fleet.files(offered.sender):
                    if item["direction"] == "out" and item["name"] == offered.name:
                        said = item["state"] + (f": {item['error']}" if item["error"] else "")
            self.record.files_missing[fid] = said
            self.log("file_missing", id=fid, sender_says=said)

    # -- watching ---------------------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            for node in sorted(self.up):
                async with self.locks[node]:
                    if node in self.up:
                        await self._read(node)
            planned = max(1, len(self.plan.sends))
            done = round(20 * self._delivered() / planned)
            self.progress(
                f"[{'#' * done}{'.' * (20 - done)}] {self._delivered()}/{len(self.plan.sends)}"
                f" delivered, {len(self.record.sent)} sent,{self._files_progress()} {len(self.up)}"
                f"/{len(self.plan.names) - len(self.dead)} online,"
                f" t={time.time() - self.record.started_at:.0f}s"
            )
            await trio.sleep(0.5)

    def _files_progress(self) -> str:
        if not self.plan.files:
            return ""
        return f" files {len(self.record.file_arrivals)}/{len(self.plan.files)},"

    async def _read(self, node: int) -> None:
        if self.plan.files:
            await self._read_files(node)
        for arrival in await self.fleet.arrivals(node):
            mid = message_id(arrival.text)
            if mid is None:
                continue
            if self.recipient.get(mid) != node:
                self.record.misdelivered += 1
                continue
            copies = self.record.arrivals.setdefault(mid, [])
            copies.append(arrival)
            sent = self.record.sent.get(mid)
            latency = None if sent is None else round((arrival.received_at - sent) * 1000, 1)
            self.log(
                "deliver",
                id=mid,
                to=self.plan.names[node],
                via=arrival.via,
                received_at=round(arrival.received_at, 3),
                latency_ms=latency,
                copy=len(copies),
            )

    async def _read_files(self, node: int) -> None:
        """Incoming transfers that ended since the last look: the file's bytes
        are checked against what was sent, and it counts from when its last
        byte was written."""
        for item in await self.fleet.files(node):
            if item["direction"] != "in" or item["state"] not in ENDED:
                continue
            fid = file_id(str(item["name"]))
            if fid is None or item["id"] in self.ended_transfers:
                continue
            self.ended_transfers.add(item["id"])
            send = self.planned_files.get(fid)
            if send is None or send.recipient != node:
                self.record.misdelivered += 1
                continue
            received_at, intact = time.time(), False
            if item["state"] == "done" and item["path"]:
                path = Path(item["path"])
                expected = hashlib.sha256(file_content(self.plan.scenario.seed, send)).digest()
                try:
                    intact = hashlib.sha256(path.read_bytes()).digest() == expected
                    received_at = path.stat().st_mtime
                except OSError:
                    intact = False
            arrival = FileArrival(item["state"], received_at, intact, item["error"])
            copies = self.record.file_arrivals.setdefault(fid, [])
            copies.append(arrival)
            sent = self.record.files_sent.get(fid)
            self.log(
                "file_deliver" if arrival.state == "done" else "file_failed",
                id=fid,
                to=self.plan.names[node],
                state=arrival.state,
                intact=intact,
                error=arrival.error,
                latency_ms=None if sent is None else round((received_at - sent) * 1000, 1),
                copy=len(copies),
            )

    def _delivered(self) -> int:
        return len(self.record.arrivals)
