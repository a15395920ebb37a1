"""Offline delivery through mailboxes: half the chatting nodes go offline for
a while; what is sent to them waits with their three mailbox peers and
reaches them when they are back.

    python examples/offline_mailboxes.py [OUT_DIR]
"""

import sys
from pathlib import Path

from pigeon.sim.scenario import Scenario
from pigeon.ui.sim import run_and_print

if __name__ == "__main__":  # a spawned worker process imports this file again
    scenario = Scenario(nodes=12, mailboxes=3, messages=80, churn=0.5, seed=1, duration=40)
    sys.exit(run_and_print(scenario, Path(sys.argv[1] if sys.argv[1:] else "sim-out/offline")))
