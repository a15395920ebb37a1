"""A run's record turned into ``report.json``, a one-screen summary and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .fleet import Usage
from .runner import Record


def percentile(values: list[float], p: float) -> float | None:
    """The nearest-rank percentile (p from 0 to 100), or None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return round(ordered[rank - 1], 1)


def build(record: Record, usage: Usage, mode: str) -> dict[str, Any]:
    plan = record.plan
    s = plan.scenario
    latencies = [
        (copies[0].received_at - record.sent[mid]) * 1000
        for mid, copies in record.arrivals.items()
        if mid in record.sent
    ]
    # From when the recipient could be reached (its node running, the
    # network whole): how long delivery itself took, churn aside.
    sends = {send.id: send for send in plan.sends}
    reachable = []
    for mid, copies in record.arrivals.items():
        if mid in record.sent:
            send = sends[mid]
            since = record.reachable_from(send.sender, send.recipient, record.sent[mid])
            reachable.append(max(0.0, copies[0].received_at - since) * 1000)
    lookups = [float(ms) for m in record.metrics.values() for ms in m.get("dht_lookups_ms", [])]
    wire = {
        plan.names[node]: int(m.get("wire_sent", 0)) + int(m.get("wire_received", 0))
        for node, m in sorted(record.metrics.items())
    }
    sent_bytes = sum(int(m.get("wire_sent", 0)) for m in record.metrics.values())
    delivered = sum(1 for mid in record.arrivals if mid in record.sent)
    sent = len(record.sent)
    return {
        "nodes": s.nodes,
        "mailboxes": s.mailboxes,
        "mode": mode,
        "seed": s.seed,
        "schedule_sha256": plan.digest(),
        "scenario": {
            "messages": s.messages,
            "churn": s.churn,
            "contacts": s.contacts,
            "duration_s": s.duration,
            "kill_mailboxes": s.kill_mailboxes,
            "partition_s": s.partition,
            "settle_s": s.settle,
            "mailbox_interval_s": s.mailbox_interval,
            "files": s.files,
            "latency_ms": s.latency,
            "loss": s.loss,
        },
        "wan": usage.wan or None,
        "messages_planned": len(plan.sends),
        "messages_sent": sent,
        "send_failed": len(record.failed),
        "delivered": delivered,
        "duplicates": sum(len(c) - 1 for c in record.arrivals.values()),
        "misdelivered": record.misdelivered,
        "lost": sent - delivered,
        "delivery_ratio": round(delivered / sent, 4) if sent else None,
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": round(max(latencies), 1) if latencies else None,
        },
        "latency_reachable_ms": {
            "p50": percentile(reachable, 50),
            "p90": percentile(reachable, 90),
            "p99": percentile(reachable, 99),
            "max": round(max(reachable), 1) if reachable else None,
        },
        "via_mailbox": sum(
            1 for mid, c in record.arrivals.items() if mid in record.sent and c[0].via == "mailbox"
        ),
        "dht_lookups": len(lookups),
        # The lookups the run asked for (one by each node as the timeline
        # starts and as it comes back): how many found the record.
        "dht_probes": {
            "made": len(record.probes),
            "found": sum(1 for _, found in record.probes if found),
        },
        "dht_lookup_ms": {
            "p50": percentile(lookups, 50),
            "p90": percentile(lookups, 90),
            "p99": percentile(lookups, 99),
        },
        "wire_bytes_sent": sent_bytes,
        "bytes_per_message": round(sent_bytes / delivered) if delivered else None,
        "bytes_per_node": wire,
        "peak_rss_mb": usage.peak_rss_mb,
        "cpu_s": usage.cpu_s,
        "setup_s": record.setup_s,
        "wall_s": round(record.ended_at - record.started_at, 2),
        "files": _files(record),
        "undelivered": sorted(mid for mid in record.sent if mid not in record.arrivals)[:50],
        "sender_says": dict(sorted(record.missing.items())[:50]),
    }


def _files(record: Record) -> dict[str, Any]:
    """Files: offered, arrived intact, how long from the offer to the last
    byte on the recipient's disk."""
    arrived = {
        fid: copies
        for fid, copies in record.file_arrivals.items()
        if fid in record.files_sent and any(c.state == "done" and c.intact for c in copies)
    }
    latencies = [
        (min(c.received_at for c in copies if c.state == "done") - record.files_sent[fid]) * 1000
        for fid, copies in arrived.items()
    ]
    sent = len(record.files_sent)
    ended = [c for copies in record.file_arrivals.values() for c in copies]
    return {
        "planned": len(record.plan.files),
        "sent": sent,
        "send_failed": len(record.files_failed),
        "delivered": len(arrived),
        "corrupt": sum(1 for c in ended if c.state == "done" and not c.intact),
        "failed": sum(1 for c in ended if c.state != "done"),
        "duplicates": sum(len(c) - 1 for c in record.file_arrivals.values()),
        "lost": sent - len(arrived),
        "bytes": sum(f.size for f in record.plan.files if f.id in record.files_sent),
        "latency_ms": {
            "p50": percentile(latencies, 50),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": round(max(latencies), 1) if latencies else None,
        },
        "undelivered": dict(sorted(record.files_missing.items())[:50]),
    }


def summary(report: dict[str, Any], out: Path) -> str:
    lat = report["latency_ms"]
    rea = report["latency_reachable_ms"]
    dht = report["dht_lookup_ms"]
    ratio = report["delivery_ratio"]
    lines = [
        f"pigeon sim: {report['nodes']} nodes ({report['mailboxes']} mailboxes),"
        f" {report['mode']}, seed {report['seed']}",
        f"  messages   {report['messages_sent']} sent, {report['delivered']} delivered,"
        f" {report['lost']} lost, {report['duplicates']} duplicates"
        f"  (delivery ratio {ratio if ratio is not None else '-'})",
        f"  latency    p50 {_ms(lat['p50'])}  p90 {_ms(lat['p90'])}  p99 {_ms(lat['p99'])}"
        f"  max {_ms(lat['max'])}   (send to the recipient's inbox)",
        f"             p50 {_ms(rea['p50'])}  p90 {_ms(rea['p90'])}  p99 {_ms(rea['p99'])}"
        f"  max {_ms(rea['max'])}   (from when the recipient could be reached)",
        f"  mailboxes  {report['via_mailbox']} message(s) arrived through a mailbox",
        f"  DHT        {report['dht_lookups']} lookups, p50 {_ms(dht['p50'])}"
        f"  p99 {_ms(dht['p99'])}; {report['dht_probes']['found']} of"
        f" {report['dht_probes']['made']} probes found the record",
        f"  wire       {report['bytes_per_message'] or '-'} bytes sent per message delivered",
        f"  cost       {report['wall_s']} s wall, {report['cpu_s']} s CPU,"
        f" peak RSS {report['peak_rss_mb']} MB",
    ]
    files = report["files"]
    if files["planned"]:
        flat = files["latency_ms"]
        lines.insert(
            4,
            f"  files      {files['sent']} sent, {files['delivered']} arrived intact,"
            f" {files['lost']} lost  (p50 {_ms(flat['p50'])}  p99 {_ms(flat['p99'])},"
            " offer to the last byte on disk)",
        )
    if report["wan"]:
        wan, sc = report["wan"], report["scenario"]
        lines.append(
            f"  WAN        {sc['latency_ms']:g} ms each way, {sc['loss'] * 100:g}% loss:"
            f" {wan['delayed']} packets delayed, {wan['dropped']} dropped"
        )
    if report["send_failed"]:
        lines.append(f"  refused    {report['send_failed']} message(s) their node would not take")
    for mid, said in list(report["sender_says"].items())[:10]:
        lines.append(f"  LOST       {mid}: its sender says {said}")
    for fid, said in list(files["undelivered"].items())[:10]:
        lines.append(f"  LOST       file {fid}: its sender says {said}")
    lines.append(f"  written    {out}/report.json, events.jsonl, *.png")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.0f}ms"


def plot(record: Record, report: dict[str, Any], out: Path) -> list[Path]:
    """latency_cdf.png, deliveries.png and bytes_per_node.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    t0 = record.started_at
    latencies = sorted(
        (copies[0].received_at - record.sent[mid])
        for mid, copies in record.arrivals.items()
        if mid in record.sent
    )

    fig, ax = plt.subplots(figsize=(7, 4))
    if latencies:
        ys = [(i + 1) / len(latencies) for i in range(len(latencies))]
        ax.step(latencies, ys, where="post")
        ax.set_xscale("log")
    ax.set_xlabel("latency, send to the recipient's inbox (s, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title(f"Latency CDF: {report['delivered']} of {report['messages_sent']} delivered")
    written.append(_save(fig, out / "latency_cdf.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    times = sorted(
        c[0].received_at - t0 for mid, c in record.arrivals.items() if mid in record.sent
    )
    sends = sorted(t - t0 for t in record.sent.values())
    ax.step(sends, range(1, len(sends) + 1), where="post", label="sent", color="tab:gray")
    ax.step(times, range(1, len(times) + 1), where="post", label="delivered", color="tab:blue")
    ax.set_xlabel("time since the workload started (s)")
    ax.set_ylabel("messages (cumulative)")
    ax.grid(True, alpha=0.3)
    partition = record.plan.partition
    if partition is not None:
        ax.axvspan(partition.start, partition.end, color="tab:red", alpha=0.12, label="partition")
    for number, kill in enumerate(record.plan.kills):
        label = "mailbox killed" if number == 0 else None
        ax.axvline(kill.at, color="tab:red", linestyle=":", label=label)
    online = ax.twinx()
    # nodes online from the workload's start (the count then, then each change)
    before = [n for t, n in record.online if t <= t0]
    points = [(0.0, before[-1])] if before else []
    points += [(t - t0, n) for t, n in record.online if t > t0]
    end = max([record.ended_at - t0, *(p[0] for p in points)])
    xs = [max(0.0, p[0]) for p in points] + [end]
    ys_online = [p[1] for p in points] + [points[-1][1] if points else 0]
    online.step(xs, ys_online, where="post", color="tab:orange", label="nodes online")
    online.set_ylabel("nodes online", color="tab:orange")
    online.set_ylim(0, report["nodes"] + 1)
    lines = ax.get_legend_handles_labels()[0] + online.get_legend_handles_labels()[0]
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="upper left")
    ax.set_title("Deliveries over time against nodes online")
    written.append(_save(fig, out / "deliveries.png"))

    per_node = report["bytes_per_node"]
    fig, ax = plt.subplots(figsize=(max(7, len(per_node) * 0.12), 4))
    names = list(per_node)
    colors = ["tab:red" if n.startswith("box") else "tab:blue" for n in names]
    ax.bar(range(len(names)), [per_node[n] / 1024 for n in names], color=colors)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("KiB sent and received")
    ax.set_title("Bytes on the wire per node (mailbox peers in red)")
    written.append(_save(fig, out / "bytes_per_node.png"))
    return written


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
