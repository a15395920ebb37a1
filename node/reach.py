"""Whether others can connect to us: public, behind NAT, or unknown, and why
(docs/NETWORK.md).

py-libp2p's AutoNAT cannot say: its server "dials back" with
``host.connect``, which returns at once on the connection the request came
in on, so every asker is told it is reachable.  Ours (``DIALBACK_PROTOCOL``)
makes a new TCP connection to the address the request came from and the
port the asker names, and counts it reached only once the Noise handshake on
it proves the asker's own peer ID: a router answering on that port, or
another program, is not us.

The server dials only the address the request came from (so it cannot be
sent to scan anyone else), answers one request per peer a minute and
DIALBACKS_PER_MINUTE in all, and never keeps the connection.

An asker asks up to ASK_PEERS of the peers it is connected to, at start and
every CHECK_EVERY after (sooner while it knows nothing): public once one of
them connected back; behind NAT when those that answered could not, and
they saw us at an address that is not this machine's (the same verdict
with "a firewall" in the reason when it is).  An address not our own at
which peers reached us (a forwarded port) is told to others once
TELL_AFTER of them agree on it.  A node that listens on
loopback only asks no one: it is for this machine alone.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.network.swarm import Swarm
from libp2p.peer.id import ID

from pigeon.protocol.frames import MAX_DIALBACK_FRAME, DialbackAnswer, DialbackRequest

from .addresses import IPAddress, interface_addresses
from .dialing import is_relayed
from .framing import frame, read_frame

log = logging.getLogger("pigeon.reach")

DIALBACK_PROTOCOL = TProtocol("/pigeon/dialback/1.0.0")
DIAL_TIMEOUT = 5.0  # seconds for the new connection and its handshake
ASK_TIMEOUT = DIAL_TIMEOUT + 5.0  # an asker's wait for the answer
DIALBACKS_PER_MINUTE = 20  # a server's dial-backs, all askers together
PEERS_REMEMBERED = 1024  # askers whose last request a server remembers
ASK_PEERS = 3  # peers asked in one check
TELL_AFTER = 2  # peers that reached us at an address not our own before it is told
CHECK_EVERY = 30 * 60.0  # seconds between checks once the answer is known
RETRY_EVERY = 15.0  # seconds between checks while it is not (a DHT client meanwhile)

PUBLIC = "public"
BEHIND_NAT = "behind NAT"
UNKNOWN = "unknown"


class DialbackService:
    """Answers DIALBACK_PROTOCOL for any peer (the work is a TCP connection
    and a handshake, bounded per peer and in all)."""

    def __init__(self, host: IHost) -> None:
        self.host = host
        self._asked: OrderedDict[ID, float] = OrderedDict()  # peer -> trio time
        self._recent: list[float] = []  # trio times of the last minute's dial-backs

    async def handle(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        remote = stream.get_remote_address()
        if remote is None or _relayed(stream):
            # Over a relay, the address the request came from is the
            # relay's: dialling it back would tell the asker nothing, and
            # would have us dial a port of the asker's choosing there.
            await stream.reset()
            return
        request: DialbackRequest | None = None
        try:
            with trio.fail_after(ASK_TIMEOUT):
                request = DialbackRequest.decode(await read_frame(stream, MAX_DIALBACK_FRAME))
        except Exception as error:  # garbled, too large, or too slow
            log.info("peer=%s dial-back request refused: %s", peer, type(error).__name__)
        if request is None:
            await stream.reset()
            return
        ip = ipaddress.ip_address(remote[0])
        family = "ip4" if ip.version == 4 else "ip6"
        observed = f"/{family}/{ip}/tcp/{remote[1]}"
        reached = False
        if self._allowed(peer):
            reached = await self._dial(peer, f"/{family}/{ip}/tcp/{request.port}")
        answer = DialbackAnswer(observed, reached).encode()
        with trio.move_on_after(DIAL_TIMEOUT):
            await stream.write(frame(answer))
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stream.close()

    def _allowed(self, peer: ID) -> bool:
        now = trio.current_time()
        self._recent = [t for t in self._recent if t > now - 60]
        last = self._asked.get(peer)
        if last is not None and last > now - 60:
            return False
        if len(self._recent) >= DIALBACKS_PER_MINUTE:
            return False
        self._asked[peer] = now
        self._asked.move_to_end(peer)
        while len(self._asked) > PEERS_REMEMBERED:
            self._asked.popitem(last=False)
        self._recent.append(now)
        return True

    async def _dial(self, peer: ID, address: str) -> bool:
        """A new connection to ``address``, kept only until its Noise
        handshake shows ``peer`` at the other end."""
        network = self.host.get_network()
        assert isinstance(network, Swarm)
        transport = network.transport_manager.transport_for_dialing(multiaddr.Multiaddr(address))
        if transport is None:
            return False
        raw = None
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                raw = await transport.dial(multiaddr.Multiaddr(address))
                secured = await network.upgrader.upgrade_security(raw, True, peer)
                await secured.close()
                return True
        except Exception as error:
            log.debug("dial-back to %s at %s failed: %s", peer, address, error)
            return False
        finally:
            if raw is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    await raw.close()


@dataclass(frozen=True)
class Answer:
    observed: IPAddress
    reached: bool


class Reachability:
    """What we know of our own reachability, and the checks that learn it."""

    def __init__(
        self,
        host: IHost,
        port: Callable[[], int | None],
        local_only: Callable[[], bool],
        interfaces: Callable[[], list[IPAddress]] = interface_addresses,
    ) -> None:
        self.host = host
        self.port = port  # the TCP port we listen on (None: not listening)
        self.local_only = local_only  # listening on loopback only
        self.interfaces = interfaces
        self.state = UNKNOWN
        self.reason = "not checked yet: no peer has been asked"
        self.public: list[str] = []  # addresses others reached us at, when not an interface's
        self.changed = trio.Event()
        self._answers: dict[ID, Answer] = {}

    async def run(self) -> None:
        if self.local_only():
            self.reason = "listening on loopback only: reachable from this machine alone"
            return
        while True:
            await self.check()
            await trio.sleep(CHECK_EVERY if self.state != UNKNOWN else RETRY_EVERY)

    async def check(self) -> None:
        port = self.port()
        if port is None:
            return
        peers = list(self.host.get_network().connections)
        random.shuffle(peers)
        answers: dict[ID, Answer] = {}

        async def ask(peer: ID) -> None:
            answer = await self._ask(peer, port)
            if answer is not None:
                answers[peer] = answer

        async with trio.open_nursery() as nursery:
            for peer in peers[:ASK_PEERS]:
                nursery.start_soon(ask, peer)
        if answers:
            self._answers = answers
            self._decide(port)

    async def _ask(self, peer: ID, port: int) -> Answer | None:
        try:
            with trio.fail_after(ASK_TIMEOUT):
                stream = await self.host.new_stream(peer, [DIALBACK_PROTOCOL])
                try:
                    await stream.write(frame(DialbackRequest(port).encode()))
                    answer = DialbackAnswer.decode(await read_frame(stream, MAX_DIALBACK_FRAME))
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await stream.close()
            observed = ipaddress.ip_address(answer.observed.split("/")[2])
        except Exception as error:  # a peer without the protocol, gone, or garbled
            log.debug("dial-back asked of %s: no answer (%s)", peer, error)
            return None
        return Answer(observed, answer.reached)

    def _decide(self, port: int) -> None:
        answers = list(self._answers.values())
        ours = set(self.interfaces())
        reached = [a for a in answers if a.reached]
        before = (self.state, self.public)
        if reached:
            seen = reached[0].observed
            self.state = PUBLIC
            self.reason = (
                f"{len(reached)} of {len(answers)} peers asked connected back to {seen} port {port}"
            )
            # Told to others only when peers agree on it: one lying peer must
            # not make our contacts dial an address of its choosing.
            agreeing = sum(a.observed == seen for a in reached)
            family = "ip4" if seen.version == 4 else "ip6"
            told = seen not in ours and agreeing >= TELL_AFTER
            self.public = [f"/{family}/{seen}/tcp/{port}"] if told else []
        else:
            seen = answers[0].observed
            self.state = BEHIND_NAT
            self.public = []
            if seen in ours:
                self.reason = (
                    f"peers see us at {seen}, this machine's own address, but {len(answers)}"
                    f" could not connect back to port {port}: a firewall drops incoming"
                    " connections"
                )
            else:
                self.reason = (
                    f"peers see us at {seen}, which is not an address of this machine, and"
                    f" {len(answers)} could not connect back to port {port}"
                )
        if (self.state, self.public) != before:
            log.info("reachability: %s (%s)", self.state, self.reason)
            self.changed.set()
            self.changed = trio.Event()


def _relayed(stream: INetStream) -> bool:
    connection = getattr(stream, "swarm_conn", None)
    addresses = connection.get_transport_addresses() if connection is not None else []
    return any(map(is_relayed, addresses))
