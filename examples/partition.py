"""A partition that heals: the network is split in two for 20 seconds
(connections across the split are cut and refused); messages sent across it
wait, in their senders' outboxes or in mailboxes on the sender's side, and
arrive once it heals.

    python examples/partition.py [OUT_DIR]
"""

import sys
from pathlib import Path

from pigeon.sim.scenario import Scenario
from pigeon.ui.sim import run_and_print

if __name__ == "__main__":  # a spawned worker process imports this file again
    scenario = Scenario(
        nodes=12, mailboxes=3, messages=80, churn=0, partition=20, seed=1, duration=45
    )
    sys.exit(run_and_print(scenario, Path(sys.argv[1] if sys.argv[1:] else "sim-out/partition")))
