"""Network namespaces that tests create (root only; CI runs as root), so
that a daemon can listen on every interface, or sit behind a NAT, without
touching the machine's own network."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="network namespaces need root and iproute2 (CI runs as root)",
)


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")


@contextlib.contextmanager
def namespace(*addresses: str) -> Iterator[list[str]]:
    """A namespace with loopback up and one interface holding ``addresses``
    (CIDR, IPv4 or IPv6); yields the prefix that runs a command in it."""
    name = f"pgt-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends inside (the dummy type needs a kernel
        # module this machine may not have).
        ip("-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        ip("-n", name, "link", "set", "eth1", "up")
        for address in addresses:
            extra = ["nodad"] if ":" in address else []  # usable at once, not "tentative"
            ip("-n", name, "addr", "add", address, "dev", "eth0", *extra)
        ip("-n", name, "link", "set", "eth0", "up")
        yield ["ip", "netns", "exec", name]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def _in(name: str, *command: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", name, *command], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} in {name} failed: {result.stderr.strip()}")


class NatNetwork:
    """ "The internet" (198.51.100.0/24, a bridge in a namespace of its own,
    whose own address 198.51.100.1 public daemons listen on) and homes, each
    a namespace behind a router namespace that masquerades its 10.0.N.0/24
    and drops whatever arrives unsolicited, as home routers do.

    A "cone" router keeps a connection's source port where it can
    (endpoint-independent mapping: a hole punch can work); a "symmetric"
    one picks a random port for every connection (``--random-fully``: it
    cannot).  Needs iptables (``.ci/run`` installs it)."""

    PUBLIC_IP = "198.51.100.1"

    def __init__(self, homes: dict[str, str], hop_ms: float = 0.0) -> None:
        """``hop_ms``: a delay on every packet at each hop (needs the
        kernel's br_netfilter; NFQUEUE, as ``pigeon sim --latency``): a
        home's router, and "the internet" for what it forwards between
        homes and what goes in and out of its own daemons (a relay is a
        hop of its own).  One way between two homes is three hops directly
        and four through a relay."""
        self.tag = uuid.uuid4().hex[:6]
        self.homes = homes
        self.hop_ms = hop_ms
        self.delayers: list[subprocess.Popen[bytes]] = []
        self.routers: list[str] = []
        self.made: list[str] = []
        self.inet = self._add("inet")
        self.public = ["ip", "netns", "exec", self.inet]
        self.wan: dict[str, str] = {}  # home -> its router's public address
        self.lan: dict[str, str] = {}  # home -> the address of the machine in it
        self._inside: dict[str, list[str]] = {}

    def _add(self, role: str) -> str:
        name = f"pgn-{self.tag}-{role}"
        ip("netns", "add", name)
        self.made.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def __enter__(self) -> NatNetwork:
        try:
            ip("-n", self.inet, "link", "add", "br0", "type", "bridge")
            ip("-n", self.inet, "addr", "add", f"{self.PUBLIC_IP}/24", "dev", "br0")
            ip("-n", self.inet, "link", "set", "br0", "up")
            # Beyond "the internet", a router that forwards nothing: what is
            # sent to an address no one here has (a home's private address)
            # is dropped silently, as on the internet, instead of failing at
            # once with "network unreachable" (which makes coturn close the
            # TURN allocation that sent it).
            void = self._add("void")
            ip(
                "link",
                "add",
                "edge",
                "netns",
                self.inet,
                "type",
                "veth",
                "peer",
                "edge",
                "netns",
                void,
            )
            ip("-n", self.inet, "addr", "add", "203.0.113.1/30", "dev", "edge")
            ip("-n", void, "addr", "add", "203.0.113.2/30", "dev", "edge")
            ip("-n", self.inet, "link", "set", "edge", "up")
            ip("-n", void, "link", "set", "edge", "up")
            ip("-n", self.inet, "route", "add", "default", "via", "203.0.113.2")
            for number, (home, kind) in enumerate(self.homes.items(), start=1):
                self._home(number, home, kind)
            if self.hop_ms:
                self._delay()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _home(self, number: int, home: str, kind: str) -> None:
        router, inside = self._add(f"r{number}"), self._add(f"h{number}")
        self.routers.append(router)
        wan, lan = f"198.51.100.{10 * number}", f"10.0.{number}"
        ip(
            "link",
            "add",
            "wan",
            "netns",
            router,
            "type",
            "veth",
            "peer",
            f"p{number}",
            "netns",
            self.inet,
        )
        ip("-n", self.inet, "link", "set", f"p{number}", "master", "br0", "up")
        ip("-n", router, "addr", "add", f"{wan}/24", "dev", "wan")
        ip("-n", router, "link", "set", "wan", "up")
        ip("link", "add", "lan", "netns", router, "type", "veth", "peer", "eth0", "netns", inside)
        ip("-n", router, "addr", "add", f"{lan}.1/24", "dev", "lan")
        ip("-n", router, "link", "set", "lan", "up")
        ip("-n", inside, "addr", "add", f"{lan}.2/24", "dev", "eth0")
        ip("-n", inside, "link", "set", "eth0", "up")
        ip("-n", inside, "route", "add", "default", "via", f"{lan}.1")
        _in(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        masquerade = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE"]
        _in(router, *masquerade, *(["--random-fully"] if kind == "symmetric" else []))
        for chain in ("INPUT", "FORWARD"):
            _in(router, "iptables", "-A", chain, "-i", "wan", "-m", "conntrack",
                "--ctstate", "NEW,INVALID", "-j", "DROP")  # fmt: skip
        self.wan[home], self.lan[home] = wan, f"{lan}.2"
        self._inside[home] = ["ip", "netns", "exec", inside]

    def _delay(self) -> None:
        from pigeon.sim.netns import BRIDGE_FILTER, start_delayer

        if not os.path.exists(BRIDGE_FILTER):
            subprocess.run(["modprobe", "br_netfilter"], capture_output=True, timeout=30)
        _in(self.inet, "sh", "-c", f"echo 1 > {BRIDGE_FILTER}")  # bridged packets see FORWARD
        queue = ["-j", "NFQUEUE", "--queue-num", "0"]
        _in(self.inet, "iptables", "-A", "FORWARD", *queue)
        _in(self.inet, "iptables", "-A", "INPUT", "-i", "br0", *queue)
        _in(self.inet, "iptables", "-A", "OUTPUT", "-o", "br0", *queue)
        for router in self.routers:
            _in(router, "iptables", "-A", "FORWARD", *queue)  # after the router's DROPs
        for name in [self.inet, *self.routers]:
            self.delayers.append(start_delayer(["ip", "netns", "exec", name], self.hop_ms))

    def home(self, name: str) -> list[str]:
        """The prefix that runs a command in home ``name``."""
        return self._inside[name]

    def remove(self) -> None:
        for delayer in self.delayers:
            delayer.kill()
            delayer.communicate(timeout=30)
        self.delayers = []
        for name in reversed(self.made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        self.made = []


needs_nat = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("iptables") is None,
    reason="a NAT in network namespaces needs root, iproute2 and iptables (CI runs as root)",
)
