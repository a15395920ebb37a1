"""The contact code: the string (and QR code) people exchange to add each other.

    pigeon:<base32 of identity key + 2-byte check>?name=<display name>[&addr=<multiaddr>]...

The key part is lowercase RFC 4648 base32 without padding (55 characters);
the check catches typos before anything is looked up.  Parsing is strict:
anything unexpected is a ProtocolError that says what is wrong.  No I/O here.
"""

from __future__ import annotations

import base64
import binascii
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote

from .crypto import sha256
from .errors import ProtocolError
from .keys import IDENTITY_KEY_SIZE, ed25519_to_x25519_public, identity_id

SCHEME = "pigeon:"
MAX_NAME_CHARS = 64
MAX_ADDRESSES = 8
MAX_ADDRESS_CHARS = 256
_KEY_CHARS = 55  # base32 of 34 bytes, unpadded


def _check(key: bytes) -> bytes:
    return sha256(b"pigeon/contact-code/v1\x00" + key)[:2]


def validate_name(name: str) -> str:
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in name):
        raise ProtocolError("name contains control characters")
    name = unicodedata.normalize("NFC", name.strip())
    if not name:
        raise ProtocolError("name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise ProtocolError(f"name is longer than {MAX_NAME_CHARS} characters")
    return name


@dataclass(frozen=True)
class ContactCode:
    identity_key: bytes
    name: str
    addresses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.identity_key) != IDENTITY_KEY_SIZE:
            raise ValueError("identity key must be 32 bytes")

    @property
    def identity_id(self) -> bytes:
        return identity_id(self.identity_key)

    def to_uri(self) -> str:
        key = base64.b32encode(self.identity_key + _check(self.identity_key))
        query = "name=" + quote(self.name, safe="")
        for address in self.addresses:
            query += "&addr=" + quote(address, safe="/")
        return SCHEME + key.decode("ascii").rstrip("=").lower() + "?" + query

    @classmethod
    def parse(cls, uri: str) -> ContactCode:
        text = uri.strip()
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ProtocolError("contact code is not valid text") from None
        if not text.startswith(SCHEME):
            raise ProtocolError("not a Pigeon contact code (it must start with 'pigeon:')")
        body = text[len(SCHEME) :]
        key_part, sep, query = body.partition("?")
        if not sep:
            raise ProtocolError("contact code has no name (missing '?name=...')")
        if len(key_part) != _KEY_CHARS or not key_part.isascii() or not key_part.islower():
            raise ProtocolError("contact code key has the wrong length or characters")
        try:
            raw = base64.b32decode(key_part.upper() + "=" * 1)
        except (binascii.Error, ValueError):
            raise ProtocolError("contact code key is not valid base32") from None
        if base64.b32encode(raw).decode("ascii").rstrip("=").lower() != key_part:
            raise ProtocolError("contact code key is not canonical base32")
        key, check = raw[:IDENTITY_KEY_SIZE], raw[IDENTITY_KEY_SIZE:]
        if check != _check(key):
            raise ProtocolError("contact code has a typo (its checksum does not match)")
        ed25519_to_x25519_public(key)  # refuses keys that are not curve points
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, errors="strict")
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("contact code has a malformed query") from None
        names = [v for k, v in pairs if k == "name"]
        addresses = tuple(v for k, v in pairs if k == "addr")
        unknown = {k for k, _ in pairs} - {"name", "addr"}
        if unknown:
            raise ProtocolError(f"contact code has an unknown field: {sorted(unknown)[0]!r}")
        if len(names) != 1:
            raise ProtocolError("contact code must carry exactly one name")
        if len(addresses) > MAX_ADDRESSES:
            raise ProtocolError("contact code lists too many addresses")
        for address in addresses:
            if not address.startswith("/") or len(address) > MAX_ADDRESS_CHARS:
                raise ProtocolError("contact code has an address that is not a multiaddr")
        return cls(key, validate_name(names[0]), addresses)
