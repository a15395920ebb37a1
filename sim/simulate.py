"""One simulation from start to end: plan, fleet, run, report, plots."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from pigeon.node.host import quiet_libp2p_logs

from .fleet import Fleet, LocalFleet
from .report import build, plot, summary
from .runner import Runner
from .scenario import Plan, Scenario, plan


def simulate(
    scenario: Scenario,
    out: Path,
    *,
    mode: str = "local",
    progress: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run ``scenario``; write report.json, events.jsonl and plots to ``out``."""
    the_plan = plan(scenario)
    scenario.check_mode(mode)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("pigeon").setLevel(logging.CRITICAL)
    quiet_libp2p_logs()
    with tempfile.TemporaryDirectory(prefix="pigeon-sim-") as tmp:
        report = trio.run(_run, the_plan, Path(tmp), out, mode, progress)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


async def _run(
    the_plan: Plan, root: Path, out: Path, mode: str, progress: Callable[[str], None]
) -> dict[str, Any]:
    s = the_plan.scenario
    with (out / "events.jsonl").open("w") as events:
        fleet: Fleet | None = None
        if mode in ("processes", "netns"):  # here, so that a refusal is not an exception group
            from .processes import ProcessFleet

            fleet = ProcessFleet(
                root,
                the_plan.names,
                the_plan.mailboxes,
                s.mailbox_interval,
                netns=mode == "netns",
                latency=s.latency,
                loss=s.loss,
            )
        async with trio.open_nursery() as nursery:
            if fleet is None:
                fleet = LocalFleet(
                    root, the_plan.names, the_plan.mailboxes, nursery, s.mailbox_interval
                )
            try:
                record = await Runner(the_plan, fleet, events, progress).run(s.settle)
            finally:
                with trio.CancelScope(shield=True):
                    await fleet.close()
            usage = fleet.usage()
            nursery.cancel_scope.cancel()
    report = build(record, usage, mode)
    plot(record, report, out)
    progress("")
    return report


__all__ = ["Scenario", "simulate", "summary"]
