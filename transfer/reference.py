"""What names a file: its reference and the magnet-like URI that carries it.

    pigeon-file:?v=1&root=<64 lowercase hex>&size=<decimal>&chunk=<decimal>&name=<percent-encoded>

The URI travels inside the encrypted chat (a FileOffer) and names one exact
file: the Merkle root commits to every chunk.  Parsing is strict and
canonical: a URI is accepted only if :meth:`FileRef.to_uri` would write it
exactly so, so two references are equal when their URIs are.  The name rules
live here too, for the receiver (:func:`check_name`) and for the sender
(:func:`safe_name`).  No I/O here (docs/protocol/files.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from pigeon.protocol.errors import ProtocolError

MIN_CHUNK = 16 * 1024
# One encrypted chunk (plus the CHUNK message's 5-byte header and the 16-byte
# tag) must fit in one WebRTC data-channel message, whose limit is 256 KiB.
MAX_CHUNK = 128 * 1024
DEFAULT_CHUNK = MAX_CHUNK
MAX_CHUNKS = 2**20  # so a file is at most 128 GiB at the default chunk size
HASH_SIZE = 32  # SHA-256: the root and every node of the Merkle tree
MAX_NAME_BYTES = 255  # what ext4, APFS and NTFS hold in one path component
MAX_URI_CHARS = 4096
URI_VERSION = 1

_PREFIX = "pigeon-file:?"
_KEYS = ("v", "root", "size", "chunk", "name")
# What a canonical URI's query may hold: the unreserved characters quote()
# leaves alone, the percent escapes it writes, and the separators.
_QUERY = re.compile(r"[A-Za-z0-9_.~=&%-]*")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,19}")  # canonical, and below 10**20 (no huge ints)
_HEX_ROOT = re.compile(r"[0-9a-f]{64}")
# Characters that make a name lie about itself on screen (bidirectional
# overrides and isolates, direction marks) or break it across lines.
_DECEPTIVE = frozenset(
    [
        *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A)),
        *("\u200e", "\u200f", "\u2028", "\u2029"),
    ]
)


def _forbidden(ch: str) -> bool:
    """A character no name may hold: a path separator, a control character
    (C0, DEL, C1), a deceptive format character, or a lone surrogate."""
    code = ord(ch)
    return (
        ch in "/\\"
        or code < 0x20
        or 0x7F <= code <= 0x9F
        or ch in _DECEPTIVE
        or 0xD800 <= code <= 0xDFFF
    )


def check_name(name: str) -> None:
    """Refuse a file name that is not safe to show and to save as one path component.

    The receiver still picks the path itself (an existing file, a name its
    system cannot hold); this only guarantees the name cannot escape the
    folder it is saved in or disguise itself on screen.  Zero-width joiners
    and other format characters stay allowed: emoji sequences use them.
    """
    if not name:
        raise ProtocolError("file name is empty")
    if name in (".", ".."):
        raise ProtocolError("file name is '.' or '..'")
    if "/" in name or "\\" in name:
        raise ProtocolError("file name contains a slash or a backslash")
    if any(0xD800 <= ord(ch) <= 0xDFFF for ch in name):
        raise ProtocolError("file name is not valid text (a lone surrogate)")
    if any(_forbidden(ch) for ch in name):
        raise ProtocolError(
            "file name contains a control character, a direction mark or a line separator"
        )
    if name != name.strip():
        raise ProtocolError("file name starts or ends with a space")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ProtocolError(f"file name is longer than {MAX_NAME_BYTES} bytes of UTF-8")


_MAX_EXTENSION_BYTES = 32  # a longer "extension" is part of the name, not a file type
_FALLBACK_NAME = "file"


def _truncate_utf8(text: str, limit: int) -> str:
    """The longest prefix of ``text`` whose UTF-8 form fits in ``limit`` bytes."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def safe_name(name: str) -> str:
    """A name :func:`check_name` accepts, made from a local file name, so that
    sending a file never fails because of what it is called.

    Forbidden characters become "_", surrounding whitespace goes, and a long
    name is cut on a character boundary, keeping its extension when it has a
    short one.  A name that is already valid comes back unchanged.
    """
    # Stripped before and after: a newline at the end is whitespace, not a "_".
    cleaned = "".join("_" if _forbidden(ch) else ch for ch in name.strip()).strip()
    if cleaned in ("", ".", ".."):
        return _FALLBACK_NAME
    if len(cleaned.encode("utf-8")) <= MAX_NAME_BYTES:
        return cleaned
    stem, dot, extension = cleaned.rpartition(".")
    suffix = dot + extension
    if not stem or not extension or len(suffix.encode("utf-8")) > _MAX_EXTENSION_BYTES:
        stem, suffix = cleaned, ""
    # The stem starts with a non-space character of at most 4 bytes and the
    # budget is over 200 bytes, so the cut never leaves it empty.
    return _truncate_utf8(stem, MAX_NAME_BYTES - len(suffix.encode("utf-8"))).rstrip() + suffix


def check_geometry(size: int, chunk_size: int) -> None:
    """Refuse a size and chunk size no reference may carry."""
    if not MIN_CHUNK <= chunk_size <= MAX_CHUNK or chunk_size & (chunk_size - 1):
        raise ProtocolError(
            f"chunk size must be a power of two from {MIN_CHUNK} to {MAX_CHUNK} bytes"
        )
    limit = chunk_size * MAX_CHUNKS
    if not 0 <= size <= limit:
        raise ProtocolError(
            f"file size must be 0 to {limit:,} bytes ({MAX_CHUNKS:,} chunks of {chunk_size:,})"
        )


@dataclass(frozen=True)
class FileRef:
    """One exact file: the Merkle root of its encrypted chunks, its size, its
    chunk size and the name it is offered under.  Always valid: constructing
    one that breaks a rule raises ProtocolError."""

    root: bytes
    size: int
    chunk_size: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise ProtocolError(f"file root must be {HASH_SIZE} bytes")
        check_geometry(self.size, self.chunk_size)
        check_name(self.name)

    def to_uri(self) -> str:
        return (
            f"{_PREFIX}v={URI_VERSION}&root={self.root.hex()}&size={self.size}"
            f"&chunk={self.chunk_size}&name={quote(self.name, safe='')}"
        )


def _decimal(value: str, key: str) -> int:
    if not _DECIMAL.fullmatch(value):
        raise ProtocolError(f"file reference has a malformed {key} (a plain decimal number)")
    return int(value)


def _name(value: str) -> str:
    try:
        name = unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("file reference has a name that is not UTF-8") from None
    # Malformed escapes (%zz), lowercase hex and escaped letters all fail this.
    if quote(name, safe="") != value:
        raise ProtocolError("file reference has a name that is not canonically percent-encoded")
    check_name(name)
    return name


def parse_uri(text: str) -> FileRef:
    """The reference a pigeon-file URI names; ProtocolError, saying why, unless
    the URI is exactly what :meth:`FileRef.to_uri` writes for it."""
    if not isinstance(text, str):
        raise ProtocolError("a file reference is text")
    if len(text) > MAX_URI_CHARS:
        raise ProtocolError(f"file reference is longer than {MAX_URI_CHARS} characters")
    if not text.startswith(_PREFIX):
        raise ProtocolError("not a Pigeon file reference (it must start with 'pigeon-file:?')")
    query = text[len(_PREFIX) :]
    if not _QUERY.fullmatch(query):
        raise ProtocolError("file reference contains a character that must be percent-encoded")
    pairs = [part.partition("=") for part in query.split("&")]
    if pairs[0][0] == "v" and pairs[0][2] != str(URI_VERSION):
        raise ProtocolError("file reference is of a version this Pigeon cannot read (not v=1)")
    values: dict[str, str] = {}
    for key, sep, value in pairs:
        if not sep:
            raise ProtocolError("file reference has a field without '='")
        if key not in _KEYS:
            raise ProtocolError("file reference has an unknown field")
        if key in values:
            raise ProtocolError(f"file reference has the field {key!r} twice")
        values[key] = value
    missing = [key for key in _KEYS if key not in values]
    if missing:
        raise ProtocolError(f"file reference has no {missing[0]!r}")
    if tuple(values) != _KEYS:
        raise ProtocolError("file reference fields are not in the order v, root, size, chunk, name")
    if not _HEX_ROOT.fullmatch(values["root"]):
        raise ProtocolError("file reference root must be 64 lowercase hexadecimal digits")
    return FileRef(
        bytes.fromhex(values["root"]),
        _decimal(values["size"], "size"),
        _decimal(values["chunk"], "chunk size"),
        _name(values["name"]),
    )


def human_size(size: float) -> str:
    """A size as people read it: 999 bytes, 1.5 KB, 20.0 MB (powers of 1000)."""
    value = float(size)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
