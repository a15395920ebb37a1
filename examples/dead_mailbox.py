"""A dead mailbox: one of the three mailbox peers is killed mid-run, never to
return, while half the nodes are offline at some point; every message still
arrives (each was left with all of its recipient's mailboxes).

    python examples/dead_mailbox.py [OUT_DIR]
"""

import sys
from pathlib import Path

from pigeon.sim.scenario import Scenario
from pigeon.ui.sim import run_and_print

if __name__ == "__main__":  # a spawned worker process imports this file again
    scenario = Scenario(
        nodes=12, mailboxes=3, messages=80, churn=0.5, kill_mailboxes=1, seed=3, duration=40
    )
    sys.exit(run_and_print(scenario, Path(sys.argv[1] if sys.argv[1:] else "sim-out/dead-mailbox")))
