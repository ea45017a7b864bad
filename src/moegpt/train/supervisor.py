"""`moegpt train --max-restarts N`: relaunch the training process after a crash.

The child resumes from the newest complete checkpoint each time, so a crash costs at most the
steps since that checkpoint. A usage error (exit status 2) is not retried, nor a run stopped
by SIGINT or SIGTERM.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence

from moegpt.children import run_child

# Exit statuses that end supervision: success, a usage error, and a stop the user asked for
# (SIGINT, SIGTERM: the run saved its last step).
FINAL = (0, 2, 128 + signal.SIGINT, 128 + signal.SIGTERM)


def supervise(child_argv: Sequence[str], max_restarts: int, log: Callable[[str], None]) -> int:
    """Run ``moegpt <child_argv>`` until it succeeds or ``max_restarts`` relaunches fail."""
    command = [sys.executable, "-m", "moegpt.cli", *child_argv]
    attempt = 0
    while True:
        code = run_child(command)
        if code in FINAL or attempt >= max_restarts:
            if code not in FINAL:
                log(f"training failed with status {code} after {attempt} restarts; giving up")
            return code
        attempt += 1
        log(f"training exited with status {code}; restart {attempt} of {max_restarts}")
