"""A network of Linux network namespaces for ``pigeon sim --netns`` (root only).

One namespace, the hub, holds two bridges; every node gets a namespace of
its own with one veth pair to the hub and an address in 10.77.0.0/16.  All
ports start on the first bridge.  A partition moves one side's ports to the
second bridge: two separate segments, so packets across really go nowhere
and peers notice only by timeouts, as on a real network.  Nothing is made
in the machine's own namespace, and everything is removed at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

from .scenario import ScenarioError

SUBNET = "10.77"


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

    def remove(self) -> None:
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made.clear()
