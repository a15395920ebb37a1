"""Safety numbers: Signal's numeric fingerprint, version 1.

Each side's half is SHA-512 iterated over (version, key, stable ID); the
displayed number is both halves' 30 digits, the smaller first, so both people
see the same 60 digits.  The scannable form is libsignal's
``CombinedFingerprints`` protobuf, so it can be checked against libsignal's
vectors; the QR code carries it base32-encoded.  No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from .errors import ProtocolError
from .wire import Fields, Writer

SCANNABLE_VERSION = 1
_FINGERPRINT_VERSION = b"\x00\x00"
QR_PREFIX = "PIGEONSN:"


def _fingerprint(key: bytes, stable_id: bytes, iterations: int) -> bytes:
    if iterations <= 1 or iterations > 1_000_000:
        raise ValueError("iterations must be in 2..1000000")
    digest = hashlib.sha512(_FINGERPRINT_VERSION + key + stable_id + key).digest()
    for _ in range(iterations - 1):
        digest = hashlib.sha512(digest + key).digest()
    return digest


def _digits(fingerprint: bytes) -> str:
    return "".join(
        f"{int.from_bytes(fingerprint[i : i + 5], 'big') % 100_000:05d}" for i in range(0, 30, 5)
    )


def safety_number(
    local_key: bytes,
    local_id: bytes,
    remote_key: bytes,
    remote_id: bytes,
    iterations: int = 5200,
) -> str:
    """The 60-digit safety number (no spaces) two people compare out loud."""
    local = _digits(_fingerprint(local_key, local_id, iterations))
    remote = _digits(_fingerprint(remote_key, remote_id, iterations))
    return local + remote if local < remote else remote + local


def format_safety_number(number: str) -> str:
    """Twelve groups of five digits, as Signal shows them."""
    return " ".join(number[i : i + 5] for i in range(0, len(number), 5))


def scannable_fingerprint(
    local_key: bytes,
    local_id: bytes,
    remote_key: bytes,
    remote_id: bytes,
    iterations: int = 5200,
) -> bytes:
    """libsignal's CombinedFingerprints protobuf (version 1) for this pair."""
    local = _fingerprint(local_key, local_id, iterations)[:32]
    remote = _fingerprint(remote_key, remote_id, iterations)[:32]
    return (
        Writer()
        .uint(1, SCANNABLE_VERSION)
        .bytes_(2, Writer().bytes_(1, local).finish())
        .bytes_(3, Writer().bytes_(1, remote).finish())
        .finish()
    )


def _parse_scannable(data: bytes) -> tuple[int, bytes, bytes]:
    fields = Fields(data)
    version = fields.uint(1, default=None, maximum=0xFFFFFFFF)
    local = Fields(fields.bytes_(2)).bytes_(1, size=32)
    remote = Fields(fields.bytes_(3)).bytes_(1, size=32)
    return version, local, remote


def compare_scannable(ours: bytes, theirs: bytes) -> bool:
    """True when ``theirs`` (scanned from the other phone) matches ``ours``.

    Their "local" half must equal our "remote" half and vice versa.
    Raises ProtocolError when ``theirs`` is not a fingerprint or has another
    version.
    """
    our_version, our_local, our_remote = _parse_scannable(ours)
    their_version, their_local, their_remote = _parse_scannable(theirs)
    if their_version != our_version:
        raise ProtocolError(
            f"the scanned code is safety-number version {their_version}, we use {our_version}"
        )
    return hmac.compare_digest(their_local, our_remote) & hmac.compare_digest(
        their_remote, our_local
    )


def scannable_to_qr_text(scannable: bytes) -> str:
    """QR text (alphanumeric mode friendly): a prefix and uppercase base32."""
    return QR_PREFIX + base64.b32encode(scannable).decode("ascii").rstrip("=")


def scannable_from_qr_text(text: str) -> bytes:
    text = text.strip()
    if not text.startswith(QR_PREFIX):
        raise ProtocolError("not a Pigeon safety-number code")
    body = text[len(QR_PREFIX) :]
    try:
        data = base64.b32decode(body + "=" * (-len(body) % 8))
    except (binascii.Error, ValueError):
        raise ProtocolError("safety-number code is not valid base32") from None
    _parse_scannable(data)
    return data
