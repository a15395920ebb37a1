"""X3DH key agreement (Signal's specification), both roles.

All keys here are raw X25519 keys; the KDF ``info`` label and output length
are parameters, so the same code runs with libsignal's classic label.  With a
one-time prekey four DHs are mixed, without one three.  No I/O here.
"""

from __future__ import annotations

from .crypto import hkdf, x25519

_DISCONTINUITY = b"\xff" * 32  # the spec's F for X25519


def _derive(dhs: list[bytes], info: bytes, length: int) -> bytes:
    return hkdf(_DISCONTINUITY + b"".join(dhs), None, info, length)


def initiator_secret(
    *,
    identity_private: bytes,
    base_private: bytes,
    their_identity: bytes,
    their_signed_prekey: bytes,
    their_one_time_prekey: bytes | None,
    info: bytes,
    length: int,
) -> bytes:
    """Alice: DH(IKa, SPKb) || DH(EKa, IKb) || DH(EKa, SPKb) [|| DH(EKa, OPKb)]."""
    dhs = [
        x25519(identity_private, their_signed_prekey),
        x25519(base_private, their_identity),
        x25519(base_private, their_signed_prekey),
    ]
    if their_one_time_prekey is not None:
        dhs.append(x25519(base_private, their_one_time_prekey))
    return _derive(dhs, info, length)


def responder_secret(
    *,
    identity_private: bytes,
    signed_prekey_private: bytes,
    one_time_prekey_private: bytes | None,
    their_identity: bytes,
    their_base_key: bytes,
    info: bytes,
    length: int,
) -> bytes:
    """Bob: the same four DHs, computed from his side."""
    dhs = [
        x25519(signed_prekey_private, their_identity),
        x25519(identity_private, their_base_key),
        x25519(signed_prekey_private, their_base_key),
    ]
    if one_time_prekey_private is not None:
        dhs.append(x25519(one_time_prekey_private, their_base_key))
    return _derive(dhs, info, length)
