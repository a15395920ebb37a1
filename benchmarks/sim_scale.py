"""How a simulation's cost grows with the number of nodes, all in one process.

    python benchmarks/sim_scale.py [--json] [--sizes 25,50,100,200] [--out DIR [--resume]]
                                   [--plot PNG]

Each size is a `pigeon sim` run of its own (a fresh process, so peak memory
is that run's): 30% churn, 5 messages per chatting node, max(3, N/25)
mailbox peers, 60 seconds of workload.  Per size: wall_s (the workload and
the wait for the last deliveries), setup_s (starting the nodes and
exchanging contact codes), peak_rss_mb and rss_mb_per_node, cpu_s and
cpu_s_per_node (this process and its proof-of-work worker),
delivery_ratio, latency_p99_ms (send to inbox), latency_reachable_p99_ms
(from when the recipient could be reached), dht_lookup_p99_ms.  The baseline is the
smallest size of the same run: ``cpu_per_node_vs_smallest`` is each size's
CPU per node over the smallest's (1.0 would be linear growth in total).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_size(nodes: int, out: Path, resume: bool = False) -> dict[str, Any]:
    mailboxes = max(3, nodes // 25)
    if resume and (out / "report.json").exists():
        return summary(nodes, mailboxes, json.loads((out / "report.json").read_text()))
    command = [
        sys.executable, "-m", "pigeon.ui.cli", "sim", "--json",
        "--nodes", str(nodes), "--mailboxes", str(mailboxes),
        "--messages", str(5 * (nodes - mailboxes)), "--churn", "0.3",
        "--duration", "60", "--settle", "300", "--seed", "1", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=7200)
    if result.returncode not in (0, 3):
        raise SystemExit(f"sim --nodes {nodes} failed: {result.stderr.strip()[-2000:]}")
    return summary(nodes, mailboxes, json.loads(result.stdout))


def summary(nodes: int, mailboxes: int, report: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodes": nodes,
        "mailboxes": mailboxes,
        "messages": report["messages_sent"],
        "wall_s": report["wall_s"],
        "setup_s": report["setup_s"],
        "peak_rss_mb": report["peak_rss_mb"],
        "rss_mb_per_node": round(report["peak_rss_mb"] / nodes, 2),
        "cpu_s": report["cpu_s"],
        "cpu_s_per_node": round(report["cpu_s"] / nodes, 2),
        "delivery_ratio": report["delivery_ratio"],
        "lost": report["lost"],
        "duplicates": report["duplicates"],
        "latency_p50_ms": report["latency_ms"]["p50"],
        "latency_p99_ms": report["latency_ms"]["p99"],
        "latency_reachable_p99_ms": report["latency_reachable_ms"]["p99"],
        "dht_lookup_p99_ms": report["dht_lookup_ms"]["p99"],
        "bytes_per_message": report["bytes_per_message"],
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """CPU and memory per node, and latency, against the number of nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [r["nodes"] for r in results]
    fig, (cost, latency) = plt.subplots(1, 2, figsize=(10, 4))
    cost.plot(nodes, [r["cpu_s_per_node"] for r in results], "o-", label="CPU s per node")
    cost.plot(nodes, [r["rss_mb_per_node"] for r in results], "s-", label="peak RSS MB per node")
    cost.set_xlabel("nodes (one process)")
    cost.legend()
    cost.grid(True, alpha=0.3)
    latency.plot(nodes, [r["latency_p50_ms"] / 1000 for r in results], "o-", label="latency p50")
    latency.plot(nodes, [r["latency_p99_ms"] / 1000 for r in results], "s-", label="latency p99")
    latency.plot(
        nodes,
        [r["latency_reachable_p99_ms"] / 1000 for r in results],
        "d-",
        label="latency p99 from reachable",
    )
    latency.plot(nodes, [r["dht_lookup_p99_ms"] / 1000 for r in results], "^-", label="lookup p99")
    latency.set_xlabel("nodes (one process)")
    latency.set_ylabel("seconds")
    latency.legend()
    latency.grid(True, alpha=0.3)
    fig.suptitle("pigeon sim: 30% churn, 5 messages per node")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--sizes", default="25,50,100,200")
    parser.add_argument("--out", help="keep each size's report and plots here")
    parser.add_argument("--plot", metavar="PNG", help="draw cost and latency against size")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --out: a size whose report.json is there already is not run again",
    )
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="pigeon-scale-") as tmp:
        root = Path(args.out or tmp)
        results = []
        for nodes in sizes:
            results.append(run_size(nodes, root / f"n{nodes}", args.resume and bool(args.out)))
            if not args.json:
                print(json.dumps(results[-1]), flush=True)
    base = results[0]["cpu_s_per_node"] or 1
    for result in results:
        result["cpu_per_node_vs_smallest"] = round(result["cpu_s_per_node"] / base, 2)
    line = {"benchmark": "sim_scale", "sizes": results}
    print(json.dumps(line))
    if args.plot:
        plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
