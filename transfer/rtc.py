"""One WebRTC data channel per peer connection, for trio code.

This is the only module where asyncio and aiortc live: aiortc runs on an asyncio
loop in a thread of its own (:class:`RtcThread`), and every aiortc object is
created, used and closed on that loop.  Nothing here may block that loop or the
trio thread: work crosses with ``run_coroutine_threadsafe`` one way and
``TrioToken.run_sync_soon`` the other.  It knows nothing of files or frames;
callers bring their own acknowledgements (aiortc has no receive-side
backpressure, so what arrives is queued for trio without bound).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import math
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import aioice.ice
import trio
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.rtcicetransport import connection_kwargs

from pigeon.protocol.errors import PigeonError

log = logging.getLogger("pigeon.rtc")

T = TypeVar("T")

LABEL = "pigeon-file"  # the one data channel a Pigeon peer connection carries
HIGH_WATER = 2 * 1024 * 1024  # send() waits once more than this is queued in aiortc ...
LOW_WATER = 512 * 1024  # ... until the queue is down to this (bufferedamountlow)
CLOSE_GRACE = 5.0  # seconds Channel.close() waits for queued data and the close handshake
PC_CLOSE_TIMEOUT = 5.0  # seconds to wait for an RTCPeerConnection to close
THREAD_JOIN_TIMEOUT = 10.0  # seconds RtcThread's exit waits for its thread to end
# A description's error text goes into a one-line message; aiortc's can be long.
REASON_LIMIT = 200


class RtcError(PigeonError):
    """WebRTC could not do what was asked; the message says what a person can do."""


class ConnectFailed(RtcError):
    """No connection to the peer came up: no candidate pair worked, it failed, or it took
    too long."""


class ChannelClosed(RtcError):
    """The data channel or its connection is gone (closed by either side, or failed)."""


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, as the user configured it (``stun:host:port``,
    ``turn:host:port?transport=udp``); TURN needs the username and credential."""

    urls: str
    username: str | None = None
    credential: str | None = None


def parse_ice_server(url: str) -> IceServer:
    """The server a user typed: ``stun:HOST[:PORT]``, or ``turn:USER:PASSWORD@HOST[:PORT]``
    (``turns:`` for TLS, ``?transport=tcp`` for TCP).  Raises :class:`RtcError`."""
    scheme, _, rest = url.partition(":")
    server = IceServer(url)
    if scheme in ("turn", "turns") and "@" in rest:
        secret, _, rest = rest.rpartition("@")
        username, _, credential = secret.partition(":")
        server = IceServer(f"{scheme}:{rest}", username, credential)
    _ice_server_config(server)
    return server


def _ice_server_config(server: IceServer) -> RTCIceServer:
    """aiortc's form of ``server``, refused here if aiortc would refuse or skip it.

    aiortc checks URLs only when a peer connection is made, and silently skips a
    ``stuns:`` server, a TURN transport other than UDP or TCP, and every STUN or
    TURN server after the first of each kind.
    """
    config = RTCIceServer(server.urls, server.username, server.credential)
    # Messages name the server without what precedes an "@": it may be a TURN password.
    url = server.urls.partition("?")[0]
    head, at, host = url.rpartition("@")
    where = f"{head.partition(':')[0]}:{host}" if at else url
    expected = "expected stun:HOST:PORT or turn:USER:PASSWORD@HOST:PORT"
    try:
        kwargs = connection_kwargs([config])
    except ValueError:
        raise RtcError(f"{where!r} is not a STUN or TURN server ({expected})") from None
    if not kwargs:
        raise RtcError(
            f"{where!r} is not usable: WebRTC here supports stun:, turn: (over UDP or TCP) "
            "and turns: (over TCP)"
        )
    _, port = kwargs.get("stun_server") or kwargs["turn_server"]
    if not 0 < port < 65536:
        raise RtcError(f"{where!r} is not a STUN or TURN server (the port is out of range)")
    if "turn_server" in kwargs and not (server.username and server.credential):
        raise RtcError(f"the TURN server {where!r} needs a user name and password ({expected})")
    return config


def _one_line(exc: BaseException) -> str:
    """``exc``'s text squeezed onto one bounded line, for a message a person reads."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= REASON_LIMIT else text[: REASON_LIMIT - 3] + "..."


class _HostAddresses:
    """Which local addresses aioice gathers host candidates from, per WebRTC thread.

    aioice never gathers 127.0.0.1 and offers no option to choose addresses, so a
    choice means replacing ``aioice.ice.get_host_addresses``, the module global
    ``Connection.gather_candidates`` calls (aioice 0.13) on the thread of the
    loop that gathers.  The replacement answers for the thread asking: each
    :class:`RtcThread` registers its own choice for its own thread, so nodes
    in one process (a simulation) can each offer their own address, and a
    thread with no choice gets aioice's own answer.  aioice's function is put
    back when the last thread ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_thread: dict[threading.Thread, tuple[str, ...] | None] = {}
        self._original = aioice.ice.get_host_addresses

    def claim(self, thread: threading.Thread, addresses: tuple[str, ...] | None) -> None:
        with self._lock:
            if not self._by_thread:
                aioice.ice.get_host_addresses = self._chosen
            self._by_thread[thread] = addresses

    def release(self, thread: threading.Thread) -> None:
        with self._lock:
            self._by_thread.pop(thread, None)
            if not self._by_thread and aioice.ice.get_host_addresses == self._chosen:
                aioice.ice.get_host_addresses = self._original  # not replaced meanwhile

    def _chosen(self, use_ipv4: bool, use_ipv6: bool) -> list[str]:
        """Stands in for aioice's function: the asking thread's addresses of the
        families asked for."""
        chosen = self._by_thread.get(threading.current_thread())
        if chosen is None:
            return self._original(use_ipv4, use_ipv6)
        families = {4} if use_ipv4 else set()
        if use_ipv6:
            families.add(6)
        return [a for a in chosen if ipaddress.ip_address(a).version in families]


_HOST_ADDRESSES = _HostAddresses()


class _Inbox:
    """What the asyncio loop received on one channel, for trio, in order.

    Lives on the trio side: the loop calls :meth:`put` and :meth:`end` through
    ``run_sync_soon``, which keeps their order, so whatever arrived before the end
    is delivered before :class:`ChannelClosed` is raised.  Unbounded on purpose:
    aiortc cannot be told to stop receiving, so the caller's protocol bounds it.
    """

    def __init__(self) -> None:
        self._send, self.receive = trio.open_memory_channel[bytes](math.inf)
        self.reason = "the channel is closed"
        self.ended = False

    def put(self, message: bytes) -> None:
        # Runs as a run_sync_soon callback, where an exception would crash trio.
        if not self.ended:
            self._send.send_nowait(message)

    def end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.reason = reason
            self._send.close()


class _Peer:
    """One RTCPeerConnection and its data channel, as seen from the asyncio loop.

    Every method runs on the loop.  Handlers are attached the moment the objects
    exist (an early message is lost otherwise) and never block: they set flags,
    wake waiters and hand messages to trio.
    """

    def __init__(self, rtc: RtcThread, pc: RTCPeerConnection, inbox: _Inbox) -> None:
        self.rtc = rtc
        self.pc = pc
        self.inbox = inbox
        self.channel: RTCDataChannel | None = None
        self.ended = False  # the channel or the connection is gone for good
        self.end_reason = "the channel is not open"
        self.failed = False  # ICE or DTLS failed (the state moves on to closed soon)
        self.closing_here = False
        self.text_ignored = False  # said once per connection, not once per message
        # The descriptions as exchanged, whose candidates say whether ICE can even start.
        self.local_sdp: str | None = None
        self.remote_sdp: str | None = None
        self.changed = asyncio.Event()  # set on every change a coroutine here may wait for
        self._pc_closed: asyncio.Task[None] | None = None
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)

    def attach(self, channel: RTCDataChannel) -> None:
        self.channel = channel
        channel.bufferedAmountLowThreshold = LOW_WATER
        channel.on("open", self.changed.set)
        channel.on("bufferedamountlow", self.changed.set)
        channel.on("message", self._on_message)
        channel.on("close", self._on_channel_close)
        # The answering side's channel is announced already open: no "open" event follows.
        self.changed.set()

    # -- handlers

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if self.channel is None and channel.label == LABEL:
            self.attach(channel)
        else:
            log.info("closed an unexpected data channel %r from the peer", channel.label)
            channel.close()

    def _on_message(self, message: bytes | str) -> None:
        if isinstance(message, bytes):
            self.rtc._to_trio(self.inbox.put, message)
        elif not self.text_ignored:
            self.text_ignored = True
            log.info("ignoring text messages on a data channel (Pigeon sends bytes)")

    def _on_channel_close(self) -> None:
        self._end("the channel was closed here" if self.closing_here else "the peer closed")

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        if state == "failed":
            self.failed = True
            self._end("the connection to the peer failed")
            self.start_pc_close()
        elif state == "closed":
            self.rtc._forget(self)
            self._end(
                "the channel was closed here"
                if self.closing_here
                else "the connection to the peer closed"
            )
        self.changed.set()

    def _end(self, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.end_reason = reason
            self.rtc._to_trio(self.inbox.end, reason)
        self.changed.set()

    # -- what trio asks for

    async def until(self, done: Callable[[], bool]) -> None:
        while not done():
            self.changed.clear()
            await self.changed.wait()

    async def make_offer(self) -> str:
        self.attach(self.pc.createDataChannel(LABEL, ordered=True))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.local_sdp = self.pc.localDescription.sdp
        return self.local_sdp

    async def make_answer(self, offer: str) -> str:
        await self._set_remote(offer, "offer")
        if self.pc.sctp is None:
            raise RtcError("the peer's offer has no data channel; is it from Pigeon?")
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        self.local_sdp = self.pc.localDescription.sdp
        return self.local_sdp

    async def accept_answer(self, answer: str) -> None:
        if self.pc.signalingState == "closed":
            raise RtcError("this connection is closed already; start a new one")
        if self.pc.signalingState != "have-local-offer":
            raise RtcError("an answer can only be accepted once, by the side that made the offer")
        await self._set_remote(answer, "answer")

    async def _set_remote(self, sdp: str, kind: str) -> None:
        # aiortc raises whatever its parser meets (ValueError, KeyError, AssertionError,
        # ...) and takes text without any media section as an empty offer.
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=kind))
        except Exception as exc:
            raise RtcError(
                f"the peer's {kind} is not a usable WebRTC description ({_one_line(exc)})"
            ) from exc
        self.remote_sdp = sdp

    async def wait_open(self, timeout: float) -> int:
        """Wait for the channel to open; the peer's largest message size."""
        missing = self._missing_candidates()
        if missing:
            await self.close(grace=0)
            raise ConnectFailed(missing)
        try:
            async with asyncio.timeout(timeout):
                await self.until(self._open_or_ended)
        except TimeoutError:
            await self.close(grace=0)
            raise ConnectFailed(
                f"no connection to the peer within {timeout:g} s "
                "(no network path between the two devices worked)"
            ) from None
        if self.ended or self.channel is None:
            await self.close(grace=0)
            raise ConnectFailed(
                "no network path to the peer worked"
                if self.failed
                else "the connection was closed before it opened"
            )
        # The limit aiortc's send() enforces: the remote's a=max-message-size, 65536
        # when absent; 0 means no limit.
        limit = self.channel.transport._remote_max_message_size
        return limit or sys.maxsize

    def _open_or_ended(self) -> bool:
        return self.ended or (self.channel is not None and self.channel.readyState == "open")

    def _missing_candidates(self) -> str | None:
        """Why ICE cannot start, if a side offered no candidate; None if it can.

        Without a local candidate aiortc never starts ICE and reports nothing, so
        this is said at once rather than after the timeout.  (aioice also gathers
        nothing once the peer's description said it has no candidate.)
        """
        local = self.local_sdp is not None and "a=candidate:" in self.local_sdp
        remote = self.remote_sdp is None or "a=candidate:" in self.remote_sdp
        fix = "check the network, or the host addresses setting"
        if not local and not remote:
            return f"neither this device nor the peer has a network address to use ({fix})"
        if not local:
            return f"this device has no network address to connect from ({fix})"
        if not remote:
            return f"the peer has no network address to connect to (it should {fix})"
        return None

    async def send(self, data: bytes) -> None:
        channel = self.channel
        if self.ended or channel is None or channel.readyState != "open":
            raise ChannelClosed(self.end_reason)
        channel.send(data)
        if channel.bufferedAmount > HIGH_WATER:
            await self.until(
                lambda: channel.bufferedAmount <= LOW_WATER or channel.readyState != "open"
            )
            if channel.readyState != "open":
                raise ChannelClosed(f"{self.end_reason} before all queued data was sent")

    async def close(self, grace: float) -> None:
        """Close the channel, waiting up to ``grace`` seconds for queued data to go out
        and the peer to confirm; then close the connection."""
        self.closing_here = True
        channel = self.channel
        if grace > 0 and channel is not None and channel.readyState == "open":
            channel.close()  # aiortc sends what is queued before the stream reset
            try:
                async with asyncio.timeout(grace):
                    await self.until(lambda: channel.readyState == "closed")
            except TimeoutError:
                log.info("the peer did not confirm closing the channel within %g s", grace)
        self.start_pc_close()
        assert self._pc_closed is not None
        # Shielded: aiortc's close() cut short leaves later close() calls waiting forever.
        try:
            await asyncio.wait_for(asyncio.shield(self._pc_closed), PC_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("a peer connection did not close within %g s", PC_CLOSE_TIMEOUT)

    def start_pc_close(self) -> None:
        if self._pc_closed is None:
            self._pc_closed = self.rtc._spawn(self.pc.close())


class RtcThread:
    """Owns one asyncio event loop in a daemon thread; every aiortc object is created,
    used and closed on it.

    Enter it from trio (``async with RtcThread(...) as rtc``); it serves that trio
    run only.  ``ice_servers`` are the STUN/TURN servers (none: host candidates
    only, so a test never waits on a public server).  ``host_addresses``, when not
    None, replaces the local addresses aioice gathers candidates from, e.g.
    ``["127.0.0.1"]``, which aioice never gathers by itself; each RtcThread's
    choice holds for its own thread (see :class:`_HostAddresses`).  One per
    process is the normal case; a simulation runs one per node.
    """

    def __init__(
        self, ice_servers: Sequence[IceServer] = (), host_addresses: Sequence[str] | None = None
    ) -> None:
        if host_addresses is not None:
            for address in host_addresses:
                try:
                    ipaddress.ip_address(address)
                except ValueError:
                    raise RtcError(f"{address!r} is not an IP address") from None
        self._host_addresses = None if host_addresses is None else tuple(host_addresses)
        servers = [_ice_server_config(server) for server in ice_servers]
        kinds = [server.urls.partition(":")[0].rstrip("s") for server in ice_servers]
        if kinds.count("stun") > 1 or kinds.count("turn") > 1:
            raise RtcError("WebRTC uses one STUN and one TURN server: give at most one of each")
        self._configuration = RTCConfiguration(iceServers=servers)
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False  # trio side: new work may go to the loop
        # Loop side: what the loop must close or finish before it ends.
        self._stop: asyncio.Event | None = None
        self._peers: set[_Peer] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifetime (trio side)

    async def __aenter__(self) -> RtcThread:
        if self._thread is not None:
            raise RtcError("an RtcThread can only be started once")
        self._token = trio.lowlevel.current_trio_token()
        ready = trio.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready.set,), name="pigeon-rtc", daemon=True
        )
        _HOST_ADDRESSES.claim(self._thread, self._host_addresses)
        self._thread.start()
        with trio.CancelScope(shield=True):  # a started thread must be known to __aexit__
            await ready.wait()
        if self._loop is None:
            _HOST_ADDRESSES.release(self._thread)
            raise RtcError("the WebRTC thread did not start (see the log)")
        self._accepting = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self._shut_down()

    async def _shut_down(self) -> None:
        """Close every peer connection on the loop, end the loop and join the thread."""
        if not self._accepting:
            return
        try:
            with trio.move_on_after(PC_CLOSE_TIMEOUT + 1):
                await self._call(self._close_everything())
        finally:
            self._accepting = False
            loop, stop, thread = self._loop, self._stop, self._thread
            assert loop is not None and stop is not None and thread is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: the thread ended
                loop.call_soon_threadsafe(stop.set)
            await trio.to_thread.run_sync(thread.join, THREAD_JOIN_TIMEOUT)
            if thread.is_alive():
                log.warning("the WebRTC thread did not end within %g s", THREAD_JOIN_TIMEOUT)
            _HOST_ADDRESSES.release(thread)

    def _thread_main(self, ready: Callable[[], None]) -> None:
        try:
            asyncio.run(self._serve(ready))
        except BaseException:
            log.exception("the WebRTC thread crashed")
        finally:
            self._to_trio(ready)  # wakes __aenter__ even if the loop never started

    async def _serve(self, ready: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._log_loop_error)
        self._stop = asyncio.Event()
        self._loop = loop
        self._to_trio(ready)
        await self._stop.wait()
        # asyncio.run cancels and awaits whatever aiortc left running.

    @staticmethod
    def _log_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # Errors in aiortc's own tasks and callbacks reach nobody else: say so.
        error = context.get("exception")
        log.error(
            "WebRTC: %s%s",
            context.get("message", "unexpected error"),
            f" ({_one_line(error)})" if error is not None else "",
            exc_info=error,
        )

    async def _close_everything(self) -> None:
        peers = list(self._peers)
        results = await asyncio.gather(
            *(peer.close(grace=0) for peer in peers), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                log.warning("a peer connection did not close cleanly: %s", _one_line(result))
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=PC_CLOSE_TIMEOUT)

    # -- bridges

    def _to_trio(self, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` soon on the trio thread; from any thread, never blocking.

        ``fn`` must not raise: trio treats an exception there as its own crash.
        """
        assert self._token is not None
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            log.debug("trio has finished; dropped %r", fn)

    async def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and wait for it without blocking trio.

        A trio cancellation cancels the coroutine.  Its exceptions come back as
        :class:`RtcError` (unexpected ones with the original chained), so none
        vanishes in the other thread.
        """
        loop, thread = self._loop, self._thread
        if not self._accepting or loop is None or thread is None or not thread.is_alive():
            coro.close()
            raise RtcError("the WebRTC thread is not running")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        done = trio.Event()
        future.add_done_callback(lambda _: self._to_trio(done.set))
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RtcError("the WebRTC thread stopped") from None
        except RtcError:
            raise
        except Exception as exc:
            raise RtcError(f"WebRTC failed unexpectedly: {_one_line(exc)}") from exc

    async def _call_shielded(self, coro: Coroutine[Any, Any, None], timeout: float) -> None:
        """Run a closing coroutine even from a cancelled scope, for at most ``timeout``;
        nothing to do once the thread has ended, as it closed every connection."""
        if not self._accepting:
            coro.close()
            return
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            await self._call(coro)

    # -- loop side helpers used by _Peer

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start ``coro`` on the loop and keep it referenced until it ends (asyncio keeps
        only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _forget(self, peer: _Peer) -> None:
        self._peers.discard(peer)

    # -- connecting (trio side)

    async def offer(self) -> tuple[Dialing, str]:
        """Start a connection as the offering side: the Dialing and the offer (SDP, with
        every candidate: aiortc waits for gathering) to give the peer."""
        inbox = _Inbox()

        async def make() -> tuple[_Peer, str]:
            peer = self._new_peer(inbox)
            try:
                return peer, await peer.make_offer()
            except BaseException:
                await peer.close(grace=0)
                raise

        peer, sdp = await self._call(make())
        return Dialing(self, peer, inbox, offering=True), sdp

    async def answer(self, remote_sdp: str) -> tuple[Dialing, str]:
        """Answer the peer's offer: the Dialing and the answer to give back to the peer."""
        inbox = _Inbox()

        async def make() -> tuple[_Peer, str]:
            peer = self._new_peer(inbox)
            try:
                return peer, await peer.make_answer(remote_sdp)
            except BaseException:
                await peer.close(grace=0)
                raise

        peer, sdp = await self._call(make())
        return Dialing(self, peer, inbox, offering=False), sdp

    def _new_peer(self, inbox: _Inbox) -> _Peer:
        peer = _Peer(self, RTCPeerConnection(self._configuration), inbox)
        self._peers.add(peer)
        return peer


class Dialing:
    """A peer connection whose data channel is not known to be open yet."""

    def __init__(self, rtc: RtcThread, peer: _Peer, inbox: _Inbox, *, offering: bool) -> None:
        self._rtc = rtc
        self._peer = peer
        self._inbox = inbox
        self._offering = offering
        self._channel: Channel | None = None

    async def accept_answer(self, sdp: str) -> None:
        """Take the peer's answer to our offer (offering side only).  A bad answer raises
        :class:`RtcError` and leaves the offer waiting for a good one."""
        if not self._offering:
            raise RtcError("accept_answer() is for the side that made the offer")
        await self._rtc._call(self._peer.accept_answer(sdp))

    async def connected(self, timeout: float) -> Channel:
        """Wait until the data channel is open.

        Raises :class:`ConnectFailed` when it does not open within ``timeout`` seconds
        (aiortc itself may wait forever, e.g. with no usable candidate) or the
        connection fails or closes first; the peer connection is closed then.  If
        this is cancelled instead, the connection stays up for a later call.
        """
        if self._channel is None:
            max_message = await self._rtc._call(self._peer.wait_open(timeout))
            self._channel = Channel(self._rtc, self._peer, self._inbox, max_message)
        return self._channel

    async def close(self) -> None:
        """Close the connection at once; safe to call twice and from a cancelled scope."""
        await self._rtc._call_shielded(self._peer.close(grace=0), PC_CLOSE_TIMEOUT + 1)


class Channel:
    """An open, ordered, reliable data channel to one peer.

    ``max_message`` is the largest message the peer accepts, so callers can check
    that their largest message fits: its SDP's ``a=max-message-size`` (aiortc
    peers say 262144), 65536 when it says nothing, ``sys.maxsize`` when it says 0
    (no limit).
    """

    def __init__(self, rtc: RtcThread, peer: _Peer, inbox: _Inbox, max_message: int) -> None:
        self._rtc = rtc
        self._peer = peer
        self._inbox = inbox
        self.max_message = max_message

    async def send(self, data: bytes) -> None:
        """Queue ``data`` as one message.

        Returns once it is queued in aiortc and aiortc holds at most
        :data:`HIGH_WATER` bytes not yet handed to SCTP, so a sender that awaits
        this cannot outrun the network.  The send itself happens on the loop:
        aiortc's send() called from another thread returns and delivers nothing.
        A cancelled send may still deliver the message.
        """
        if self._inbox.ended:
            raise ChannelClosed(self._inbox.reason)
        if len(data) > self.max_message:
            raise RtcError(
                f"a message of {len(data)} bytes is larger than the peer accepts "
                f"({self.max_message} bytes)"
            )
        await self._rtc._call(self._peer.send(data))

    async def receive(self) -> bytes:
        """The next message.  Once the channel or the connection is gone, the messages
        that had arrived are still delivered, then :class:`ChannelClosed` is raised."""
        try:
            return await self._inbox.receive.receive()
        except trio.EndOfChannel:
            raise ChannelClosed(self._inbox.reason) from None

    async def close(self) -> None:
        """Close gracefully: aiortc sends what is queued and the channel's close
        handshake runs (for up to :data:`CLOSE_GRACE` s) before the connection closes,
        since closing the connection at once drops queued data.  Safe to call twice
        and from a cancelled scope."""
        await self._rtc._call_shielded(
            self._peer.close(grace=CLOSE_GRACE), CLOSE_GRACE + PC_CLOSE_TIMEOUT + 1
        )
