"""The two ends of each baseline in ``benchmarks/transfer.py``, one process each.

    python benchmarks/transfer_peers.py ROLE --size BYTES --message BYTES --timeout SECONDS

ROLE is ``aiortc-sender``, ``aiortc-receiver``, ``libp2p-sender`` or
``libp2p-receiver``.  A peer speaks JSON lines with its parent: signalling on
the way in (an SDP offer or answer, the listener's multiaddr) and out, then one
result line, then it waits for a line (or the end of its input) before closing.
Nothing of Pigeon is used.

The payload is ``--size`` bytes in ``--message``-byte messages cycled from 16
random blocks; the sender hashes it (SHA-256) before the clock starts, the
receiver hashes what it gets on the clock.  Times are ``time.time()`` so that
the parent can set the sender's start against the receiver's end; CPU times are
``time.process_time()`` (all threads) over each side's share of the transfer.

Each role imports only its own stack (aiortc or py-libp2p), inside the role,
so that a peer's peak RSS is its stack's alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from libp2p.abc import IHost

PAUSE_ABOVE = 2 * 1024 * 1024  # aiortc sender: wait once this much is buffered...
RESUME_AT = 512 * 1024  # ...until bufferedAmount falls to this (bufferedamountlow)
READ_BYTES = 256 * 1024  # libp2p receiver's read size
DISTINCT_BLOCKS = 16
DONE = b"done"  # receiver to sender: every byte arrived


def emit(message: dict[str, Any]) -> None:
    print(json.dumps(message), flush=True)


def payload(size: int, message: int) -> tuple[list[bytes], str]:
    """The messages to send, in order, and the SHA-256 (hex) of their concatenation."""
    blocks = [os.urandom(message) for _ in range(DISTINCT_BLOCKS)]
    messages = [blocks[i % DISTINCT_BLOCKS] for i in range(size // message)]
    if size % message:
        messages.append(blocks[0][: size % message])
    digest = hashlib.sha256()
    for data in messages:
        digest.update(data)
    return messages, digest.hexdigest()


class Tally:
    """A receiver's count and hash of what arrived, with time and CPU marks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received = 0
        self.hash = hashlib.sha256()
        self.start_cpu = 0.0
        self.end = 0.0
        self.cpu = 0.0

    def begin(self) -> None:
        self.start_cpu = time.process_time()

    def add(self, data: bytes) -> bool:
        """Count ``data``; whether the whole payload has now arrived."""
        self.hash.update(data)
        self.received += len(data)
        if self.received < self.size:
            return False
        self.end = time.time()
        self.cpu = time.process_time() - self.start_cpu
        return True

    def result(self) -> dict[str, Any]:
        return {
            "end": self.end,
            "bytes": self.received,
            "sha256": self.hash.hexdigest(),
            "cpu_s": self.cpu,
        }


def udp_drops() -> int | None:
    """Datagrams the kernel dropped on this process's UDP sockets because their
    receive buffer was full (Linux /proc; None elsewhere)."""
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
        drops = 0
        for name in ("udp", "udp6"):
            for line in Path("/proc/net", name).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:  # inode; the last field counts drops
                    drops += int(fields[-1])
        return drops
    except OSError:
        return None


# --- aiortc (asyncio) -----------------------------------------------------------


async def stdin_lines() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def next_message(lines: asyncio.StreamReader) -> dict[str, Any]:
    line = await lines.readline()
    if not line:
        raise EOFError("the parent closed our input")
    message: dict[str, Any] = json.loads(line)
    return message


def loopback_ice() -> None:
    """aioice gathers every address but 127.0.0.1 and ::1 (``gather_candidates``
    calls the module's ``get_host_addresses``): offer loopback only, which also
    works on a machine with no other interface."""
    import aioice.ice

    def loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return ["127.0.0.1"]

    aioice.ice.get_host_addresses = loopback


def count_sctp_data() -> dict[str, int]:
    """Count the DATA chunks aiortc's SCTP sends: all sends, the chunks sent
    more than once (lost, or taken for lost) and the sends beyond each chunk's
    first (a chunk's ``_sent_count`` is raised before each send)."""
    from aiortc.rtcsctptransport import Chunk, DataChunk, RTCSctpTransport

    counts = {"sent": 0, "lost": 0, "resent": 0}
    send_chunk = RTCSctpTransport._send_chunk

    async def counting(self: RTCSctpTransport, chunk: Chunk) -> None:
        if isinstance(chunk, DataChunk):
            counts["sent"] += 1
            counts["lost"] += chunk._sent_count == 2
            counts["resent"] += chunk._sent_count > 1
        await send_chunk(self, chunk)

    RTCSctpTransport._send_chunk = counting  # type: ignore[method-assign]
    return counts


async def aiortc_sender(size: int, message: int, timeout: float) -> None:
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    loopback_ice()
    sctp = count_sctp_data()
    messages, digest = payload(size, message)
    async with asyncio.timeout(timeout):
        lines = await stdin_lines()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:
            channel = pc.createDataChannel("bench")
            opened, resumed, acked = asyncio.Event(), asyncio.Event(), asyncio.Event()
            channel.on("open", opened.set)
            channel.on("message", lambda _: acked.set())
            channel.on("bufferedamountlow", resumed.set)
            channel.bufferedAmountLowThreshold = RESUME_AT
            offered = time.time()
            await pc.setLocalDescription(await pc.createOffer())
            emit({"sdp": pc.localDescription.sdp})
            answer = await next_message(lines)
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
            await opened.wait()
            start, cpu = time.time(), time.process_time()
            for data in messages:
                channel.send(data)
                if channel.bufferedAmount > PAUSE_ABOVE:
                    resumed.clear()
                    await resumed.wait()
            await acked.wait()
            emit(
                {
                    "start": start,
                    "connect_s": start - offered,
                    "sha256": digest,
                    "cpu_s": time.process_time() - cpu,
                    "sctp_data_chunks": sctp["sent"],
                    "sctp_chunks_lost": sctp["lost"],
                    "sctp_resends": sctp["resent"],
                    "udp_drops": udp_drops(),
                }
            )
        finally:
            await pc.close()


async def aiortc_receiver(size: int, message: int, timeout: float) -> None:
    from aiortc import RTCConfiguration, RTCDataChannel, RTCPeerConnection, RTCSessionDescription

    loopback_ice()
    tally = Tally(size)
    finished = asyncio.Event()
    async with asyncio.timeout(timeout):
        lines = await stdin_lines()
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        try:

            @pc.on("datachannel")
            def on_datachannel(channel: RTCDataChannel) -> None:
                tally.begin()

                @channel.on("message")
                def on_message(data: bytes) -> None:
                    if tally.add(data):
                        channel.send(DONE)
                        finished.set()

            offer = await next_message(lines)
            await pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
            await pc.setLocalDescription(await pc.createAnswer())
            emit({"sdp": pc.localDescription.sdp})
            await finished.wait()
            emit(tally.result() | {"udp_drops": udp_drops()})
            await lines.readline()  # the sender has our DONE: close when told (or orphaned)
        finally:
            await pc.close()


# --- py-libp2p (trio) ------------------------------------------------------------

PROTOCOL = "/bench/transfer/1.0.0"
LISTEN = "/ip4/127.0.0.1/tcp/0"


async def parent_line() -> str:
    import trio

    return await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)


def bare_host() -> IHost:
    """Noise only, yamux, one connection per peer (no 250 ms dial fallback)."""
    import logging

    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.network.config import ConnectionConfig
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from multiaddr import Multiaddr

    logging.getLogger("libp2p").setLevel(logging.ERROR)  # a warning per normal stream end
    key_pair = create_new_key_pair(os.urandom(32))
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},
        muxer_preference="YAMUX",
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=[Multiaddr(LISTEN)],
    )


async def close_host(host: IHost) -> None:
    """Leaving ``host.run()`` leaves the listener open: close it, shielded."""
    import trio

    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 5
        await host.close()


async def libp2p_sender(size: int, message: int, timeout: float) -> None:
    import trio
    from libp2p.custom_types import TProtocol
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from multiaddr import Multiaddr

    messages, digest = payload(size, message)
    host = bare_host()
    with trio.fail_after(timeout):
        address = json.loads(await parent_line())["address"]
        info = info_from_p2p_addr(Multiaddr(address))
        async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
            try:
                dialled = time.time()
                await host.connect(info)
                stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
                start, cpu = time.time(), time.process_time()
                for data in messages:
                    await stream.write(data)
                if await stream.read(len(DONE)) != DONE:
                    raise EOFError("the receiver did not confirm")
                emit(
                    {
                        "start": start,
                        "connect_s": start - dialled,
                        "sha256": digest,
                        "cpu_s": time.process_time() - cpu,
                    }
                )
                await stream.close()
            finally:
                await close_host(host)


async def libp2p_receiver(size: int, message: int, timeout: float) -> None:
    import trio
    from libp2p.abc import INetStream
    from libp2p.custom_types import TProtocol
    from multiaddr import Multiaddr

    tally = Tally(size)
    host = bare_host()
    arrived, incoming = trio.open_memory_channel[INetStream](1)
    finished = trio.Event()

    async def handle(stream: INetStream) -> None:
        await arrived.send(stream)
        await finished.wait()  # the stream is the main task's until then

    with trio.fail_after(timeout):
        async with host.run(listen_addrs=[Multiaddr(LISTEN)]):
            try:
                host.set_stream_handler(TProtocol(PROTOCOL), handle)
                emit({"address": str(host.get_addrs()[0])})
                stream = await incoming.receive()
                tally.begin()
                while True:
                    data = await stream.read(READ_BYTES)  # raises at the end of the stream
                    if not data:
                        raise EOFError("the stream ended early")
                    if tally.add(data):
                        break
                await stream.write(DONE)
                emit(tally.result())
                await parent_line()  # close when told (or orphaned)
                finished.set()
            finally:
                await close_host(host)


Role = Callable[[int, int, float], Coroutine[Any, Any, None]]
ROLES: dict[str, tuple[str, Role]] = {
    "aiortc-sender": ("asyncio", aiortc_sender),
    "aiortc-receiver": ("asyncio", aiortc_receiver),
    "libp2p-sender": ("trio", libp2p_sender),
    "libp2p-receiver": ("trio", libp2p_receiver),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--message", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    args = parser.parse_args()
    loop, role = ROLES[args.role]
    if loop == "asyncio":
        asyncio.run(role(args.size, args.message, args.timeout))
    else:
        import trio

        trio.run(role, args.size, args.message, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
