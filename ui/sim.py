"""``pigeon sim``: many real nodes under churn, with a report and plots."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pigeon.protocol import PigeonError

if TYPE_CHECKING:
    from pigeon.sim.scenario import Scenario


class SimUsageError(PigeonError):
    """Options that do not make a simulation."""


def add_command(commands: Any) -> None:
    sim = commands.add_parser(
        "sim",
        help="run many real nodes with a seeded workload and report delivery, latency and cost",
    )
    sim.add_argument("--nodes", type=int, default=20, metavar="N", help="nodes in all (20)")
    sim.add_argument(
        "--mailboxes", type=int, default=3, metavar="M", help="of them mailbox peers (3)"
    )
    sim.add_argument("--messages", type=int, default=200, metavar="K", help="messages sent (200)")
    sim.add_argument(
        "--churn",
        type=float,
        default=0.3,
        metavar="F",
        help="fraction of the other nodes that go offline once and come back (0.3)",
    )
    sim.add_argument(
        "--files",
        type=int,
        default=0,
        metavar="K",
        help="small files sent peer to peer between contacts, auto-accepted (0)",
    )
    sim.add_argument("--seed", type=int, default=1, metavar="S", help="the workload's seed (1)")
    sim.add_argument("--out", default="sim-out", metavar="DIR", help="where results go (sim-out)")
    sim.add_argument(
        "--contacts", type=int, default=3, metavar="C", help="contacts each node adds (3)"
    )
    sim.add_argument(
        "--duration",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long messages are sent and nodes churn (60)",
    )
    sim.add_argument(
        "--kill-mailboxes",
        type=int,
        default=0,
        metavar="J",
        help="mailbox peers killed mid-run, never to return (0)",
    )
    sim.add_argument(
        "--partition",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="split the network in two for this long (0: never)",
    )
    sim.add_argument(
        "--settle",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the last deliveries after the workload (120)",
    )
    sim.add_argument(
        "--mailbox-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how often nodes collect from their mailboxes (30, as a daemon does)",
    )
    sim.add_argument(
        "--processes",
        action="store_true",
        help="run every node as its own pigeon daemon process (default: all in this process)",
    )
    sim.add_argument(
        "--netns",
        action="store_true",
        help="with --processes: each daemon in a network namespace of its own (root only)",
    )
    sim.add_argument(
        "--latency",
        type=_milliseconds,
        default=0.0,
        metavar="MS",
        help="with --netns: delay every packet between two nodes this long, e.g. 40ms (0)",
    )
    sim.add_argument(
        "--loss",
        type=_percent,
        default=0.0,
        metavar="PCT",
        help="with --netns: drop this share of the packets between two nodes, e.g. 1%% (0)",
    )
    sim.add_argument("--json", action="store_true", help="print report.json instead of a summary")


def _milliseconds(text: str) -> float:
    number = text.strip().lower().removesuffix("ms")
    try:
        return float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time in ms (40 or 40ms)") from None


def _percent(text: str) -> float:
    number = text.strip().removesuffix("%")
    try:
        return float(number) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage (1 or 1%)") from None


def cmd_sim(args: argparse.Namespace) -> int:
    from pigeon.sim.scenario import Scenario, ScenarioError

    scenario = Scenario(
        nodes=args.nodes,
        mailboxes=args.mailboxes,
        messages=args.messages,
        churn=args.churn,
        seed=args.seed,
        contacts=args.contacts,
        duration=args.duration,
        kill_mailboxes=args.kill_mailboxes,
        partition=args.partition,
        settle=args.settle,
        mailbox_interval=args.mailbox_interval,
        files=args.files,
        latency=args.latency,
        loss=args.loss,
    )
    if args.netns and not args.processes:
        raise SimUsageError("--netns runs daemon processes: use it with --processes")
    mode = "netns" if args.netns else "processes" if args.processes else "local"
    try:
        scenario.check()
        scenario.check_mode(mode)
        return run_and_print(scenario, Path(args.out), mode=mode, as_json=args.json)
    except ScenarioError as error:  # also what the network namespaces could not do
        raise SimUsageError(str(error)) from None


def run_and_print(
    scenario: Scenario, out: Path, *, mode: str = "local", as_json: bool = False
) -> int:
    """Run a simulation with a progress line, then print its summary (or its
    report as JSON).  Exit status 3 when a message or a file was lost or
    duplicated, or a file arrived damaged."""
    import json

    from pigeon.sim.simulate import simulate, summary

    progress = _ProgressLine() if sys.stderr.isatty() else _quiet
    report = simulate(scenario, out, mode=mode, progress=progress)
    print(json.dumps(report) if as_json else summary(report, out))
    files = report["files"]
    whole = report["lost"] == report["duplicates"] == 0
    whole = whole and files["lost"] == files["duplicates"] == files["corrupt"] == 0
    return 0 if whole else 3


def _quiet(line: str) -> None:
    return None


class _ProgressLine:
    """One line on standard error, rewritten in place."""

    def __call__(self, line: str) -> None:
        sys.stderr.write("\r\033[K" + line[:100])
        sys.stderr.flush()
