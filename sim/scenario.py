"""What a simulation does, decided before any node starts.

A ``Scenario`` is what the user asked for (``pigeon sim`` options); ``plan()``
turns it, with its seed and nothing else, into a ``Plan``: who the mailbox
peers are, who adds whom as a contact, every message (when, from whom, to
whom, its text), every offline period, every mailbox killed and the
partition.  The same scenario gives the same plan, byte for byte, so its
``digest()`` names the workload in the report; where the nodes run (one
process, many, network namespaces) does not enter into it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass


class ScenarioError(ValueError):
    """Options that do not make a simulation; the message says which and why."""


@dataclass(frozen=True)
class Scenario:
    nodes: int = 20
    mailboxes: int = 3
    messages: int = 200
    churn: float = 0.3  # fraction of the nodes that are not mailboxes going offline once
    seed: int = 1
    contacts: int = 3  # contacts each node adds at least (the graph is made symmetric)
    duration: float = 60.0  # seconds over which messages are sent and nodes churn
    kill_mailboxes: int = 0  # mailbox peers killed (kill -9) mid-run, never back
    partition: float = 0.0  # seconds the network is split in two, 0 for never
    settle: float = 120.0  # seconds allowed after the workload for the last deliveries
    mailbox_interval: float = 30.0  # how often nodes collect from their mailboxes (as a daemon)
    files: int = 0  # small files sent between contacts, peer to peer (WebRTC)
    latency: float = 0.0  # ms added to every packet between two nodes (--netns only)
    loss: float = 0.0  # fraction of those packets dropped (--netns only)

    def check(self) -> None:
        users = self.nodes - self.mailboxes
        if self.mailboxes < 1:
            raise ScenarioError("--mailboxes must be at least 1 (they are the bootstrap peers)")
        if users < 2:
            raise ScenarioError(
                f"--nodes {self.nodes} with --mailboxes {self.mailboxes} leaves {users} node(s)"
                " to chat: at least 2 are needed"
            )
        if users > 1000:
            raise ScenarioError("--nodes: at most 1000 chatting nodes")
        if not 1 <= self.contacts < users:
            raise ScenarioError(f"--contacts must be from 1 to {users - 1} (the other nodes)")
        if self.messages < 0:
            raise ScenarioError("--messages cannot be negative")
        if not 0 <= self.files <= 1000:
            raise ScenarioError("--files must be from 0 to 1000")
        if not 0 <= self.churn <= 1:
            raise ScenarioError("--churn is a fraction from 0 to 1 (0.3 for 30%)")
        if not 0 <= self.kill_mailboxes <= self.mailboxes:
            raise ScenarioError(f"--kill-mailboxes must be from 0 to {self.mailboxes}")
        if self.duration < 5:
            raise ScenarioError("--duration must be at least 5 seconds")
        if self.partition < 0 or self.partition > 0.7 * self.duration:
            raise ScenarioError(
                f"--partition {self.partition:g}s does not fit in --duration {self.duration:g}s:"
                f" give a duration of at least {self.partition / 0.7:.0f}s"
            )
        if self.settle <= 0 or self.mailbox_interval <= 0:
            raise ScenarioError("--settle and --mailbox-interval must be positive")
        if not 0 <= self.latency <= 2000:
            raise ScenarioError("--latency must be from 0 to 2000 ms")
        if not 0 <= self.loss <= 0.5:
            raise ScenarioError("--loss must be from 0% to 50%")

    def check_mode(self, mode: str) -> None:
        """Refuse, before anything starts, what ``mode`` cannot do."""
        if mode == "netns" and os.geteuid() != 0:
            raise ScenarioError("--netns needs root (it creates network namespaces)")
        if self.partition and mode == "processes":
            raise ScenarioError(
                "--partition with --processes needs --netns (as root): processes on one"
                " loopback cannot be split; or run it in one process (without --processes)"
            )
        if (self.latency or self.loss) and mode != "netns":
            raise ScenarioError(
                "--latency and --loss need --processes --netns (as root): they act on the"
                " packets between network namespaces"
            )


@dataclass(frozen=True)
class Send:
    at: float  # seconds after the workload starts
    sender: int
    recipient: int
    id: str
    text: str


@dataclass(frozen=True)
class FileSend:
    at: float
    sender: int
    recipient: int
    id: str  # also the file's name, with ".bin"
    size: int

    @property
    def name(self) -> str:
        return f"{self.id}.bin"


@dataclass(frozen=True)
class Offline:
    node: int
    start: float
    end: float


@dataclass(frozen=True)
class Kill:
    at: float
    node: int


@dataclass(frozen=True)
class Partition:
    start: float
    end: float
    side: tuple[int, ...]  # the nodes on one side; every other node is on the other


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    names: tuple[str, ...]
    mailboxes: tuple[int, ...]
    contacts: tuple[tuple[int, int], ...]  # each pair adds each other
    users: tuple[int, ...]
    sends: tuple[Send, ...]
    offline: tuple[Offline, ...]
    kills: tuple[Kill, ...]
    partition: Partition | None
    files: tuple[FileSend, ...] = ()

    def digest(self) -> str:
        """SHA-256 of the workload (everything but the run's own settings)."""
        workload = asdict(self)
        del workload["scenario"]
        if not self.files:
            del workload["files"]  # so that a workload without files keeps its digest
        text = json.dumps(workload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def online_at(self, node: int, at: float) -> bool:
        if any(k.node == node and k.at <= at for k in self.kills):
            return False
        return not any(o.node == node and o.start <= at < o.end for o in self.offline)


FILE_SIZES = (16 * 1024, 192 * 1024)  # smallest and largest file, bytes

WORDS = (
    "pigeon", "carries", "the", "note", "over", "hills", "rivers", "roofs", "and", "fields",
    "to", "a", "friend", "who", "waits", "for", "news", "from", "home", "about", "garden",
    "weather", "plans", "spring",
)  # fmt: skip


def plan(scenario: Scenario) -> Plan:
    scenario.check()
    rng = random.Random(scenario.seed)
    s = scenario
    width = len(str(s.nodes - 1))
    names = tuple(f"box{i}" if i < s.mailboxes else f"n{i:0{width}d}" for i in range(s.nodes))
    mailboxes = tuple(range(s.mailboxes))
    users = tuple(range(s.mailboxes, s.nodes))

    pairs: set[tuple[int, int]] = set()
    for user in users:
        others = [u for u in users if u != user]
        for other in rng.sample(others, s.contacts):
            pairs.add((min(user, other), max(user, other)))
    contacts = tuple(sorted(pairs))

    d = s.duration
    offline = []
    for node in sorted(rng.sample(users, round(s.churn * len(users)))):
        start = round(rng.uniform(0.05 * d, 0.7 * d), 3)
        end = round(min(start + rng.uniform(0.1 * d, 0.25 * d), 0.9 * d), 3)
        offline.append(Offline(node, start, end))
    kills = tuple(
        Kill(round(rng.uniform(0.3 * d, 0.6 * d), 3), node)
        for node in sorted(rng.sample(mailboxes, s.kill_mailboxes))
    )
    partition = None
    if s.partition > 0:
        everyone = list(range(s.nodes))
        rng.shuffle(everyone)
        start = round(0.15 * d, 3)
        partition = Partition(
            start, round(start + s.partition, 3), tuple(sorted(everyone[: s.nodes // 2]))
        )
    base = Plan(s, names, mailboxes, contacts, users, (), tuple(offline), kills, partition)

    def pick() -> tuple[float, int, int]:
        """A time and a contact pair whose sender is online then (people send
        from a running node)."""
        while True:
            at = round(rng.uniform(0, 0.8 * d), 3)
            for _ in range(100):
                a, b = rng.choice(contacts)
                if rng.random() < 0.5:
                    a, b = b, a
                if base.online_at(a, at):
                    return at, a, b
                if base.online_at(b, at):
                    return at, b, a

    sends = []
    for number in range(s.messages):
        at, sender, recipient = pick()
        message_id = f"m{number:05d}"
        filler = " ".join(rng.choices(WORDS, k=rng.randint(1, 30)))
        sends.append(Send(at, sender, recipient, message_id, f"sim {message_id}: {filler}"))
    ordered = tuple(sorted(sends, key=lambda x: (x.at, x.id)))
    # Files are drawn after the messages: adding them changes no message.
    files = []
    for number in range(s.files):
        at, sender, recipient = pick()
        size = rng.randint(FILE_SIZES[0], FILE_SIZES[1])
        files.append(FileSend(at, sender, recipient, f"f{number:04d}", size))
    return Plan(
        s,
        names,
        mailboxes,
        contacts,
        users,
        ordered,
        tuple(offline),
        kills,
        partition,
        tuple(sorted(files, key=lambda x: (x.at, x.id))),
    )


def file_content(seed: int, send: FileSend) -> bytes:
    """A planned file's bytes: the same for the same seed, different for each file."""
    return random.Random(f"{seed}:{send.id}").randbytes(send.size)


def file_id(name: str) -> str | None:
    """The plan's ID in a simulated file's name (``f0003.bin``)."""
    if len(name) == 9 and name.startswith("f") and name.endswith(".bin") and name[1:5].isdigit():
        return name[:5]
    return None


def message_id(text: str) -> str | None:
    """The plan's ID in a simulated message's text (``sim m00012: ...``)."""
    if text.startswith("sim m") and text[10:12] == ": ":
        return text[4:10]
    return None
