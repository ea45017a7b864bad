"""Running a child process that owns the work (a training run, a torchrun job): a signal for
the work reaches it, and this process waits for the child's own ending rather than dying
first and leaving it orphaned."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping, Sequence


def run_child(command: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` to its end and return its exit status. Meanwhile a SIGINT here is left
    to the child (a terminal's Ctrl-C reaches it too, and it acts on it) and SIGTERM is passed
    on to it. A child that fails after such a signal (torchrun's agent exits 1 once it has
    stopped its workers) ends with 128 + the signal, the status of a stop asked for."""
    child = subprocess.Popen(list(command), env=None if env is None else dict(env))
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        if signum == signal.SIGTERM:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if status and received:
        return 128 + received[0]
    # Popen reports a death by signal N as -N; a shell (and supervise's FINAL) says 128 + N
    return 128 - status if status < 0 else status
