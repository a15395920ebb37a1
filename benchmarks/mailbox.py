"""Mailbox speed: one mailbox daemon in its own process on loopback.

    python benchmarks/mailbox.py [--json] [--deposits 1000]

deposit_per_s: acknowledged (fsynced) deposits of 1 KiB envelopes from one
sender, pipelined on one stream, sustained over the whole run.
pickup_1000_s: seconds for the owner to fetch and delete 1,000 queued
envelopes (challenge, proven fetch, challenge, proven delete, repeated).
raw_stream_rtt_ms: a bare py-libp2p stream round trip in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import multiaddr
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr
from nacl.signing import SigningKey

from benchmarks.messaging import raw_rtt
from daemons import Daemon
from pigeon.node.host import build_host, close_host, quiet_libp2p_logs
from pigeon.node.mailbox import call
from pigeon.protocol.mailbox import (
    MAX_ITEMS,
    REGISTER_WORK_BITS,
    DepositToken,
    Op,
    Request,
    do_work,
    mailbox_id,
    proof_message,
)

WINDOW = 100  # deposits in flight on the stream at once


async def measure(address: str, deposits: int) -> tuple[float, float]:
    quiet_libp2p_logs()
    host = build_host(os.urandom(32), ["/ip4/127.0.0.1/tcp/0"])
    key = SigningKey(os.urandom(32))
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
            public = bytes(key.verify_key)
            work = do_work(
                Op.REGISTER,
                mailbox_id(public),
                public,
                REGISTER_WORK_BITS,
                int.from_bytes(os.urandom(6)),
            )
            (reply,) = await call(host, info, [Request(Op.REGISTER, public_key=public, work=work)])
            box = reply.item_id
            # deposits as a contact makes them: with the owner's deposit token
            token = DepositToken.issue(
                public, lambda m: key.sign(m).signature, os.urandom(16), int(time.time()) + 3600
            ).encode()
            envelopes = [os.urandom(1024) for _ in range(deposits)]  # a mailbox dedupes copies
            start = time.perf_counter()
            for first in range(0, deposits, WINDOW):
                batch = [
                    Request(Op.DEPOSIT, box, envelope=envelope, token=token)
                    for envelope in envelopes[first : first + WINDOW]
                ]
                replies = await call(host, info, batch)
                assert all(r.ok for r in replies), replies[0].error
            deposit_rate = deposits / (time.perf_counter() - start)

            start = time.perf_counter()
            fetched = 0
            while True:
                (challenge,) = await call(host, info, [Request(Op.CHALLENGE, box)])
                signature = key.sign(proof_message(Op.FETCH, box, challenge.nonce)).signature
                (reply,) = await call(
                    host,
                    info,
                    [
                        Request(
                            Op.FETCH,
                            box,
                            nonce=challenge.nonce,
                            signature=signature,
                            limit=MAX_ITEMS,
                        )
                    ],
                )
                if not reply.items:
                    break
                fetched += len(reply.items)
                ids = tuple(item.item_id for item in reply.items)
                (challenge,) = await call(host, info, [Request(Op.CHALLENGE, box)])
                signature = key.sign(proof_message(Op.DELETE, box, challenge.nonce, ids)).signature
                (done,) = await call(
                    host,
                    info,
                    [
                        Request(
                            Op.DELETE, box, nonce=challenge.nonce, signature=signature, item_ids=ids
                        )
                    ],
                )
                assert done.ok
            pickup = time.perf_counter() - start
            assert fetched == deposits
            return deposit_rate, pickup * 1000 / deposits
        finally:
            await close_host(host)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--deposits", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        box = Daemon(Path(tmp), "mailbox", extra=["--mailbox", "--mailbox-rate-limit", "1000000"])
        box.start()
        try:
            deposit_rate, pickup_ms_each = trio.run(measure, box.address, args.deposits)
        finally:
            box.stop()
    result = {
        "deposits": args.deposits,
        "deposit_per_s": round(deposit_rate, 1),
        "pickup_1000_s": round(pickup_ms_each, 3),  # ms per envelope x 1000 = s per 1000
        "raw_stream_rtt_ms": round(trio.run(raw_rtt), 2),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:20} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
