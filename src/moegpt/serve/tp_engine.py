"""Tensor-parallel engines: launching the ranks, and opening the engine on each. Every rank of a
torchrun job loads its shard; rank 0 gets the engine, the others follow its steps (see
:mod:`moegpt.serve.tensor_parallel`).

When a rank fails, torchrun stops the others, and the launcher tells which rank failed in one
line. A rank whose collective failed, which may only follow a peer's failure, waits to be stopped
rather than adding a traceback of its own.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.parallel.launch import rank_env_defaults
from moegpt.parallel.mesh import local_device
from moegpt.serve.engine import (
    Engine,
    folder_chat_template,
    folder_tokenizer,
    load_draft,
    weights_dtype,
)
from moegpt.serve.runner import build_forward
from moegpt.serve.tensor_parallel import follow, load_sharded

USER_ERROR_STATUS = 2  # `moegpt` printed a UserError as one line and exited with this status
# How long a rank whose collective failed waits to be stopped: torchrun's agent notices a failed
# rank within its monitor interval (0.1 s), then stops the others.
STOPPED_WITHIN_S = 10.0
SHUTDOWN_REPORT_S = 30.0  # a rank still shutting down after this long prints its stacks


def launch(tp: int, argv: Sequence[str]) -> int:
    """Run ``moegpt <argv>`` on ``tp`` local ranks, with torchrun's agent in this process, so
    that a failure is reported here in one line instead of torchrun's traceback and summary, and
    so that a signal to this process (Ctrl-C, SIGTERM) reaches every rank. Returns the exit
    status."""
    from torch.distributed.run import parse_args, run

    for name, value in rank_env_defaults(tp).items():
        os.environ.setdefault(name, value)
    # The agent logs each failure and each rank it stops; the one line below says what matters.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={tp}", "-m", "moegpt.cli", *argv]))
    except ChildFailedError as e:
        rank, failure = _first_failure(e.failures)
        if failure.exitcode == USER_ERROR_STATUS:
            return USER_ERROR_STATUS  # the rank has said what was wrong
        how = (
            f"died ({failure.signal_name()})"
            if failure.exitcode < 0
            else f"failed (exit status {failure.exitcode}; its error is above)"
        )
        print(
            f"moegpt: error: tensor-parallel rank {rank} {how}; the other ranks were stopped",
            file=sys.stderr,
        )
        return max(failure.exitcode, 1)
    except SignalException as e:  # the agent has passed the signal on to every rank
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        return 128 + e.sigval
    return 0


def _first_failure(failures: dict[int, ProcessFailure]) -> tuple[int, ProcessFailure]:
    """The rank that failed first. The agent stops the others with SIGTERM, so those failed
    only after it; timestamps are in whole seconds, so they alone cannot tell."""
    first = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM} or failures
    return min(first.items(), key=lambda item: (item[1].timestamp, item[0]))


def open_tensor_parallel(
    path: str | Path, config: ServeConfig, timeout_s: float = 600.0
) -> Engine | None:
    """Every rank of a torchrun job calls this. Rank 0 gets the engine over its shard; the
    other ranks follow its steps and get None once rank 0 closes the engine."""
    started = time.perf_counter()
    device = local_device()
    model, groups = load_sharded(
        path,
        config.tp,
        device,
        timeout_s,
        config.verify_weights,
        config.custom_all_reduce,
        weights_dtype(config, device),
    )
    if dist.get_rank() == 0:  # the draft, if any, runs on rank 0 alone
        tokenizer, eos_id = folder_tokenizer(path)
        draft = load_draft(path, config, model)
        engine = Engine(model, tokenizer, config, eos_id, tp=groups, draft=draft)
        engine.chat_template = folder_chat_template(path, tokenizer)
        engine.startup_seconds = time.perf_counter() - started
        return engine
    forward = build_forward(model, config, groups.device)
    follow(forward, groups)
    forward.close()
    return None


def run_rank(
    path: str | Path, config: ServeConfig, timeout_s: float, work: Callable[[Engine], None]
) -> None:
    """One rank of a torchrun job: rank 0 runs ``work`` on the engine, the others follow."""
    engine = None
    try:
        engine = open_tensor_parallel(path, config, timeout_s)
        if engine is not None:
            with engine:
                work(engine)
                # A shutdown that stalls prints every thread's stack (one was seen to hang at
                # exit on two H100s, after its output was complete).
                faulthandler.dump_traceback_later(SHUTDOWN_REPORT_S)
        else:
            faulthandler.dump_traceback_later(SHUTDOWN_REPORT_S)
    except UserError:  # said in one line; the ranks are in step, or torchrun stops them
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    except Exception:
        # A collective failed, perhaps only because a peer did: then torchrun stops this rank
        # (SIGTERM) while it waits here, and the launcher names the rank that failed first. A
        # rank that failed first is not stopped, and reports its own error after the wait.
        if engine is None or engine.forward.failed is not None:
            time.sleep(STOPPED_WITHIN_S)
        raise
    dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
