"""Double Ratchet speed: Pigeon against the ``doubleratchet`` package and the
floor (the primitive calls the spec requires, timed alone), in one run.

    python benchmarks/ratchet.py [--json] [--messages N]

Prints microseconds per 1 KiB message (encrypt + decrypt), one direction and
ping-pong (the direction flips every message, so every message is a DH
ratchet step).  Pigeon runs its production configuration (header encryption
on); the floor counts the header-encryption primitives too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from benchmarks.doubleratchet_peer import Peer, make_pair
from pigeon.protocol import PIGEON, DirectoryRecord, IdentityKeyPair, Session
from pigeon.protocol.crypto import hkdf, hmac_sha256_pair, x25519_keypair
from pigeon.protocol.records import SignedPrekey
from pigeon.protocol.session import IncomingMessage

PAYLOAD = os.urandom(1024)
AD = os.urandom(64)


def best_of(runs: int, measure: Callable[[], float]) -> float:
    """The fastest of several runs: the least disturbed by the rest of the machine."""
    return min(measure() for _ in range(runs))


def per_message(n: int, step: Callable[[], None]) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n * 1e6


# -- Pigeon ----------------------------------------------------------------------


def pigeon_pair() -> tuple[Session, Session]:
    alice, bob = IdentityKeyPair.generate(os.urandom), IdentityKeyPair.generate(os.urandom)
    spk_private, spk_public = x25519_keypair(os.urandom)
    record = DirectoryRecord(bob.public_key, "bob", 1, 0, 3600, SignedPrekey(1, spk_public, 0))
    a = Session.initiate(alice, record.bundle(), os.urandom, PIGEON)
    b, _ = Session.respond(
        bob, IncomingMessage.decode(a.encrypt(b"x")), {1: spk_private}.get, {}.get, os.urandom
    )
    a.decrypt(IncomingMessage.decode(b.encrypt(b"y")))
    return a, b


def ours(n: int, pingpong: bool) -> float:
    a, b = pigeon_pair()
    ra, rb, ad = a.ratchet, b.ratchet, a._ad  # the ratchet alone, as for the others
    if not pingpong:
        return per_message(n, lambda: rb.decrypt(ra.encrypt(PAYLOAD, ad), ad) and None)

    def two() -> None:
        rb.decrypt(ra.encrypt(PAYLOAD, ad), ad)
        ra.decrypt(rb.encrypt(PAYLOAD, ad), ad)

    return per_message(n // 2, two) / 2


# -- the doubleratchet package ---------------------------------------------------


def peer(n: int, pingpong: bool, recommended: bool = False) -> float:
    """Like for like: Pigeon's KDFs and AES-GCM, coroutines driven directly.
    ``recommended``: the package's AES-CBC + HMAC, each call awaited through
    an asyncio event loop, as a synchronous application would use it."""
    alice, bob = make_pair(os.urandom(32), os.urandom(32), AD, recommended_aead=recommended)
    bob.decrypt(alice.encrypt(b"x"))
    alice.decrypt(bob.encrypt(b"y"))
    if recommended:
        loop = asyncio.new_event_loop()

        def exchange(sender: Peer, receiver: Peer) -> None:
            message = loop.run_until_complete(sender._state.encrypt_message(PAYLOAD, AD))
            loop.run_until_complete(receiver._state.decrypt_message(message, AD))

    else:

        def exchange(sender: Peer, receiver: Peer) -> None:
            receiver.decrypt(sender.encrypt(PAYLOAD))

    try:
        if not pingpong:
            return per_message(n, lambda: exchange(alice, bob))

        def two() -> None:
            exchange(alice, bob)
            exchange(bob, alice)

        return per_message(n // 2, two) / 2
    finally:
        if recommended:
            loop.close()


# -- the floor: the spec's primitive calls, nothing else --------------------------


def floor(n: int, pingpong: bool) -> float:
    """Per message: the sender's chain step, message keys, header and body
    sealing; the receiver's header opening (on a new ratchet key: a failed try
    with the current header key first), chain step, message keys and body
    opening; and on a new ratchet key the receiver's two root steps (two DHs,
    one new key pair)."""
    labels = PIGEON.labels
    ck, hk, nhk, rk = (os.urandom(32) for _ in range(4))
    dh_private, dh_public = x25519_keypair(os.urandom)
    header = os.urandom(40)

    def message() -> None:
        header_key = nhk if pingpong else hk
        seed, _ = hmac_sha256_pair(ck, b"\x01", b"\x02")
        keys = hkdf(seed, None, labels.message, 80)
        nonce = os.urandom(12)
        enc_header = nonce + AESGCM(header_key).encrypt(nonce, header, b"")
        body = AESGCM(keys[:32]).encrypt(keys[64:76], PAYLOAD, AD + enc_header)
        if pingpong:
            with contextlib.suppress(InvalidTag):
                AESGCM(hk).decrypt(nonce, enc_header[12:], b"")
        AESGCM(header_key).decrypt(nonce, enc_header[12:], b"")
        if pingpong:
            hkdf(crypto_scalarmult(dh_private, dh_public), rk, labels.root, 96)
            private = os.urandom(32)
            crypto_scalarmult_base(private)
            hkdf(crypto_scalarmult(private, dh_public), rk, labels.root, 96)
        seed, _ = hmac_sha256_pair(ck, b"\x01", b"\x02")
        keys = hkdf(seed, None, labels.message, 80)
        AESGCM(keys[:32]).decrypt(keys[64:76], body, AD + enc_header)

    return per_message(n, message)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--messages", type=int, default=4000, help="messages per run")
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (best kept)")
    args = parser.parse_args()
    n, runs = args.messages, args.runs
    figures = {
        "ours_oneway_us": best_of(runs, lambda: ours(n, False)),
        "ours_pingpong_us": best_of(runs, lambda: ours(n, True)),
        "peer_oneway_us": best_of(runs, lambda: peer(n // 4, False)),
        "peer_pingpong_us": best_of(runs, lambda: peer(n // 4, True)),
        "peer_recommended_oneway_us": best_of(runs, lambda: peer(n // 4, False, True)),
        "peer_recommended_pingpong_us": best_of(runs, lambda: peer(n // 4, True, True)),
        "floor_oneway_us": best_of(runs, lambda: floor(n, False)),
        "floor_pingpong_us": best_of(runs, lambda: floor(n, True)),
    }
    result: dict[str, object] = {k: round(v, 1) for k, v in figures.items()}
    for mode in ("oneway", "pingpong"):
        result[f"speedup_vs_peer_{mode}"] = round(
            figures[f"peer_{mode}_us"] / figures[f"ours_{mode}_us"], 2
        )
        result[f"ratio_to_floor_{mode}"] = round(
            figures[f"ours_{mode}_us"] / figures[f"floor_{mode}_us"], 2
        )
        result[f"speedup_vs_peer_recommended_{mode}"] = round(
            figures[f"peer_recommended_{mode}_us"] / figures[f"ours_{mode}_us"], 2
        )
    result["messages"] = n
    result["python"] = platform.python_version()
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
