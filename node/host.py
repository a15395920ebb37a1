"""The libp2p host: Noise only (no plaintext, secio or TLS), yamux, a device
key persisted as a 32-byte seed so the peer ID is stable, over TCP that
counts the bytes it carries (``Wire``)."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, IMuxedStream, INetConn
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import THandler
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.auto_connector import AutoConnector
from libp2p.network.config import ConnectionConfig
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.network.connection.swarm_connection import SwarmConn
from libp2p.network.connection_pruner import ConnectionPruner
from libp2p.network.stream.net_stream import NetStream
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream
from libp2p.transport.exceptions import OpenConnectionError
from libp2p.transport.tcp.tcp import TCP, TCPListener

from pigeon.protocol import PigeonError

from .dialing import Dialer

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "/ip4/127.0.0.1/tcp/0"
LISTEN_FORMS = "/ip4/ADDRESS/tcp/PORT or /ip6/ADDRESS/tcp/PORT (e.g. /ip4/0.0.0.0/tcp/4001)"


class ListenError(PigeonError):
    """A --listen address that cannot be used."""


def listen_addresses(values: Iterable[str]) -> list[multiaddr.Multiaddr]:
    """Turn --listen strings into multiaddrs the host can really listen on.

    Only TCP over IPv4 or IPv6: the host has no other listening transport, and
    py-libp2p skips an address it cannot serve without saying so.  Each address
    is bound once here so that a port in use, an address this machine does
    not have or a privileged port is one clear error before anything starts.
    """
    addresses: list[multiaddr.Multiaddr] = []
    for value in values:
        address = _parse_listen(value)
        _probe(address)
        if address not in addresses:
            addresses.append(address)
    return addresses


def _parse_listen(value: str) -> multiaddr.Multiaddr:
    parts = value.split("/")
    if len(parts) != 5 or parts[0] or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp":
        raise ListenError(
            f"cannot listen on {value!r}: Pigeon listens on TCP only: use {LISTEN_FORMS}"
        )
    family, text, port_text = parts[1], parts[2], parts[4]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        ip = None
    if ip is None or ip.version != (4 if family == "ip4" else 6):
        kind = "IPv4" if family == "ip4" else "IPv6"
        raise ListenError(f"cannot listen on {value!r}: {text!r} is not an {kind} address")
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > 65535:
        raise ListenError(
            f"cannot listen on {value!r}: the port must be a number from 0 to 65535"
            " (0 picks a free one)"
        )
    return multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{int(port_text)}")


def _socket_address(address: multiaddr.Multiaddr) -> tuple[socket.AddressFamily, str, int]:
    """(family, ip, port) of an address in one of the forms ``_parse_listen`` accepts."""
    _, family, ip, _, port = str(address).split("/")
    return socket.AF_INET if family == "ip4" else socket.AF_INET6, ip, int(port)


def _probe(address: multiaddr.Multiaddr) -> None:
    """Bind (without listening) as the host will, minus SO_REUSEPORT."""
    family, ip, port = _socket_address(address)
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as py-libp2p sets it: connections left in TIME_WAIT by
        # a previous run must not count as "in use"; a listener still does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((ip, port))
        except OSError as error:
            raise _bind_error(address, error) from None


def _bind_error(address: multiaddr.Multiaddr, error: OSError) -> ListenError:
    _, ip, port = _socket_address(address)
    if error.errno == errno.EADDRINUSE:
        reason = (
            f"TCP port {port} on {ip} is already in use (another Pigeon daemon or another"
            " program); stop it or choose another port"
        )
    elif error.errno == errno.EADDRNOTAVAIL:
        all_addresses = "0.0.0.0" if ":" not in ip else "::"
        reason = (
            f"{ip} is not an address of this machine; use one of its addresses,"
            f" or {all_addresses} for all of them"
        )
    elif error.errno == errno.EACCES:
        reason = f"port {port} needs administrator rights; choose a port from 1024 up"
    else:
        reason = error.strerror or str(error)
    return ListenError(f"cannot listen on {address}: {reason}")


async def check_listening(host: IHost, requested: Sequence[multiaddr.Multiaddr]) -> None:
    """Call right after ``host.run()`` started: every requested address must
    have a listener of its own.

    py-libp2p logs and skips an address it cannot listen on, and it listens
    with SO_REUSEPORT (for TCP hole punching), so a second process of the
    same user can bind a port that is already listened on and the kernel
    then splits incoming connections between the two.  ``listen_addresses``
    refuses a port in use before the start; this closes the window between
    that probe and the real bind.  On failure the host is closed.
    """
    try:
        network = host.get_network()
        ours: list[tuple[multiaddr.Multiaddr, trio.socket.SocketType]] = []
        for address in requested:
            listener = network.listeners.get(str(address))
            sockets = [s.socket for s in getattr(listener, "listeners", ())]
            if not sockets:
                _probe(address)  # raises with the operating system's reason, if any
                raise ListenError(
                    f"cannot listen on {address}: the network layer did not start a"
                    f" listener; use {LISTEN_FORMS}"
                )
            ours.extend((address, sock) for sock in sockets)
        _refuse_shared_ports(ours)
    except BaseException:
        await close_host(host)
        raise


def _refuse_shared_ports(ours: list[tuple[multiaddr.Multiaddr, trio.socket.SocketType]]) -> None:
    """Refuse a port that a socket of another process also listens on.

    Reads the kernel's table of TCP sockets, so Linux only; elsewhere the
    probe before the start is the only guard.
    """
    inodes = {os.fstat(sock.fileno()).st_ino for _, sock in ours}
    others = [(ip, port) for ip, port, inode in _tcp_listeners() if inode not in inodes]
    for address, sock in ours:
        ip, port = sock.getsockname()[:2]
        mine = ipaddress.ip_address(ip)
        for other_ip, other_port in others:
            if other_port == port and _overlap(mine, other_ip):
                family = str(address).split("/")[1]
                actual = multiaddr.Multiaddr(f"/{family}/{ip}/tcp/{port}")
                raise _bind_error(actual, OSError(errno.EADDRINUSE, "in use"))


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _tcp_listeners() -> list[tuple[IPAddress, int, int]]:
    """(address, port, inode) of every listening TCP socket, from /proc/net."""
    found: list[tuple[IPAddress, int, int]] = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path("/proc/net", name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            # Each 32-bit word of the address is printed in host byte order.
            raw = b"".join(
                struct.pack("=I", int(hex_ip[i : i + 8], 16)) for i in range(0, len(hex_ip), 8)
            )
            found.append((ipaddress.ip_address(raw), int(hex_port, 16), int(fields[9])))
    return found


def _overlap(a: IPAddress, b: IPAddress) -> bool:
    """Whether listeners on a and b (same port) would take each other's connections."""
    if a.version != b.version:
        v6, v4 = (a, b) if a.version == 6 else (b, a)
        assert isinstance(v6, ipaddress.IPv6Address)
        # A dual-stack "::" listener also takes IPv4; so does a v4-mapped one.
        return v6.is_unspecified or (v6.ipv4_mapped is not None and _overlap(v6.ipv4_mapped, v4))
    return a == b or a.is_unspecified or b.is_unspecified


def quiet_libp2p_logs() -> None:
    """py-libp2p logs every normal stream end as a warning: keep only errors."""
    for name in ("libp2p", "multiaddr", "aioice", "aiortc"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


async def _release_window_in_halves(stream: YamuxStream, *, bytes_read: int = 0) -> None:
    """Give the peer back receive window once half of it is used, as go-yamux does.

    Stands in for py-libp2p's ``YamuxStream._auto_tune_and_send_window_update``
    (libp2p 0.6), which every ``read`` awaits and which, for any read that
    returned bytes, sends a WINDOW_UPDATE: one encrypted frame back per
    read, and multistream-select reads its messages a byte at a time.  In a
    30-node simulation that was 130,000 window updates against 55,000 data
    frames, and each read waited for its update to get the connection's
    write lock.  Here a read sends one only when the window left is under
    half (256 KiB windows: one update per 128 KiB read); the window does not
    grow beyond its first size (file bytes do not travel over yamux)."""
    async with stream.window_lock:
        buffered = len(stream.conn.stream_buffers.get(stream.stream_id, b""))
        used = stream.target_recv_window - (stream.recv_window + buffered)
        if used < stream.target_recv_window // 2:
            return
        stream.recv_window += used
    await stream.send_window_update(used, skip_lock=True)


YamuxStream._auto_tune_and_send_window_update = _release_window_in_halves  # type: ignore[method-assign,assignment]


async def _no_round_trip_pings(connection: Yamux) -> None:
    """py-libp2p pings over every connection, both ends, every 30 s, to
    measure a round trip that only its window tuning reads, and that tuning
    is replaced above.  Across 465 idle connections the pings were three
    quarters of the CPU (2.5% of a core against 0.6% without), and a node
    holds more connections the larger the network."""


Yamux._measure_rtt_loop = _no_round_trip_pings  # type: ignore[method-assign,assignment]


def peer_id_for(device_seed: bytes) -> ID:
    return ID.from_pubkey(create_new_key_pair(device_seed).public_key)


class Wire:
    """What a node's TCP carries: bytes each way, counted below encryption
    and multiplexing (what crosses the network, TCP/IP headers aside).

    Two knobs for running many nodes on one machine: ``source`` is the
    address outgoing connections leave from (the node's own loopback
    address, so others can tell nodes apart), and ``allows`` decides per
    remote IP address whether a connection may exist at all: refused dials,
    closed incoming connections and, after ``cut()``, closed live ones.
    """

    def __init__(self, source: str | None = None) -> None:
        self.source = source
        self.sent = 0
        self.received = 0
        self.opened = 0  # connections, both ways
        self.allows: Callable[[str], bool] = lambda ip: True
        self._live: set[_Metered] = set()

    def track(self, stream: ReadWriteCloser) -> ReadWriteCloser:
        self.opened += 1
        metered = _Metered(stream, self)
        self._live.add(metered)
        return metered

    async def cut(self) -> None:
        """Close every live connection to an address that is no longer allowed."""
        for stream in list(self._live):
            if not self.allows(stream.remote_ip):
                with trio.move_on_after(1):
                    await stream.close()

    async def close_all(self) -> None:
        """Close what py-libp2p left open: a connection whose upgrade was
        cancelled half way is dropped without being closed."""
        with trio.CancelScope(shield=True):
            for stream in list(self._live):
                with trio.move_on_after(1):
                    await stream.close()


# Longest a write on a connection may wait for the peer to take it.
WRITE_TIMEOUT = 20.0


# Bytes taken from the socket at once (``_Metered.read``).
READ_AHEAD = 65536


class _Metered(ReadWriteCloser):
    def __init__(self, inner: ReadWriteCloser, wire: Wire) -> None:
        self.inner = inner
        self.wire = wire
        self.remote = _peer_address(inner)
        self.remote_ip = self.remote[0] if self.remote else ""
        self._unread = b""  # read from the socket, not yet by the caller: [_at:]
        self._at = 0

    async def read(self, n: int | None = None) -> bytes:
        """Up to ``n`` bytes (whatever is there for None), b"" at the end.

        py-libp2p reads each Noise message in two reads, its 2-byte length and
        then its body, and each read was a system call and two trips through
        the scheduler (the stream's lock, the socket): at 100 nodes in one
        process, a quarter of the event loop.  The socket is now read up to
        ``READ_AHEAD`` at a time, and what the caller did not ask for yet is
        handed out by the next reads without a system call."""
        if n == 0:
            return b""
        if self._at < len(self._unread):
            return self._take(n)
        data = await self.inner.read(READ_AHEAD)
        self.wire.received += len(data)
        if self._at < len(self._unread):  # another reader's bytes came meanwhile: theirs first
            self._unread = self._unread[self._at :] + data
            self._at = 0
            return self._take(n)
        if n is None or len(data) <= n:
            return data
        self._unread, self._at = data, n
        return data[:n]

    def _take(self, n: int | None) -> bytes:
        end = len(self._unread) if n is None else min(len(self._unread), self._at + n)
        taken = self._unread[self._at : end]
        self._at = end
        if end == len(self._unread):
            self._unread, self._at = b"", 0
        return taken

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, even for a caller being cancelled.

        What comes here is already encrypted: Noise numbers its messages, and
        py-libp2p takes the number before it writes.  A write given up before
        it began (cancelled waiting for the socket's lock) or half way leaves
        the peer expecting a message that never comes, and every later one
        fails authentication: the connection is lost, with every stream on it
        (under load, hundreds a minute among 30 nodes).  So a write finishes,
        or, when the peer takes nothing for ``WRITE_TIMEOUT``, the connection
        is closed.
        """
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + WRITE_TIMEOUT
            await self.inner.write(data)
        if scope.cancelled_caught:
            with trio.CancelScope(shield=True):
                await self.close()
            raise ConnectionClosedError(f"the peer took nothing for {WRITE_TIMEOUT:g} s")
        self.wire.sent += len(data)

    async def close(self) -> None:
        self.wire._live.discard(self)
        await self.inner.close()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.remote


def _peer_address(stream: ReadWriteCloser) -> tuple[str, int] | None:
    """The peer's (ip, port): py-libp2p 0.8.1's TCP stream gives None for
    an IPv6 peer (its socket name has four parts, not two), which left
    IPv6 connections without an observed address and the dial-back without
    an address to dial."""
    address = stream.get_remote_address()
    if address is None and isinstance(stream, TrioTCPStream):
        try:
            peer = stream.stream.socket.getpeername()
        except OSError:
            return None
        return str(peer[0]), int(peer[1])
    return address


async def _connect_from(
    maddr: multiaddr.Multiaddr, source: str, port: int = 0
) -> trio.SocketStream:
    """A TCP connection to ``maddr`` leaving from ``source`` (``port`` 0: any).

    py-libp2p's own dial from a source address leaks its socket when the
    dial is cancelled; this one closes it whatever happens.
    """
    try:
        family, ip, peer_port = _socket_address(
            multiaddr.Multiaddr("/".join(str(maddr).split("/")[:5]))
        )
    except ValueError as error:
        raise OpenConnectionError(f"Failed to open TCP stream to {maddr}: {error}") from error
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        if port:  # the listening port, which the listener shares (SO_REUSEPORT)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind((source, port))
        await sock.connect((ip, peer_port))
    except OSError as error:
        sock.close()
        raise OpenConnectionError(f"Failed to open TCP stream to {maddr}: {error}") from error
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


class _WireTCP(TCP):
    """py-libp2p's TCP transport with every connection going through a ``Wire``."""

    def __init__(self, wire: Wire) -> None:
        super().__init__()
        self.wire = wire

    async def dial(self, maddr: multiaddr.Multiaddr) -> RawConnection:
        ip = str(maddr).split("/")[2]
        if not self.wire.allows(ip):
            raise OpenConnectionError(f"Failed to open TCP stream to {maddr}: unreachable")
        if self.wire.source is None:
            conn = await super().dial(maddr)
            assert isinstance(conn, RawConnection)
        else:
            conn = RawConnection(TrioTCPStream(await _connect_from(maddr, self.wire.source)), True)
        conn.stream = self.wire.track(conn.stream)
        return conn

    async def dial_with_source(
        self, maddr: multiaddr.Multiaddr, source: tuple[str, int]
    ) -> RawConnection:
        """A dial from a given address and port (py-libp2p's, for hole
        punching, leaks its socket when cancelled)."""
        ip = str(maddr).split("/")[2]
        if not self.wire.allows(ip):
            raise OpenConnectionError(f"Failed to open TCP stream to {maddr}: unreachable")
        stream = TrioTCPStream(await _connect_from(maddr, source[0], source[1]))
        return RawConnection(self.wire.track(stream), True)

    def create_listener(self, handler_function: THandler) -> TCPListener:
        async def handler(stream: ReadWriteCloser) -> None:
            metered = self.wire.track(stream)
            assert isinstance(metered, _Metered)
            if not self.wire.allows(metered.remote_ip):
                await metered.close()
                return
            await handler_function(metered)

        return super().create_listener(handler)


# A connection that carried a stream this recently is not pruned.  py-libp2p
# prunes, whenever a node holds more than CONNECTIONS_HIGH, down towards
# CONNECTIONS_LOW, the oldest connections without a stream open at that moment:
# a mailbox peer with more owners than that closed the connection of an owner
# that had collected a minute before, and nearly every collection (each owner,
# every 30 s) dialed again, with a Noise handshake and an identify exchange at
# both ends.  That grew with the network: above 32 nodes, most of the idle cost.
# Pruning now takes connections idle for this long, and nothing else: the limit
# is on connections nobody uses.
KEEP_USED_FOR = 90.0


def used_recently(connection: INetConn, now: float | None = None) -> bool:
    """Whether ``connection`` carried a stream within ``KEEP_USED_FOR`` seconds."""
    used = getattr(connection, "_pigeon_used_at", None)
    now = time.monotonic() if now is None else now
    return isinstance(used, float) and now - used < KEEP_USED_FOR


_add_stream = SwarmConn._add_stream
_within_grace = ConnectionPruner._is_connection_within_grace_period


async def _add_stream_noting_use(self: SwarmConn, muxed_stream: IMuxedStream) -> NetStream:
    self._pigeon_used_at = time.monotonic()  # type: ignore[attr-defined]
    return await _add_stream(self, muxed_stream)


def _within_grace_or_used(
    self: ConnectionPruner, connection: INetConn, grace_period: float
) -> bool:
    return used_recently(connection) or _within_grace(self, connection, grace_period)


SwarmConn._add_stream = _add_stream_noting_use  # type: ignore[method-assign]

_handle_muxed_stream = SwarmConn._handle_muxed_stream


async def _handle_stream_contained(self: SwarmConn, muxed_stream: IMuxedStream) -> None:
    """py-libp2p runs each incoming stream's handler in the nursery that
    accepts the connection's streams: a handler that raised (its own
    identify or ping reading a stream the peer had closed, say: a read at the
    end raises) ended that nursery, and the connection stayed open accepting
    no stream again.  Every later stream the peer opened on it waited 10 s
    for an answer and failed.  A handler's error now ends its stream only."""
    try:
        await _handle_muxed_stream(self, muxed_stream)
    except Exception as error:
        log.debug("a stream handler for %s raised: %r", self.muxed_conn.peer_id, error)
        with contextlib.suppress(Exception):
            await muxed_stream.reset()


SwarmConn._handle_muxed_stream = _handle_stream_contained  # type: ignore[method-assign]
ConnectionPruner._is_connection_within_grace_period = _within_grace_or_used  # type: ignore[method-assign]


# Connections a node keeps.  py-libp2p's defaults (100 to 300, and it dials
# every peer it knows until it holds 200) make a full mesh of any network under
# 200 nodes: each connection is a Noise handshake and an identify exchange at
# both ends, and in a simulation of 100 nodes those alone saturate the loop.
# Above the upper bound the pruner closes connections idle for KEEP_USED_FOR
# (never a contact's device or a mailbox of ours: ``Node.peer_connected``
# protects them), down towards the lower one; the DHT dials whom it asks
# regardless.  Below the lower bound the node dials peers it knows, towards
# the middle (``_dial_only_below_floor``).
CONNECTIONS_LOW = 8
CONNECTIONS_HIGH = 32

_maybe_connect = AutoConnector.maybe_connect


async def _dial_only_below_floor(self: AutoConnector) -> None:
    """py-libp2p's auto-connector dials towards the middle of the bounds
    whenever a node holds fewer, every 30 s and after every disconnect,
    while the pruner trims towards the lower bound: in a network larger than
    the upper bound each prune was followed by as many new dials, and each
    new connection pushed its other end over the bound to prune in turn (7
    new connections per node a minute, idle, at 100 nodes).  Between the
    bounds a node now keeps what it has."""
    if self.swarm.get_total_connections() < self.swarm.connection_config.min_connections:
        await _maybe_connect(self)


AutoConnector.maybe_connect = _dial_only_below_floor  # type: ignore[method-assign]

_notify = Swarm._notify
# Events whose notifees (py-libp2p's tag store and identify, and ours) only
# return: no task of their own is needed to keep one from holding the others.
_INLINE_EVENTS = frozenset({"opened_stream", "closed_stream"})


async def _notify_stream_events_inline(self: Swarm, method: str, *args: object) -> None:
    """py-libp2p starts a nursery and a task per notifee for every event,
    and a stream opening and closing are two events (7% of the CPU a stream
    costs, measured between two hosts).  Stream events now call each
    notifee in turn, a raising one still kept from the others and the caller."""
    if method not in _INLINE_EVENTS:
        await _notify(self, method, *args)
        return
    for notifee in list(self.notifees):
        try:
            await getattr(notifee, method)(self, *args)
        except Exception:
            log.exception("notifee %s.%s raised", type(notifee).__name__, method)


Swarm._notify = _notify_stream_events_inline  # type: ignore[method-assign]


def build_host(
    device_seed: bytes,
    listen: list[str],
    wire: Wire | None = None,
    told: Callable[[], list[str]] | None = None,
) -> IHost:
    """``told``: the addresses identify gives peers (without ``/p2p``),
    in place of what the host listens on and what peers say they saw."""
    wire = wire or Wire()
    key_pair = create_new_key_pair(device_seed)
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        connection_config=ConnectionConfig(
            max_connections_per_peer=1,
            min_connections=CONNECTIONS_LOW,
            low_watermark=CONNECTIONS_LOW,
            high_watermark=CONNECTIONS_HIGH,
        ),
        listen_addrs=listen_addresses(listen),
        transports=[_WireTCP(wire)],
        addrs_factory=None if told is None else lambda _: [multiaddr.Multiaddr(a) for a in told()],
    )
    network = host.get_network()
    assert isinstance(network, Swarm)
    Dialer(network).install()
    _WIRES[host] = wire
    return host


# Each host's wire, for ``close_host``.
_WIRES: weakref.WeakKeyDictionary[IHost, Wire] = weakref.WeakKeyDictionary()


async def close_host(host: IHost) -> None:
    """Close listeners and connections even from a cancelled scope, then
    every socket py-libp2p left open (``Wire.close_all``)."""
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 5
        await host.close()
    wire = _WIRES.get(host)
    if wire is not None:
        await wire.close_all()
