"""Files under churn: 12 nodes send each other 10 small files peer to peer
(WebRTC) among 60 messages, while a third of them go offline and come back;
an offer to someone away waits in a mailbox, the bytes move once both are
online, and each file is checked byte for byte where it lands.

    python examples/files.py [OUT_DIR]
"""

import sys
from pathlib import Path

from pigeon.sim.scenario import Scenario
from pigeon.ui.sim import run_and_print

if __name__ == "__main__":  # a spawned worker process imports this file again
    scenario = Scenario(
        nodes=12, mailboxes=3, messages=60, files=10, churn=0.3, seed=1, duration=40
    )
    sys.exit(run_and_print(scenario, Path(sys.argv[1] if sys.argv[1:] else "sim-out/files")))
