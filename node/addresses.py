"""Where a daemon listens by default, and which of its addresses it tells
others (docs/NETWORK.md).

By default a daemon listens on every interface, IPv4 and IPv6, on one TCP
port chosen at its first start and kept in its database: a port that moves
at each restart breaks a router's port forwarding and makes every address a
contact holds stale.

What it tells others (its directory record, its contact code, identify) is
only what someone else could dial: an address it listens on by name is told
as it is (listening on 127.0.0.1 by name is asking for loopback), and a
wildcard listener is told as the machine's interface addresses without the
loopback and link-local ones, which name another machine from anywhere
else.  Addresses found to be reachable from outside (``reach.py``) and
relayed addresses come on top.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Iterable

import multiaddr
import psutil

from .host import ListenError
from .storage import Database

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
PORT_KEY = "listen_port"
PICK_TRIES = 20  # free IPv4 ports tried for one free on IPv6 too


def interface_addresses() -> list[IPAddress]:
    """Every address of this machine's interfaces (scope IDs dropped)."""
    found: list[IPAddress] = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                ip = ipaddress.ip_address(entry.address.split("%")[0])
                if ip not in found:
                    found.append(ip)
    return found


def dialable(ip: IPAddress) -> bool:
    """Whether another machine could reach us at ``ip``."""
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def ipv6_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def _free_on(family: socket.AddressFamily, host: str, port: int) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _pick_port(v6: bool) -> int:
    """A port free on every IPv4 address, and on every IPv6 one if ``v6``."""
    for _ in range(PICK_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("0.0.0.0", 0))
            port = int(probe.getsockname()[1])
        if not v6 or _free_on(socket.AF_INET6, "::", port):
            return port
    raise ListenError("cannot find a TCP port free on both IPv4 and IPv6; choose one with --listen")


def default_listen(db: Database) -> list[str]:
    """Every interface, IPv4 and IPv6 (where the machine has it), on this
    node's port: the one kept since its first start, or a free one now
    (then kept)."""
    v6 = ipv6_available()
    stored = db.get_meta(PORT_KEY)
    if stored is None:
        port = _pick_port(v6)
        with db.transaction():
            db.set_meta(PORT_KEY, str(port).encode())
    else:
        port = int(stored.decode())
        if not _free_on(socket.AF_INET, "0.0.0.0", port) or (
            v6 and not _free_on(socket.AF_INET6, "::", port)
        ):
            raise ListenError(
                f"cannot listen on TCP port {port}, this node's port since its first start"
                " (contacts and routers know it): another program uses it; stop that"
                " program, or start with --listen /ip4/0.0.0.0/tcp/PORT for another port"
            )
    listen = [f"/ip4/0.0.0.0/tcp/{port}"]
    if v6:
        listen.append(f"/ip6/::/tcp/{port}")
    return listen


def published(
    listening: Iterable[multiaddr.Multiaddr],
    interfaces: Callable[[], list[IPAddress]] = interface_addresses,
) -> list[str]:
    """What to tell others of the addresses we listen on (with their real
    ports): named addresses as they are, wildcards as the interfaces'
    dialable addresses of the same family (``interfaces`` is asked only
    when there is a wildcard); IPv4 first, as the host's listeners may start
    in either order."""
    told: list[str] = []
    known: list[IPAddress] | None = None
    for address in listening:
        family, text, _, port = str(address).split("/")[1:5]
        ip = ipaddress.ip_address(text)
        if ip.is_unspecified:
            known = interfaces() if known is None else known
            chosen = [i for i in known if i.version == ip.version and dialable(i)]
        else:
            chosen = [ip]
        for each in chosen:
            entry = f"/{family}/{each}/tcp/{port}"
            if entry not in told:
                told.append(entry)
    return sorted(told, key=lambda entry: entry.startswith("/ip6/"))
