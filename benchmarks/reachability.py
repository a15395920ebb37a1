"""How two people behind home NATs reach each other: how often the
conversation ends direct (a hole punch) or relayed, how long the first
message takes, and how long messages take each way.

Real daemons in network namespaces behind iptables-masquerade routers
(tests/netns.py, the NAT tests' network): "the internet" holds one public
node that relays and keeps mailboxes; Alice and Bob sit behind routers of
the kinds of each pair ("cone": endpoint-independent mapping, where a hole
punch can work; "symmetric": a new port for every connection, where it
cannot).  Every packet is held ``--hop-ms`` at each hop (NFQUEUE, as
``pigeon sim --latency``: this machine's kernel has no netem): a home's
router, and "the internet" for what it forwards between homes and what
goes in and out of its own daemons.  One way from Alice to Bob is three
hops directly and four through the relay (90 and 120 ms at 30 ms a hop).

Per trial: a fresh network and fresh daemons; both reserve a relay slot;
they exchange contact codes; Alice sends the first message (time to first
message: her ``sent_at`` to Bob's ``received_at``, one machine's clock,
including the session's start); then ``--window`` seconds for a hole
punch, after which Bob's view of the connection is what the trial ended
as (and how long after the first message's arrival it became direct);
then ``--messages`` messages each way, one at a time, whose times
(``sent_at`` to ``received_at``) count as direct or relayed by that.  The
ratio in the same run: the median message time over the path's own
one-way delay (the hops' sum), direct and relayed.

Needs root, iproute2, iptables and the kernel's br_netfilter; prints one
JSON line (``--json``) or a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from netns import NatNetwork

from daemons import Daemon, contact, incoming, introduce, relayed, wait_for

PAIRS = ("cone+cone", "cone+symmetric", "symmetric+symmetric")


def trial(root: Path, pair: str, hop_ms: float, window: float, messages: int) -> dict[str, Any]:
    alice_nat, bob_nat = pair.split("+")
    with NatNetwork({"a": alice_nat, "b": bob_nat}, hop_ms=hop_ms) as net:
        boot = Daemon(root, "boot", prefix=net.public, extra=["--relay", "--mailbox"])
        daemons = [boot.start()]
        try:
            alice = Daemon(root, "alice", [boot.address], prefix=net.home("a"))
            bob = Daemon(root, "bob", [boot.address], prefix=net.home("b"))
            daemons += [alice.launch(), bob.launch()]
            alice.wait_ready(), bob.wait_ready()
            wait_for(lambda: relayed(alice) and relayed(bob), timeout=90)
            introduce(alice, bob)
            alice.cli("send", "bob", "first")
            (first,) = wait_for(lambda: incoming(bob), timeout=120)
            first_ms = (first["received_at"] - first["sent_at"]) * 1000
            arrived = time.monotonic()
            while time.monotonic() < arrived + window:
                if contact(bob, "alice")["connection"] == "direct":
                    break
                time.sleep(0.5)
            ended = contact(bob, "alice")["connection"]
            direct_after = time.monotonic() - arrived if ended == "direct" else None
            times: list[float] = []
            for n in range(messages):
                for sender, receiver, to in ((alice, bob, "bob"), (bob, alice, "alice")):
                    text = f"{sender.name} {n}"
                    sender.cli("send", to, text)
                    (got,) = wait_for(
                        lambda r=receiver, t=text: [m for m in incoming(r) if m["text"] == t],
                        timeout=60,
                    )
                    times.append((got["received_at"] - got["sent_at"]) * 1000)
            return {
                "pair": pair,
                "ended": ended,
                "first_message_ms": first_ms,
                "first_via": first["via"],
                "direct_after_s": direct_after,
                "message_ms": times,
            }
        finally:
            for daemon in reversed(daemons):
                daemon.stop()


def quantiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 1),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "max": round(ordered[-1], 1),
    }


def summarise(trials: list[dict[str, Any]], hop_ms: float) -> dict[str, Any]:
    path = {"direct": 3 * hop_ms, "relayed": 4 * hop_ms}
    pairs: dict[str, Any] = {}
    for pair in dict.fromkeys(t["pair"] for t in trials):
        mine = [t for t in trials if t["pair"] == pair]
        ended = [t["ended"] for t in mine]
        pairs[pair] = {
            "trials": len(mine),
            "direct_share": round(ended.count("direct") / len(mine), 2),
            "relayed_share": round(ended.count("relayed") / len(mine), 2),
            "first_message_ms": quantiles([t["first_message_ms"] for t in mine]),
            "first_through_mailbox": sum(t["first_via"] == "mailbox" for t in mine),
            # seconds from the first message's arrival to a direct connection (hole punched)
            "direct_after_s": quantiles(
                [t["direct_after_s"] for t in mine if t["direct_after_s"] is not None]
            ),
        }
    latency: dict[str, Any] = {}
    for kind in ("direct", "relayed"):
        times = [ms for t in trials if t["ended"] == kind for ms in t["message_ms"]]
        latency[kind] = quantiles(times)
        if times and hop_ms:
            latency[kind]["ratio_to_path"] = round(statistics.median(times) / path[kind], 2)
    return {
        "benchmark": "reachability",
        "hop_ms": hop_ms,
        "path_one_way_ms": path,
        "pairs": pairs,
        "message_latency_ms": latency,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="one JSON line")
    parser.add_argument("--trials", type=int, default=3, help="per NAT pair")
    parser.add_argument("--hop-ms", type=float, default=30.0, help="delay at each hop")
    parser.add_argument("--window", type=float, default=20.0, help="seconds for a hole punch")
    parser.add_argument("--messages", type=int, default=10, help="each way, per trial")
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=PAIRS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("reachability: needs root (network namespaces and iptables)")
    trials = []
    with tempfile.TemporaryDirectory(prefix="pigeon-reach-") as tmp:
        for pair in args.pairs:
            for n in range(args.trials):
                root = Path(tmp) / f"{pair}-{n}"
                root.mkdir()
                result = trial(root, pair, args.hop_ms, args.window, args.messages)
                trials.append(result)
                print(
                    f"{pair} trial {n + 1}: {result['ended']}, first message "
                    f"{result['first_message_ms']:.0f} ms",
                    file=sys.stderr,
                )
    summary = summarise(trials, args.hop_ms)
    if args.json:
        print(json.dumps(summary))
        return
    for pair, figures in summary["pairs"].items():
        print(f"{pair:22} {figures}")
    print(f"messages: {summary['message_latency_ms']}")


if __name__ == "__main__":
    main()
