"""Streaming on asyncio: the engine steps in a background thread, and each request's token
outputs reach its coroutine through a queue; the coroutine turns them into text (off the
stepping thread, so detokenizing never delays a step). New requests, cancellations and
sequences a stop string ended travel to that thread through a mailbox it empties between
steps, so the event loop never waits for a step. A consumer that stops early (a client that
hung up) cancels its request, which frees its KV blocks before the next step."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import torch

from moegpt.serve.engine import Engine, RequestOutput
from moegpt.serve.metrics import EngineCollector
from moegpt.serve.output import OutputProcessor
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.tensor_parallel import TensorParallelForward


@dataclass
class _Submission:
    request_id: str
    ids: list[int]
    params: SamplingParams
    images: list[torch.Tensor]


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._wake = threading.Event()
        self._stopping = False
        # A failure the engine cannot step past (tensor-parallel ranks out of step): the
        # engine thread ends, new requests are refused, and ``on_dead`` (a server's exit) runs.
        self.dead: BaseException | None = None
        self.on_dead: Callable[[], None] | None = None
        # submissions; request ids to abort; (request id, sample index) a stop string ended
        self._mailbox: deque[_Submission | str | tuple[str, int]] = deque()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Submissions posted and taken in by the engine: one writer each (the event loop, the
        # engine thread), so reading their difference needs no lock.
        self._posted = 0
        self._taken = 0
        self._thread = threading.Thread(target=self._run, name="moegpt-engine", daemon=True)
        self._thread.start()

    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        images: list[torch.Tensor] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, until all ``n`` samples end.
        Call from a coroutine. A bad prompt (or images that do not match it) raises here,
        before anything is queued."""
        self._check_alive()
        params = params or SamplingParams()
        ids = self.engine.encode(prompt)
        self.engine.check_prompt(ids, room=min(params.max_tokens, 1))  # 0: scored alone
        images = images or []
        self.engine.check_images(ids, images)
        rid = request_id or uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), queue)
        if self.dead is not None:  # it died while this was tokenised: _die may have missed it
            self._streams.pop(rid, None)
            self._check_alive()
        self._posted += 1  # before the append: the engine thread may take it at once
        self._mailbox.append(_Submission(rid, ids, params, images))
        self._wake.set()
        return self._follow(rid, queue, params)

    async def _follow(
        self, rid: str, queue: asyncio.Queue, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        remaining = params.n
        text = OutputProcessor(self.engine.tokenizer, params.stop)
        try:
            while remaining:
                raw = await queue.get()
                if isinstance(raw, BaseException):
                    remaining = 0
                    raise raw
                out, stopped = text.process(raw)
                if out is None:  # drawn after a stop string ended the sequence
                    continue
                if stopped:
                    self._post((rid, out.index))
                # a shutdown ends the whole request, however many samples were left
                remaining = 0 if out.finish_reason == "abort" else remaining - out.finished
                yield out
        finally:
            if remaining:  # the consumer left early: cancel and free the blocks
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        self._post(request_id)

    def _post(self, item: str | tuple[str, int]) -> None:
        self._mailbox.append(item)
        self._wake.set()

    def waiting(self) -> int:
        """Requests not yet running: still in the mailbox or in the scheduler's waiting queue
        (preempted sequences included). Read from any thread; one moving from the mailbox to
        the queue may be counted twice for an instant, never missed."""
        return self._posted - self._taken + len(self.engine.scheduler.waiting)

    def metrics(self) -> EngineCollector:
        """A Prometheus collector of the engine's state, for a registry of the caller's own:
        it reads the counters at each scrape (between or during steps: each value is
        consistent, the page as a whole need not be)."""
        return EngineCollector(self.engine)

    def shutdown(self) -> None:
        """Stop stepping; requests still running are cancelled, and their streams end with
        finish reason "abort"."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._drain_mailbox()
        for rid, (loop, queue) in list(self._streams.items()):
            self.engine.abort(rid)
            ended = RequestOutput(rid, 0, [], finished=True, finish_reason="abort")
            loop.call_soon_threadsafe(queue.put_nowait, ended)

    def _drain_mailbox(self) -> None:
        while self._mailbox:
            item = self._mailbox.popleft()
            if isinstance(item, str):
                self.engine.abort(item)
                continue
            if isinstance(item, tuple):
                self.engine.finish(*item)
                continue
            if item.request_id not in self._streams:  # its stream ended before it ran
                self._taken += 1
                continue
            try:
                self.engine.add_request(item.ids, item.params, item.request_id, item.images)
            except Exception as e:  # e.g. a request id already running: that stream fails
                self._deliver(item.request_id, e)
            finally:
                self._taken += 1

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise RuntimeError(f"the engine stopped after a failed step: {self.dead}")

    def _out_of_step(self) -> bool:
        """Whether a failed step left tensor-parallel ranks out of step: the followers wait
        in a collective rank 0 will never join, so no later step can run."""
        forward = self.engine.forward
        return isinstance(forward, TensorParallelForward) and forward.failed is not None

    def _die(self, error: BaseException) -> None:
        self.dead = error
        for rid in list(self._streams):  # posted after the step failed
            self._deliver(rid, error)
        if self.on_dead is not None:
            self.on_dead()

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _run(self) -> None:
        while not self._stopping:
            self._drain_mailbox()
            if not self.engine.has_work():
                # An idle server's followers wait in a collective: keep it within its timeout.
                if isinstance(self.engine.forward, TensorParallelForward):
                    self.engine.forward.keep_alive()
                    if self._out_of_step():  # the group broke while idle
                        assert self.engine.forward.failed is not None
                        self._die(self.engine.forward.failed)
                        return
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:
                # A failed step leaves its requests in an unknown state: end them all with
                # the error (rather than failing again on every later step). Their streams
                # go at once: one posted while the step ran is then never taken in.
                for rid in list(self._streams):
                    self.engine.abort(rid)
                    self._deliver(rid, e)
                    self._streams.pop(rid, None)
                if self._out_of_step():
                    self._die(e)
                    return
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
