"""Length-prefixed frames on libp2p streams, with a size limit and deadline,
and the delivery acknowledgement statuses."""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

from pigeon.protocol import ProtocolError
from pigeon.protocol.wire import encode_varint

FRAME_TIMEOUT = 30.0
# What the receiver of a Deliver frame says about each envelope in it.
ACK_STORED, ACK_DUPLICATE, ACK_REFUSED = 0, 1, 2


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
        return await _read_exactly(stream, length)


def frame(payload: bytes) -> bytes:
    return encode_varint(len(payload)) + payload
