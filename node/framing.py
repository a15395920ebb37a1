"""Length-prefixed frames on libp2p streams, with a size limit and deadline,
and the loop that serves a request-answer protocol on one stream."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from libp2p.abc import INetStream

from pigeon.protocol import ProtocolError
from pigeon.protocol.wire import encode_varint

from .limits import REFUSALS, SMALL_FRAME, OverBudget, budget_of

log = logging.getLogger("pigeon.node")

FRAME_TIMEOUT = 30.0


class StreamClosed(Exception):
    """The other side closed the stream cleanly between frames."""


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            chunk = await stream.read(n - len(data))
        except trio.Cancelled:
            raise
        except Exception:
            chunk = b""
        if not chunk:
            raise ProtocolError(f"stream ended {len(data)} bytes into a {n}-byte frame")
        data += chunk
    return bytes(data)


async def read_frame(stream: INetStream, max_size: int, timeout: float = FRAME_TIMEOUT) -> bytes:
    with trio.fail_after(timeout):
        length = 0
        for shift in range(0, 35, 7):
            try:
                byte = await stream.read(1)
            except trio.Cancelled:
                raise
            except Exception:
                byte = b""
            if not byte:
                if shift == 0:
                    raise StreamClosed()
                raise ProtocolError("stream ended inside a frame header")
            length |= (byte[0] & 0x7F) << shift
            if not byte[0] & 0x80:
                break
        else:
            raise ProtocolError("frame length is malformed")
        if length > max_size:
            raise ProtocolError(f"frame of {length} bytes is over the {max_size}-byte limit")
        # A large frame reserves its declared length before its body is read,
        # so that what peers declare, not what they send, is what is bounded
        # (see limits.py); smaller ones are bounded by the stream limits.
        budget = budget_of(stream) if length > SMALL_FRAME else None
        if budget is None:
            return await _read_exactly(stream, length)
        async with budget.reserve(length):
            return await _read_exactly(stream, length)


def frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload


async def serve_frames(
    stream: INetStream, max_size: int, answer: Callable[[bytes], bytes], protocol: str
) -> None:
    """Answer each frame the peer sends with one frame, until it closes the
    stream; a frame that is too large, malformed or late ends the stream with
    one log line.  The stream is always closed."""
    peer = stream.muxed_conn.peer_id
    try:
        while True:
            try:
                data = await read_frame(stream, max_size)
            except StreamClosed:
                return
            await stream.write(frame(answer(data)))
    except OverBudget as error:
        REFUSALS.refused(peer, "peer=%s %s frame refused: %s", peer, protocol, error)
    except ProtocolError as error:
        REFUSALS.refused(peer, "peer=%s sent a bad %s frame: %s", peer, protocol, error)
    except trio.TooSlowError:
        REFUSALS.refused(peer, "peer=%s %s stream idle, closed", peer, protocol)
    except Exception as error:
        log.info("peer=%s %s stream ended: %s", peer, protocol, type(error).__name__)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stream.close()
