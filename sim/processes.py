"""``ProcessFleet``: every node a ``pigeon daemon`` subprocess, driven over its
control socket as the command line drives it.

Each daemon listens on its own loopback address (127.1.x.y) and keeps its
port across restarts; with ``netns``, each runs in a network namespace of
its own on a bridge (netns.py), at 10.77.x.y port 4001.  Stopping a node is
SIGTERM (the daemon's graceful stop); killing one is SIGKILL.  The homes are
created here with the cheaper of the database's two key-derivation settings
(as ``pigeon demo`` does), so a daemon's start costs what it costs, not a
256 MiB Argon2id run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from pigeon.node.control import Client
from pigeon.node.conversations import Conversations
from pigeon.node.storage import Database
from pigeon.protocol import PigeonError

from .fleet import (
    PASSPHRASE,
    Arrival,
    EarlierRuns,
    Usage,
    loopback_address,
    outgoing,
    outgoing_file,
    peak_kb,
    to_arrival,
)
from .netns import Namespaces
from .netns import address as netns_address

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class ProcessFleet:
    def __init__(
        self,
        root: Path,
        names: tuple[str, ...],
        mailboxes: tuple[int, ...],
        mailbox_interval: float,
        *,
        netns: bool = False,
        latency: float = 0.0,
        loss: float = 0.0,
    ) -> None:
        self.namespaces: Namespaces | None = None
        self.wan: dict[str, Any] = {}
        if netns:
            self.namespaces = Namespaces(len(names))
            self.namespaces.create()
            try:
                self.namespaces.shape(latency, loss)
            except BaseException:
                self.namespaces.remove()
                raise
        self.root = root
        self.names = names
        self.mailboxes = set(mailboxes)
        self.mailbox_interval = mailbox_interval
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.ports: dict[int, int] = {}
        self.codes: dict[int, str] = {}
        self.bootstrap: dict[int, str] = {}
        self.addresses: dict[int, str] = {}  # each node's first address, with /p2p/
        self.seen: dict[int, int] = {}
        self.earlier = EarlierRuns()
        self.peak_kb: dict[int, int] = {}
        self.created: set[int] = set()

    def home(self, node: int) -> Path:
        return self.root / self.names[node]

    async def _call(self, node: int, cmd: str, **args: Any) -> dict[str, Any]:
        def call() -> dict[str, Any]:
            client = Client(self.home(node), timeout=30)
            try:
                return client.request(cmd, **args)
            finally:
                client.close()

        return await trio.to_thread.run_sync(call)

    async def start(self, node: int) -> None:
        home = self.home(node)
        if node not in self.created:
            db = Database.create(home, PASSPHRASE, fast_kdf=True)
            try:
                Conversations.initialise(db, self.names[node], os.urandom)
            finally:
                db.close()
            self.created.add(node)
        prefix, listen = [], f"/ip4/{loopback_address(node)}/tcp/{self.ports.get(node, 0)}"
        if self.namespaces is not None:
            prefix, listen = self.namespaces.command(node), f"/ip4/{netns_address(node)}/tcp/4001"
        args = [
            *prefix,
            sys.executable,
            "-m",
            "pigeon.ui.cli",
            "--home",
            str(home),
            "daemon",
            "--listen",
            listen,
            "--mailbox-interval",
            str(self.mailbox_interval),
        ]
        for other, address in sorted(self.bootstrap.items()):
            if other != node:
                args += ["--bootstrap", address]
        if node in self.mailboxes:
            args.append("--mailbox")
        env = {**os.environ, "PIGEON_PASSPHRASE": PASSPHRASE}
        with (self.root / f"{self.names[node]}.log").open("ab") as log:
            process = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        self.processes[node] = process
        try:
            info = await self._ready(node, process)
        except PigeonError:
            self.processes.pop(node)
            if process.poll() is None:
                process.kill()
                await trio.to_thread.run_sync(process.wait)
            if self.namespaces is None and self.ports.pop(node, 0):
                await self.start(node)  # its old port is taken meanwhile: anywhere else
                return
            raise
        self.codes[node] = str(info["contact_code"])
        address = str(info["addresses"][0])
        self.ports[node] = int(address.split("/")[4])
        self.addresses[node] = address
        if node in self.mailboxes:
            self.bootstrap[node] = address

    async def _ready(self, node: int, process: subprocess.Popen[bytes]) -> dict[str, Any]:
        deadline = trio.current_time() + READY_TIMEOUT
        while trio.current_time() < deadline:
            if process.poll() is not None:
                raise PigeonError(
                    f"the daemon of {self.names[node]} exited with {process.returncode}"
                    f" (see {self.root / self.names[node]}.log)"
                )
            try:
                return await self._call(node, "id")
            except PigeonError:
                await trio.sleep(0.2)
        raise PigeonError(f"the daemon of {self.names[node]} did not start in time")

    async def _end(self, node: int, how: signal.Signals) -> None:
        process = self.processes.pop(node)
        self._sample(node, process)
        if how == signal.SIGTERM:
            with contextlib.suppress(PigeonError):  # a daemon that no longer answers
                self.earlier.keep(node, await self._call(node, "metrics"))
        process.send_signal(how)
        try:
            await trio.to_thread.run_sync(process.wait, STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            await trio.to_thread.run_sync(process.wait)

    async def stop(self, node: int) -> None:
        await self._end(node, signal.SIGTERM)

    async def kill(self, node: int) -> None:
        await self._end(node, signal.SIGKILL)
        self.bootstrap.pop(node, None)

    def code(self, node: int) -> str:
        return self.codes[node]

    async def add_contact(self, node: int, code: str) -> None:
        await self._call(node, "contacts.add", code=code)

    async def send(self, node: int, to: int, text: str) -> None:
        await self._call(node, "send", contact=self.names[to], text=text)

    async def arrivals(self, node: int) -> list[Arrival]:
        self._sample(node, self.processes[node])
        reply = await self._call(node, "inbox", after=self.seen.get(node, 0))
        rows: list[dict[str, Any]] = reply["messages"]
        if rows:
            self.seen[node] = max(int(r["seq"]) for r in rows)
        return [to_arrival(node, r) for r in rows if r["direction"] == "in"]

    async def outgoing(self, node: int) -> dict[str, str]:
        return outgoing((await self._call(node, "inbox"))["messages"])

    async def registered(self, node: int) -> int:
        return len((await self._call(node, "status"))["mailboxes"])

    async def accept_files(self, node: int, max_bytes: int) -> None:
        await self._call(node, "files.auto_accept", max_bytes=max_bytes)

    async def send_file(self, node: int, to: int, name: str, data: bytes) -> None:
        source = outgoing_file(self.home(node), name, data)
        await self._call(node, "files.send", contact=self.names[to], path=str(source))

    async def files(self, node: int) -> list[dict[str, Any]]:
        files: list[dict[str, Any]] = (await self._call(node, "files.list"))["files"]
        return files

    async def look_up(self, node: int, to: int) -> tuple[float, bool]:
        reply = await self._call(node, "lookup", contact=self.names[to])
        return float(reply["ms"]), bool(reply["found"])

    async def metrics(self, node: int) -> dict[str, object]:
        running = node in self.processes
        current = await self._call(node, "metrics") if running else None
        return self.earlier.total(node, current)

    async def split(self, side: set[int] | None) -> None:
        assert self.namespaces is not None, "refused at construction"
        await trio.to_thread.run_sync(self.namespaces.split, side)

    def _sample(self, node: int, process: subprocess.Popen[bytes]) -> None:
        """The process's peak resident memory so far, kept per node."""
        self.peak_kb[node] = max(self.peak_kb.get(node, 0), peak_kb(process.pid))

    def settled(self) -> None:
        """Each node is a process of its own, with a collector of its own."""

    def usage(self) -> Usage:
        """Peak RSS: the sum of every daemon's own peak and this process's;
        CPU: every daemon's (all have ended) and this process's."""
        me = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
        peak_mb = (sum(self.peak_kb.values()) + me.ru_maxrss) / 1024
        return Usage(round(peak_mb, 1), round(cpu, 2), self.wan)

    async def close(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for node in list(self.processes):
                    nursery.start_soon(self.stop, node)
        finally:
            if self.namespaces is not None:
                try:
                    self.wan = self.namespaces.counters()
                finally:
                    self.namespaces.remove()
