"""A network of Linux network namespaces for ``pigeon sim --netns`` (root only).

One namespace, the hub, holds two bridges; every node gets a namespace of
its own with one veth pair to the hub and an address in 10.77.0.0/16.  All
ports start on the first bridge.  A partition moves one side's ports to the
second bridge: two separate segments, so packets across really go nowhere
and peers notice only by timeouts, as on a real network.  With a latency or
a loss, every packet that crosses the hub is delayed or dropped there
(wan.py says how, and why not netem).  Nothing is made in the machine's own
namespace, and everything is removed at the end.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import uuid
from typing import Any

from .scenario import ScenarioError

SUBNET = "10.77"
BRIDGE_FILTER = "/proc/sys/net/bridge/bridge-nf-call-iptables"
DELAYER_READY_S = 15.0


def address(node: int) -> str:
    return f"{SUBNET}.{node // 250}.{node % 250 + 1}"


class Namespaces:
    def __init__(self, count: int) -> None:
        if os.geteuid() != 0:
            raise ScenarioError("--netns needs root (it creates network namespaces)")
        if shutil.which("ip") is None:
            raise ScenarioError("--netns needs the ip command (iproute2)")
        self.tag = uuid.uuid4().hex[:6]
        self.hub = f"pgs-{self.tag}-hub"
        self.names = [f"pgs-{self.tag}-{i}" for i in range(count)]
        self.made: list[str] = []
        self.delayer: subprocess.Popen[bytes] | None = None
        self.shaped = False

    def _ip(self, *args: str) -> None:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise ScenarioError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")

    def create(self) -> None:
        try:
            self._ip("netns", "add", self.hub)
            self.made.append(self.hub)
            for bridge in ("br0", "br1"):
                self._ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
                self._ip("-n", self.hub, "link", "set", bridge, "up")
            for node, name in enumerate(self.names):
                self._ip("netns", "add", name)
                self.made.append(name)
                port = f"p{node}"
                self._ip(
                    "-n", self.hub, "link", "add", port, "type", "veth",
                    "peer", "name", "eth0", "netns", name,
                )  # fmt: skip
                self._ip("-n", self.hub, "link", "set", port, "master", "br0", "up")
                self._ip("-n", name, "addr", "add", f"{address(node)}/16", "dev", "eth0")
                self._ip("-n", name, "link", "set", "eth0", "up")
                self._ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.remove()
            raise

    def command(self, node: int) -> list[str]:
        """The prefix that runs a command inside a node's namespace."""
        return ["ip", "netns", "exec", self.names[node]]

    def split(self, side: set[int] | None) -> None:
        """Put ``side``'s ports on the second bridge (None: everyone on the first)."""
        for node in range(len(self.names)):
            bridge = "br1" if side is not None and node in side else "br0"
            self._ip("-n", self.hub, "link", "set", f"p{node}", "master", bridge)

    def _in_hub(self, *command: str) -> str:
        result = subprocess.run(
            ["ip", "netns", "exec", self.hub, *command], capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise ScenarioError(f"{' '.join(command)} in the hub failed: {result.stderr.strip()}")
        return result.stdout

    def shape(self, latency_ms: float, loss: float) -> None:
        """Delay every packet crossing the hub by ``latency_ms`` and drop
        the fraction ``loss`` of them (after ``create``)."""
        if not latency_ms and not loss:
            return
        if shutil.which("iptables") is None:
            raise ScenarioError("--latency and --loss need iptables (apt-get install iptables)")
        if not os.path.exists(BRIDGE_FILTER):
            subprocess.run(["modprobe", "br_netfilter"], capture_output=True, timeout=30)
        try:
            self._in_hub("sh", "-c", f"echo 1 > {BRIDGE_FILTER}")
        except ScenarioError:
            raise ScenarioError(
                "--latency and --loss need the kernel's br_netfilter (bridged packets through"
                " iptables): modprobe br_netfilter"
            ) from None
        if loss:
            self._in_hub(
                "iptables", "-A", "FORWARD", "-m", "statistic", "--mode", "random",
                "--probability", f"{loss:.6f}", "-j", "DROP",
            )  # fmt: skip
        if latency_ms:
            self.delayer = start_delayer(self._hub_prefix(), latency_ms)
            self._in_hub("iptables", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0")
        self.shaped = True

    def _hub_prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.hub]

    def counters(self) -> dict[str, Any]:
        """Packets the hub delayed and dropped so far (empty when not shaped)."""
        if not self.shaped:
            return {}
        counts = {"delayed": 0, "dropped": 0}
        for line in self._in_hub("iptables", "-n", "-v", "-x", "-L", "FORWARD").splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[0].isdigit():
                if fields[2] == "NFQUEUE":
                    counts["delayed"] += int(fields[0])
                elif fields[2] == "DROP":
                    counts["dropped"] += int(fields[0])
        return counts

    def remove(self) -> None:
        if self.delayer is not None:
            self.delayer.kill()
            self.delayer.communicate(timeout=30)  # and closes its pipes
            self.delayer = None
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()


def start_delayer(prefix: list[str], latency_ms: float) -> subprocess.Popen[bytes]:
    """The packet delayer (wan.py) in the namespace ``prefix`` runs in,
    holding what its NFQUEUE rules queue for ``latency_ms``; it stops when
    killed."""
    delayer = subprocess.Popen(
        [*prefix, sys.executable, "-m", "pigeon.sim.wan", f"{latency_ms:g}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert delayer.stdout is not None and delayer.stderr is not None
    ready, _, _ = select.select([delayer.stdout], [], [], DELAYER_READY_S)
    line = delayer.stdout.readline() if ready else b""
    if line.strip() != b"ready":
        delayer.kill()
        said = delayer.communicate(timeout=10)[1].decode(errors="replace").strip()
        last = said.splitlines()[-1] if said else "no answer"
        raise ScenarioError(f"the packet delayer (NFQUEUE) did not start: {last}")
    return delayer
