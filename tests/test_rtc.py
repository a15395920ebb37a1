"""The trio bridge to aiortc (pigeon.transfer.rtc) with real aiortc on 127.0.0.1: two
RtcThreads in one process, and one test with the two ends in two processes (this file,
run as a script, is the other end).  ICE servers are never configured, so nothing waits
on a public STUN server."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import logging
import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aioice.ice
import pytest
import trio

from pigeon.transfer.rtc import (
    HIGH_WATER,
    LOW_WATER,
    Channel,
    ChannelClosed,
    ConnectFailed,
    IceServer,
    RtcError,
    RtcThread,
    parse_ice_server,
)

HOSTS = ["127.0.0.1"]
MiB = 1024 * 1024
CHUNK = 128 * 1024
TEST_NET_3 = "203.0.113.1"  # RFC 5737: never routed (TEST-NET-1 is this machine's own LAN)


async def connect(a: RtcThread, b: RtcThread, timeout: float = 10) -> tuple[Channel, Channel]:
    """Offer from ``a``, answer from ``b``: the two ends of one open channel."""
    dialing_a, offer = await a.offer()
    dialing_b, answer = await b.answer(offer)
    await dialing_a.accept_answer(answer)
    return await dialing_a.connected(timeout), await dialing_b.connected(timeout)


@asynccontextmanager
async def pair() -> AsyncIterator[tuple[RtcThread, RtcThread, Channel, Channel]]:
    async with RtcThread(host_addresses=HOSTS) as a, RtcThread(host_addresses=HOSTS) as b:
        yield a, b, *await connect(a, b)


async def drain(channel: Channel) -> tuple[int, str, list[int]]:
    """Read until the channel ends: byte count, SHA-256 and message sizes."""
    digest = hashlib.sha256()
    sizes = []
    try:
        while True:
            message = await channel.receive()
            digest.update(message)
            sizes.append(len(message))
    except ChannelClosed:
        return sum(sizes), digest.hexdigest(), sizes


async def _collect(channel: Channel, into: list[tuple[int, str, list[int]]]) -> None:
    into.append(await drain(channel))


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def test_twenty_mib_arrive_whole_and_in_order():
    data = payload(20 * MiB)

    async def scenario():
        with trio.fail_after(40):
            async with pair() as (_, _, sender, receiver):
                assert sender.max_message == receiver.max_message == 262144
                async with trio.open_nursery() as nursery:
                    result = []
                    nursery.start_soon(_collect, receiver, result)
                    for offset in range(0, len(data), CHUNK):
                        await sender.send(data[offset : offset + CHUNK])
                    await sender.close()
                return result[0]

    count, digest, sizes = trio.run(scenario)
    assert count == len(data)
    assert set(sizes) == {CHUNK}
    assert digest == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_twenty_mib_between_two_processes():
    data = payload(20 * MiB, seed=2)

    async def scenario():
        with trio.fail_after(60):
            proc = await trio.lowlevel.open_process(
                [sys.executable, __file__, "answer"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            assert proc.stdin is not None and proc.stdout is not None
            lines = LineReader(proc.stdout)
            try:
                async with RtcThread(host_addresses=HOSTS) as rtc:
                    dialing, offer = await rtc.offer()
                    await proc.stdin.send_all(json.dumps({"sdp": offer}).encode() + b"\n")
                    await dialing.accept_answer(json.loads(await lines.next())["sdp"])
                    channel = await dialing.connected(10)
                    for offset in range(0, len(data), CHUNK):
                        await channel.send(data[offset : offset + CHUNK])
                    await channel.close()
                    report = json.loads(await lines.next())
                assert await proc.wait() == 0
                return report
            finally:
                with trio.CancelScope(shield=True):
                    if proc.returncode is None:
                        proc.kill()
                        await proc.wait()

    report = trio.run(scenario)
    assert report == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class LineReader:
    """Lines from the other process's stdout."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def next(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some()
            if not chunk:
                raise EOFError("the other process ended")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line


async def answer_from_stdin() -> None:
    """The far end of the two-process test: answer the offer read from stdin, print the
    answer, receive until the channel closes, print what arrived."""
    async with RtcThread(host_addresses=HOSTS) as rtc:
        offer = json.loads(await trio.to_thread.run_sync(sys.stdin.readline))["sdp"]
        dialing, answer = await rtc.answer(offer)
        print(json.dumps({"sdp": answer}), flush=True)
        count, digest, _ = await drain(await dialing.connected(10))
        print(json.dumps({"bytes": count, "sha256": digest}), flush=True)


def test_no_local_candidate_fails_at_once():
    # aiortc alone would stay in state "new" forever.
    async def scenario():
        async with RtcThread(host_addresses=[]) as a, RtcThread(host_addresses=[]) as b:
            started = time.monotonic()
            with pytest.raises(ConnectFailed, match="network address") as failed:
                await connect(a, b, timeout=30)
            assert "\n" not in str(failed.value)
            return time.monotonic() - started

    assert trio.run(scenario) < 2


def test_unroutable_candidates_fail_after_the_timeout():
    def unroutable(sdp: str) -> str:
        return sdp.replace(HOSTS[0], TEST_NET_3)

    async def scenario():
        async with RtcThread(host_addresses=HOSTS) as a, RtcThread(host_addresses=HOSTS) as b:
            dialing_a, offer = await a.offer()
            dialing_b, answer = await b.answer(unroutable(offer))
            await dialing_a.accept_answer(unroutable(answer))
            outcomes = []

            async def wait(dialing):
                started = time.monotonic()
                with pytest.raises(ConnectFailed, match="within 2 s"):
                    await dialing.connected(timeout=2)
                outcomes.append(time.monotonic() - started)

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(wait, dialing_a)
                    nursery.start_soon(wait, dialing_b)
            # Both connections were closed on failure (white box); the threads still work.
            assert not a._peers and not b._peers
            await connect(a, b)
            return outcomes

    outcomes = trio.run(scenario)
    assert len(outcomes) == 2
    assert all(1.9 < seconds < 2 + 2 for seconds in outcomes), outcomes


def test_a_close_reaches_the_other_side_after_what_was_sent():
    async def scenario():
        async with pair() as (_, _, a, b):
            for size in (1, 1000, CHUNK):
                await a.send(bytes([size % 256]) * size)
            await trio.sleep(0.5)  # arrived and queued for b, which reads nothing yet
            closed = time.monotonic()
            await a.close()
            await a.close()  # twice is harmless
            with trio.fail_after(5):
                *_, sizes = await drain(b)
            assert sizes == [1, 1000, CHUNK]
            with pytest.raises(ChannelClosed, match="peer closed"):
                await b.receive()  # and it stays closed
            with pytest.raises(ChannelClosed, match="closed here"):
                await a.send(b"late")
            with pytest.raises(ChannelClosed):
                await b.send(b"late")
            return time.monotonic() - closed

    assert trio.run(scenario) < 3


def test_closing_right_after_sending_loses_nothing():
    # aiortc's own pc.close() right after send() drops everything still queued.
    data = payload(6 * MiB, seed=3)

    async def scenario():
        with trio.fail_after(30):
            async with pair() as (_, _, a, b):
                result = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_collect, b, result)
                    for offset in range(0, len(data), CHUNK):
                        await a.send(data[offset : offset + CHUNK])
                    await a.close()
                return result[0]

    count, digest, _ = trio.run(scenario)
    assert (count, digest) == (len(data), hashlib.sha256(data).hexdigest())


def test_a_cancelled_wait_leaves_the_connection_to_a_later_one():
    async def scenario():
        async with RtcThread(host_addresses=HOSTS) as a, RtcThread(host_addresses=HOSTS) as b:
            dialing_a, offer = await a.offer()
            with trio.move_on_after(0.2):  # while it waits on the loop
                await dialing_a.connected(10)
            dialing_b, answer = await b.answer(offer)
            await dialing_a.accept_answer(answer)
            channel_a, channel_b = await dialing_a.connected(10), await dialing_b.connected(10)
            await channel_b.send(b"after all")
            assert await channel_a.receive() == b"after all"

    trio.run(scenario)


def test_close_from_a_cancelled_scope_still_closes():
    async def scenario():
        async with pair() as (rtc_a, _, a, b):
            dialing, _ = await rtc_a.offer()
            with trio.CancelScope() as scope:
                scope.cancel()
                await a.close()
                await dialing.close()
            # Both connections were closed by the time close() returned (white box).
            assert not rtc_a._peers
            await dialing.close()  # twice is harmless
            with trio.fail_after(5), pytest.raises(ChannelClosed):
                await b.receive()

    trio.run(scenario)


def test_send_waits_while_the_peer_is_stalled_and_resumes():
    """Mid-transfer, the receiver's asyncio loop blocks: nothing more is acknowledged, so
    send() must stop returning once aiortc holds HIGH_WATER bytes (its bufferedAmount
    never above HIGH_WATER plus one message), and go on once the peer reads again."""

    async def buffered(rtc: RtcThread, channel: Channel) -> int:
        # White box: aiortc's count of bytes not yet handed to SCTP, read on its loop.
        async def read() -> int:
            return channel._peer.channel.bufferedAmount

        return await rtc._call(read())

    async def scenario():
        async with pair() as (a, b, sender, receiver):
            stall = threading.Event()
            accepted = 0
            highest = 0

            async def send_50_mib():
                nonlocal accepted
                message = payload(CHUNK, seed=4)
                for _ in range(50 * MiB // CHUNK):
                    await sender.send(message)
                    accepted += CHUNK

            async def read_all():
                with pytest.raises(ChannelClosed):
                    while True:
                        await receiver.receive()

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send_50_mib)
                    nursery.start_soon(read_all)
                    with trio.fail_after(10):
                        while accepted < 3 * MiB:  # flowing, and past HIGH_WATER
                            await trio.sleep(0.02)
                    b._loop.call_soon_threadsafe(stall.wait, 30)
                    for _ in range(15):
                        await trio.sleep(0.1)
                        highest = max(highest, await buffered(a, sender))
                    stalled_at = accepted
                    await trio.sleep(0.5)
                    assert accepted == stalled_at, "send() kept returning"
                    stall.set()
                    with trio.fail_after(10):
                        while accepted < stalled_at + 4 * MiB:
                            await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            finally:
                stall.set()
            return highest

    # A blocked send() waits for LOW_WATER, so more than that is queued while it waits.
    assert LOW_WATER < trio.run(scenario) <= HIGH_WATER + CHUNK


def test_exit_with_open_connections_is_clean(caplog):
    caplog.set_level(logging.WARNING)

    async def scenario():
        async with RtcThread(host_addresses=HOSTS) as b:
            async with RtcThread(host_addresses=HOSTS) as a:
                _, channel = await connect(a, b)
                await a.offer()  # never answered
                await b.answer((await a.offer())[1])  # answered, never connected
                exited = time.monotonic()
            with trio.fail_after(5), pytest.raises(ChannelClosed):
                await channel.receive()
            return time.monotonic() - exited

    assert trio.run(scenario) < 3
    gc.collect()  # "coroutine was never awaited" and the like surface here
    assert not [t for t in threading.enumerate() if t.name == "pigeon-rtc"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


GARBAGE = [
    "",
    "garbage",
    "\x00\xff" * 40,
    "v=0\r\n",
    # A description without a data channel (audio only).
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"
    "c=IN IP4 0.0.0.0\r\na=rtcp-mux\r\na=rtpmap:0 PCMU/8000\r\na=ice-ufrag:abcd\r\n"
    "a=ice-pwd:abcdabcdabcdabcdabcdabcd\r\na=fingerprint:sha-256 AA\r\na=setup:actpass\r\n"
    "a=mid:0\r\n",
]


def mangled(sdp: str) -> list[str]:
    """Real descriptions cut short or with one line dropped or broken."""
    lines = sdp.split("\r\n")
    variants = [sdp[: len(sdp) // 2], sdp.replace("a=ice-ufrag", "a=ice-ufra")]
    variants += ["\r\n".join(lines[:i] + lines[i + 1 :]) for i in range(len(lines))]
    variants += [re.sub(r"m=application \d+", "m=application x", sdp)]
    return variants


def test_garbage_descriptions_raise_rtc_error_and_leave_the_thread_usable():
    async def scenario():
        async with RtcThread(host_addresses=HOSTS) as a, RtcThread(host_addresses=HOSTS) as b:
            dialing_a, offer = await a.offer()
            dialing_b, answer = await b.answer(offer)
            for text in GARBAGE:
                with pytest.raises(RtcError) as failed:
                    await b.answer(text)
                assert "\n" not in str(failed.value) and len(str(failed.value)) < 300
            refused = 0
            for text in mangled(offer):
                try:
                    accepted, _ = await b.answer(text)
                except RtcError as exc:
                    assert "\n" not in str(exc) and len(str(exc)) < 300, str(exc)
                    refused += 1
                else:
                    await accepted.close()
            for text in [*GARBAGE, offer, *mangled(answer)[:2]]:
                with pytest.raises(RtcError) as failed:
                    await dialing_a.accept_answer(text)
                assert "\n" not in str(failed.value) and len(str(failed.value)) < 300
            # Refused offers leave no connection behind (white box); the real answer works.
            assert b._peers == {dialing_b._peer}
            await dialing_a.accept_answer(answer)
            with pytest.raises(RtcError, match="only be accepted once"):
                await dialing_a.accept_answer(answer)
            with pytest.raises(RtcError, match="side that made the offer"):
                await dialing_b.accept_answer(answer)
            channel_a, channel_b = await dialing_a.connected(10), await dialing_b.connected(10)
            await channel_a.send(b"still works")
            assert await channel_b.receive() == b"still works"
            return refused

    # Most mangled offers still parse (a line aiortc does not need, one of three
    # fingerprints): fine, as long as nothing but RtcError escapes.
    assert trio.run(scenario) >= 5


def test_messages_larger_than_the_peer_accepts_are_refused_here():
    async def scenario():
        async with pair() as (_, _, a, b):
            with pytest.raises(RtcError, match="larger than the peer accepts"):
                await a.send(bytes(a.max_message + 1))
            await a.send(bytes(a.max_message))
            assert len(await b.receive()) == a.max_message

    trio.run(scenario)


def candidate_addresses(sdp: str) -> set[str]:
    return {line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")}


def test_each_webrtc_thread_offers_its_own_host_addresses():
    """Nodes in one process (a simulation) each offer their own address, at
    the same time, and a thread without a choice gets aioice's own."""
    own = aioice.ice.get_host_addresses

    async def scenario():
        async with (
            RtcThread(host_addresses=["127.0.0.2"]) as a,
            RtcThread(host_addresses=["127.0.0.3"]) as b,
            RtcThread() as anywhere,
        ):
            dialing_a, offer = await a.offer()
            dialing_b, answer = await b.answer(offer)
            assert candidate_addresses(offer) == {"127.0.0.2"}
            assert candidate_addresses(answer) == {"127.0.0.3"}
            await dialing_a.accept_answer(answer)
            one, other = await dialing_a.connected(10), await dialing_b.connected(10)
            await one.send(b"from 127.0.0.2")
            assert await other.receive() == b"from 127.0.0.2"
            _, elsewhere = await anywhere.offer()
            assert candidate_addresses(elsewhere) == set(own(use_ipv4=True, use_ipv6=True))
        assert aioice.ice.get_host_addresses is own
        with pytest.raises(RtcError, match="not an IP address"):
            RtcThread(host_addresses=["localhost"])

    trio.run(scenario)


@pytest.mark.parametrize(
    ("url", "server"),
    [
        ("stun:stun.example.org:3478", IceServer("stun:stun.example.org:3478")),
        ("stun:192.0.2.7", IceServer("stun:192.0.2.7")),
        (
            "turn:alice:pa:ss@w@turn.example.org:3478",
            IceServer("turn:turn.example.org:3478", "alice", "pa:ss@w"),
        ),
        (
            "turns:bob:pw@t.example.org?transport=tcp",
            IceServer("turns:t.example.org?transport=tcp", "bob", "pw"),
        ),
    ],
)
def test_ice_server_urls_parse(url, server):
    assert parse_ice_server(url) == server
    RtcThread([server])


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("garbage", "not a STUN or TURN server"),
        ("stun:", "not a STUN or TURN server"),
        ("stun:host:70000", "port is out of range"),
        ("stuns:stun.example.org", "not usable"),  # aiortc would skip it silently
        ("turn:alice:secret@turn.example.org?transport=sctp", "not usable"),
        ("turn:turn.example.org", "needs a user name and password"),
    ],
)
def test_unusable_ice_servers_are_refused_up_front(url, complaint):
    with pytest.raises(RtcError, match=complaint) as refused:
        parse_ice_server(url)
    with pytest.raises(RtcError) as refused_too:
        RtcThread([IceServer(url)])  # the password left in the URL: still not shown
    assert "secret" not in str(refused.value) + str(refused_too.value)


def test_one_stun_and_one_turn_server_at_most():
    # aiortc uses the first of each kind and ignores the rest without a word.
    stun, turn = parse_ice_server("stun:a.example.org"), parse_ice_server("turn:u:p@b.example.org")
    RtcThread([stun, turn])
    for servers in ([stun, stun], [turn, parse_ice_server("turns:u:p@c.example.org")]):
        with pytest.raises(RtcError, match="at most one of each"):
            RtcThread(servers)


def test_unexpected_errors_on_the_loop_come_back_as_rtc_error():
    async def scenario():
        async with RtcThread(host_addresses=HOSTS) as rtc:

            async def broken() -> None:
                await asyncio.sleep(0)
                raise KeyError("internal")

            with pytest.raises(RtcError, match="unexpectedly: 'internal'") as failed:
                await rtc._call(broken())
            assert isinstance(failed.value.__cause__, KeyError)

    trio.run(scenario)


if __name__ == "__main__" and sys.argv[1:] == ["answer"]:
    trio.run(answer_from_stdin)
