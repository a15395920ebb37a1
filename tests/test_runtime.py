"""The process-wide settings of a process that runs nodes (node/runtime.py),
checked in a fresh interpreter each, since they are process-wide."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pigeon.node.runtime import GC_YOUNG_THRESHOLD

# What each entry point has set by the time its event loop would start
# (trio.run replaced by a report of the collector's threshold).
DAEMON = """
import gc, sys
from pigeon.node import daemon
from pigeon.node.node import NodeConfig
daemon.trio.run = lambda *a, **k: print(gc.get_threshold()[0])
daemon.run_daemon(__import__("pathlib").Path(sys.argv[1]), "pw", NodeConfig())
"""
SIM = """
import gc, sys
from pathlib import Path
from pigeon.sim import simulate
from pigeon.sim.scenario import Scenario
def report(*a, **k):
    print(gc.get_threshold()[0])
    raise SystemExit(0)
simulate.trio.run = report
simulate.simulate(Scenario(nodes=5, mailboxes=1, messages=5), Path(sys.argv[1]))
"""


def threshold_in(script: str, tmp_path: Path) -> int:
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_the_daemon_collects_cycles_rarely(tmp_path: Path) -> None:
    assert threshold_in(DAEMON, tmp_path) == GC_YOUNG_THRESHOLD


def test_an_in_process_simulation_collects_cycles_rarely(tmp_path: Path) -> None:
    assert threshold_in(SIM, tmp_path) == GC_YOUNG_THRESHOLD
