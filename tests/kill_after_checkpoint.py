"""torchrun entry point for tests/test_dist_restart.py: fastsiam's CLI, except that on the first
attempt rank 1 kills itself with SIGKILL as soon as the file named by ``FASTSIAM_KILL_AFTER``
exists (a worker lost at a known point of the run, as an OOM kill or a node failure would)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from fastsiam.cli import main


def _kill_when_present(path: Path) -> None:
    while not path.exists():
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)


if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    target = Path(os.environ["FASTSIAM_KILL_AFTER"])
    threading.Thread(target=_kill_when_present, args=(target,), daemon=True).start()
sys.exit(main(sys.argv[1:]))
