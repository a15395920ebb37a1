"""30% churn: 30 nodes, 3 of them mailbox peers; 30% of the others go offline
at random times and come back while 300 messages are sent.

    python examples/churn.py [OUT_DIR]
"""

import sys
from pathlib import Path

from pigeon.sim.scenario import Scenario
from pigeon.ui.sim import run_and_print

if __name__ == "__main__":  # a spawned worker process imports this file again
    scenario = Scenario(nodes=30, mailboxes=3, messages=300, churn=0.3, seed=1, duration=60)
    sys.exit(run_and_print(scenario, Path(sys.argv[1] if sys.argv[1:] else "sim-out/churn")))
