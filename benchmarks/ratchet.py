"""Double Ratchet speed: Pigeon against the ``doubleratchet`` package and the
floor (the primitive calls the spec requires, timed alone), in one run.

    python benchmarks/ratchet.py [--json] [--messages N] [--rounds R]

Prints microseconds per 1 KiB message (encrypt + decrypt), one direction and
ping-pong (the direction flips every message, so every message is a DH
ratchet step).  Pigeon runs its production configuration (header encryption
on); the floor counts the header-encryption primitives too.

Every variant does the same messages in every round, interleaved (round 1:
ours, peer, peer_recommended, floor, one-way then ping-pong; round 2: the
same; ...), so that the rest of the machine weighs on all of them alike.  The
times reported are the best of the rounds; each ratio is given twice: from
those best times, and as the median of the ratios within each round (the
one less moved by load: both sides of a ratio ran seconds apart).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from doubleratchet.double_ratchet import DoubleRatchet
from nacl.bindings import crypto_scalarmult, crypto_scalarmult_base

from benchmarks.doubleratchet_peer import make_pair
from pigeon.protocol import PIGEON, DirectoryRecord, IdentityKeyPair, Session
from pigeon.protocol.crypto import hkdf, hmac_sha256_pair, x25519_keypair
from pigeon.protocol.records import SignedPrekey
from pigeon.protocol.session import IncomingMessage

PAYLOAD = os.urandom(1024)
AD = os.urandom(64)
VARIANTS = ("ours", "peer", "peer_recommended", "floor")
MODES = ("oneway", "pingpong")


def per_message(n: int, step: Callable[[], object]) -> float:
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
    no_one_time_prekeys: dict[int, bytes] = {}
    b, _ = Session.respond(
        bob,
        IncomingMessage.decode(a.encrypt(b"x")),
        {1: spk_private}.get,
        no_one_time_prekeys.get,
        os.urandom,
    )
    a.decrypt(IncomingMessage.decode(b.encrypt(b"y")))
    return a, b


def ours(n: int, pingpong: bool) -> float:
    a, b = pigeon_pair()
    ra, rb, ad = a.ratchet, b.ratchet, a._ad  # the ratchet alone, as for the others
    if not pingpong:
        return per_message(n, lambda: rb.decrypt(ra.encrypt(PAYLOAD, ad), ad))

    def two() -> None:
        rb.decrypt(ra.encrypt(PAYLOAD, ad), ad)
        ra.decrypt(rb.encrypt(PAYLOAD, ad), ad)

    return per_message(n // 2, two) / 2


# -- the doubleratchet package ---------------------------------------------------


def peer(n: int, pingpong: bool) -> float:
    """Like for like: Pigeon's KDFs and AES-GCM, the package's coroutines
    driven directly (they never wait on anything)."""
    alice, bob = make_pair(os.urandom(32), os.urandom(32), AD)
    assert bob.decrypt(alice.encrypt(b"x")) == b"x"
    assert alice.decrypt(bob.encrypt(b"y")) == b"y"
    if not pingpong:
        return per_message(n, lambda: bob.decrypt(alice.encrypt(PAYLOAD)))

    def two() -> None:
        bob.decrypt(alice.encrypt(PAYLOAD))
        alice.decrypt(bob.encrypt(PAYLOAD))

    return per_message(n // 2, two) / 2


def peer_recommended(n: int, pingpong: bool) -> float:
    """The package as its users run it: its recommended AEAD (AES-256-CBC +
    HMAC-SHA256, with Pigeon's KDFs otherwise), and one asyncio event loop
    running one coroutine that awaits every call of the whole conversation."""
    alice, bob = make_pair(os.urandom(32), os.urandom(32), AD, recommended_aead=True)
    return asyncio.run(conversation(alice.state, bob.state, n, pingpong))


async def conversation(alice: DoubleRatchet, bob: DoubleRatchet, n: int, pingpong: bool) -> float:
    """Microseconds per message for ``n`` messages, timed inside the coroutine."""
    assert await bob.decrypt_message(await alice.encrypt_message(b"x", AD), AD) == b"x"
    assert await alice.decrypt_message(await bob.encrypt_message(b"y", AD), AD) == b"y"
    start = time.perf_counter()
    if not pingpong:
        for _ in range(n):
            message = await alice.encrypt_message(PAYLOAD, AD)
            await bob.decrypt_message(message, AD)
    else:
        for _ in range(n // 2):
            message = await alice.encrypt_message(PAYLOAD, AD)
            await bob.decrypt_message(message, AD)
            message = await bob.encrypt_message(PAYLOAD, AD)
            await alice.decrypt_message(message, AD)
        n = n // 2 * 2
    return (time.perf_counter() - start) / n * 1e6


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


MEASURES: dict[str, Callable[[int, bool], float]] = {
    "ours": ours,
    "peer": peer,
    "peer_recommended": peer_recommended,
    "floor": floor,
}
RATIOS = {  # name: (numerator, denominator)
    "speedup_vs_peer": ("peer", "ours"),
    "speedup_vs_peer_recommended": ("peer_recommended", "ours"),
    "ratio_to_floor": ("ours", "floor"),
}


def measure(n: int, rounds: int) -> dict[str, object]:
    """``rounds`` rounds, each timing every variant in both modes, interleaved."""
    for variant in VARIANTS:  # a short untimed pass first: imports, caches, allocator
        for mode in MODES:
            MEASURES[variant](50, mode == "pingpong")
    times: dict[str, list[float]] = {f"{v}_{m}": [] for v in VARIANTS for m in MODES}
    for _ in range(rounds):
        for mode in MODES:
            for variant in VARIANTS:
                times[f"{variant}_{mode}"].append(MEASURES[variant](n, mode == "pingpong"))
    best = {key: min(values) for key, values in times.items()}
    result: dict[str, object] = {f"{key}_us": round(value, 1) for key, value in best.items()}
    for mode in MODES:
        for name, (top, bottom) in RATIOS.items():
            per_round = [
                t / b
                for t, b in zip(times[f"{top}_{mode}"], times[f"{bottom}_{mode}"], strict=True)
            ]
            result[f"{name}_{mode}"] = round(best[f"{top}_{mode}"] / best[f"{bottom}_{mode}"], 2)
            result[f"{name}_{mode}_round_median"] = round(statistics.median(per_round), 2)
            result[f"{name}_{mode}_round_range"] = [
                round(min(per_round), 2),
                round(max(per_round), 2),
            ]
    result["times"] = "best of rounds"
    result["ratios"] = "of the best times; _round_median: median of the per-round ratios"
    result["messages"] = n
    result["rounds"] = rounds
    result["python"] = platform.python_version()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--messages", type=int, default=4000, help="messages per variant and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (best time kept)")
    args = parser.parse_args()
    result = measure(args.messages, args.rounds)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:50} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
