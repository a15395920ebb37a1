"""Reading a simulation's output, for the tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_KEYS = {
    "nodes", "mailboxes", "messages_sent", "delivered", "duplicates", "lost", "delivery_ratio",
    "latency_ms", "via_mailbox", "dht_lookup_ms", "bytes_per_message", "peak_rss_mb", "cpu_s",
    "wall_s", "seed", "schedule_sha256",
}  # fmt: skip
PNG = b"\x89PNG\r\n\x1a\n"


def events(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]


def check_lossless(report: dict[str, Any], out: Path) -> None:
    """Everything sent arrived once, at its recipient, and the files say so."""
    assert set(report) >= REPORT_KEYS, REPORT_KEYS - set(report)
    assert report["messages_sent"] == report["messages_planned"] > 0
    assert report["lost"] == 0, report["undelivered"]
    assert report["duplicates"] == 0
    assert report["misdelivered"] == 0
    assert report["delivery_ratio"] == 1.0
    assert json.loads((out / "report.json").read_text()) == report
    delivered = {e["id"] for e in events(out) if e["event"] == "deliver"}
    sent = {e["id"] for e in events(out) if e["event"] == "send"}
    assert delivered == sent and len(sent) == report["messages_sent"]
    files = report["files"]
    assert files["sent"] == files["planned"]
    assert files["delivered"] == files["sent"], files["undelivered"]
    assert files["lost"] == files["corrupt"] == files["failed"] == files["duplicates"] == 0
    arrived = {e["id"] for e in events(out) if e["event"] == "file_deliver" and e["intact"]}
    offered = {e["id"] for e in events(out) if e["event"] == "file_send"}
    assert arrived == offered and len(offered) == files["sent"]
    for name in ("latency_cdf.png", "deliveries.png", "bytes_per_node.png"):
        assert (out / name).read_bytes().startswith(PNG), name


def sends(out: Path) -> list[tuple[str, str, str]]:
    return [(e["id"], e["from"], e["to"]) for e in events(out) if e["event"] == "send"]
