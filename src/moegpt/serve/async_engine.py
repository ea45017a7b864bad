"""Streaming on asyncio: the engine steps in a background thread, and each request's outputs
reach its coroutine through a queue. A consumer that stops early (a client that hung up)
aborts its request, which frees its KV blocks at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from moegpt.serve.engine import Engine, RequestOutput
from moegpt.serve.sequence import SamplingParams


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # the engine is not thread-safe: one user at a time
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="moegpt-engine", daemon=True)
        self._thread.start()

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the engine produces them, until all ``n`` samples end.
        Bad prompts or parameters raise before anything is queued."""
        params = params or SamplingParams()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt, params, request_id)
            self._streams[rid] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        remaining = params.n
        try:
            while remaining:
                out = await queue.get()
                if isinstance(out, BaseException):
                    raise out
                # a shutdown ends the whole request, however many samples were left
                remaining = 0 if out.finish_reason == "abort" else remaining - out.finished
                yield out
        finally:
            if remaining:  # the consumer left early: cancel and free the blocks
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)

    def metrics(self) -> str:
        """The Prometheus page of the engine's state."""
        from moegpt.serve.metrics import engine_metrics

        with self._lock:
            return engine_metrics(self.engine)

    def shutdown(self) -> None:
        """Stop stepping; requests still running are cancelled, and their streams end with
        finish reason "abort"."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        with self._lock:
            for rid, (loop, queue) in list(self._streams.items()):
                sequences = self.engine.abort(rid)
                for index in sequences[:1] or [0]:
                    ended = RequestOutput(rid, index, [], finished=True, finish_reason="abort")
                    loop.call_soon_threadsafe(queue.put_nowait, ended)

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                busy = self.engine.has_work()
                try:
                    outputs = self.engine.step() if busy else []
                    failure = None
                except Exception as e:  # delivered to every waiting stream
                    outputs, failure = [], e
            if failure is not None:
                for loop, queue in list(self._streams.values()):
                    loop.call_soon_threadsafe(queue.put_nowait, failure)
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)
            if not busy:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
