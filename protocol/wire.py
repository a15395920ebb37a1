"""A strict codec for the protobuf wire format (a subset).

Pigeon's wire messages are protobuf messages (varint and length-delimited
fields only).  The schemas live in ``docs/protocol/*.proto`` and are
implemented here by hand so that decoding is strict: a field number may
appear once unless it is repeated, wire types must match the schema, integers
must fit 64 bits, and every failure raises :class:`ProtocolError`.
Unknown field numbers are skipped, as protobuf does, for forward
compatibility.  No I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from .errors import ProtocolError

VARINT: Final = 0
LEN: Final = 2
_MAX_U64: Final = (1 << 64) - 1


def encode_varint(value: int) -> bytes:
    if value < 0 or value > _MAX_U64:
        raise ValueError("varint out of range")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Return (value, new position); refuse overlong and truncated varints."""
    result = 0
    shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise ProtocolError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _MAX_U64 or (byte == 0 and shift):
                raise ProtocolError("malformed varint")
            return result, pos
        shift += 7
        if shift >= 70:
            raise ProtocolError("varint too long")


def iter_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield (field number, wire type, value) for each field of a message."""
    pos = 0
    end = len(data)
    while pos < end:
        key, pos = decode_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0 or number > 0x1FFFFFFF:
            raise ProtocolError("invalid field number")
        if wire_type == VARINT:
            value, pos = decode_varint(data, pos)
            yield number, wire_type, value
        elif wire_type == LEN:
            length, pos = decode_varint(data, pos)
            if length > end - pos:
                raise ProtocolError("truncated field")
            yield number, wire_type, data[pos : pos + length]
            pos += length
        else:
            raise ProtocolError(f"unsupported wire type {wire_type}")


MAX_DISTINCT_FIELDS = 64  # ours use at most 16; the rest is room for newer versions


class Fields:
    """The decoded fields of one message, with strict typed accessors.

    ``repeated`` names the fields that may repeat, each with the most times it
    may: counts are checked while parsing, so a frame of a million tiny
    fields is refused after the first few hundred, not after building a list
    of all of them.  A field not named there may appear once; at most
    :data:`MAX_DISTINCT_FIELDS` field numbers may appear.  Each accessor
    checks the wire type and, when asked, presence and length.
    """

    __slots__ = ("_fields",)

    def __init__(self, data: bytes, repeated: Mapping[int, int] | None = None) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise ProtocolError("expected bytes")
        limits = repeated or {}
        fields: dict[int, list[tuple[int, int | bytes]]] = {}
        for number, wire_type, value in iter_fields(bytes(data)):
            entries = fields.get(number)
            if entries is None:
                if len(fields) >= MAX_DISTINCT_FIELDS:
                    raise ProtocolError("message has too many fields")
                entries = fields[number] = []
            elif len(entries) >= limits.get(number, 1):
                if number in limits:
                    raise ProtocolError(f"field {number} repeats too often")
                raise ProtocolError(f"field {number} appears twice")
            entries.append((wire_type, value))
        self._fields = fields

    def _one(self, number: int, wire_type: int) -> int | bytes | None:
        entries = self._fields.get(number)
        if not entries:
            return None
        got_type, value = entries[0]
        if got_type != wire_type:
            raise ProtocolError(f"field {number} has the wrong type")
        return value

    def uint(self, number: int, *, default: int | None = 0, maximum: int = _MAX_U64) -> int:
        value = self._one(number, VARINT)
        if value is None:
            if default is None:
                raise ProtocolError(f"field {number} is missing")
            return default
        assert isinstance(value, int)
        if default is None and value == 0:
            # Our encoders never write a zero varint, so a required field cannot
            # be zero: accepting it would give a value that does not re-encode.
            raise ProtocolError(f"field {number} is missing")
        if value > maximum:
            raise ProtocolError(f"field {number} is out of range")
        return value

    def bytes_(
        self,
        number: int,
        *,
        required: bool = True,
        size: int | None = None,
        max_size: int | None = None,
    ) -> bytes:
        value = self._one(number, LEN)
        if value is None:
            if required:
                raise ProtocolError(f"field {number} is missing")
            return b""
        assert isinstance(value, bytes)
        if size is not None and len(value) != size:
            raise ProtocolError(f"field {number} must be {size} bytes")
        if max_size is not None and len(value) > max_size:
            raise ProtocolError(f"field {number} is too long")
        return value

    def optional_bytes(self, number: int, *, size: int | None = None) -> bytes | None:
        if not self._fields.get(number):
            return None
        return self.bytes_(number, size=size)

    def text(self, number: int, *, required: bool = True, max_size: int | None = None) -> str:
        raw = self.bytes_(number, required=required, max_size=max_size)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"field {number} is not valid UTF-8") from None

    def repeated_bytes(self, number: int, *, max_size: int) -> list[bytes]:
        """Every occurrence of a repeated field (its count was checked while parsing)."""
        entries = self._fields.get(number, [])
        out: list[bytes] = []
        for wire_type, value in entries:
            if wire_type != LEN or not isinstance(value, bytes):
                raise ProtocolError(f"field {number} has the wrong type")
            if len(value) > max_size:
                raise ProtocolError(f"field {number} is too long")
            out.append(value)
        return out

    def repeated_text(self, number: int, *, max_size: int) -> list[str]:
        try:
            return [raw.decode("utf-8") for raw in self.repeated_bytes(number, max_size=max_size)]
        except UnicodeDecodeError:
            raise ProtocolError(f"field {number} is not valid UTF-8") from None


class Writer:
    """Builds a message; fields are written in the order given (canonical
    when callers write them in field-number order, as ours do)."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def uint(self, number: int, value: int, *, skip_zero: bool = True) -> Writer:
        if value or not skip_zero:
            self._parts.append(encode_varint(number << 3 | VARINT))
            self._parts.append(encode_varint(value))
        return self

    def bytes_(self, number: int, value: bytes, *, skip_empty: bool = True) -> Writer:
        if value or not skip_empty:
            self._parts.append(encode_varint(number << 3 | LEN))
            self._parts.append(encode_varint(len(value)))
            self._parts.append(bytes(value))
        return self

    def text(self, number: int, value: str) -> Writer:
        return self.bytes_(number, value.encode("utf-8"))

    def repeated_bytes(self, number: int, values: Iterable[bytes]) -> Writer:
        for value in values:
            self.bytes_(number, value, skip_empty=False)
        return self

    def repeated_text(self, number: int, values: Iterable[str]) -> Writer:
        return self.repeated_bytes(number, (v.encode("utf-8") for v in values))

    def finish(self) -> bytes:
        return b"".join(self._parts)
