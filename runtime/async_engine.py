"""AsyncLLM: one engine shared by many asyncio callers (the OpenAI server).

One background thread owns the `LLMEngine` and runs its steps, so a model
step never blocks the event loop, and every request in flight is batched
with the others (continuous batching across HTTP requests). Callers on the
event loop validate and tokenize their prompt (`LLMEngine.process_inputs`,
so bad input fails before a response starts), then queue it; the thread
applies queued adds and aborts between steps and sends each request's
outputs back to its own `RequestStream`.

An abort (a client that went away) is applied as soon as the current step
ends, which frees the request's KV blocks at once. A bound on waiting
requests (`max_waiting_requests`) turns a flood into `QueueFullError`s
(HTTP 503) instead of unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from aotllm.runtime.engine import EngineRequest, LLMEngine, PromptType
from aotllm.runtime.engine_core import SchedulerStats
from aotllm.runtime.output_processor import IterationStats
from aotllm.runtime.outputs import RequestOutput
from aotllm.runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the client should retry later."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped (a failed step, or shutdown)."""


class RequestStream:
    """The outputs of one request, in order, on the event loop that made it."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


# Called on the engine thread after every step (metrics); must not block.
StatsCallback = Callable[[SchedulerStats, IterationStats | None, int], None]


class AsyncLLM:
    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 stats_callback: StatsCallback | None = None) -> None:
        if max_waiting_requests is not None and max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be at least 1, got {max_waiting_requests}")
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.stats_callback = stats_callback
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Any]] = []  # ("add", EngineRequest) | ("abort", [ids])
        self._pending_waiting = 0  # child requests queued in the inbox, not yet in the core
        self._streams: dict[str, RequestStream] = {}  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.dead_error: BaseException | None = None

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Starts the engine thread; call from inside the serving event loop."""
        assert self._thread is None, "already started"
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="aotllm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Aborts whatever is still in flight and stops the engine thread."""
        if self._thread is None:
            return
        with self._cv:
            # Streams stay registered: their callers get a final output with
            # finish_reason "abort" instead of hanging.
            self._inbox.append(("abort", list(self._streams)))
            self._stopping = True
            self._cv.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for stream in list(self._streams.values()):
            stream.put(EngineDeadError("the server is shutting down"))
        self._streams.clear()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    # -- requests (event loop) -------------------------------------------------

    def num_waiting(self) -> int:
        # len() of the scheduler's deque is atomic; the figure may be one step old.
        return self._pending_waiting + self.engine.scheduler.num_waiting

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams,
                    arrival_time: float | None = None) -> RequestStream:
        """Validates and queues a request; raises ValueError/TypeError for bad
        input, QueueFullError when the waiting queue is full, EngineDeadError
        when the engine is not running."""
        if not self.is_running or self._stopping:
            raise EngineDeadError("the engine is not running"
                                  + (f": {self.dead_error}" if self.dead_error else ""))
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        request = self.engine.process_inputs(request_id, prompt, params, arrival_time)
        with self._cv:
            limit = self.max_waiting_requests
            if limit is not None and self.num_waiting() + params.n > limit:
                raise QueueFullError(
                    f"the server is at capacity ({self.num_waiting()} requests waiting, "
                    f"--max-waiting-requests {limit}); retry later"
                )
            stream = RequestStream(request_id)
            self._streams[request_id] = stream
            self._inbox.append(("add", request))
            self._pending_waiting += params.n
            self._cv.notify()
        return stream

    def abort(self, request_id: str | list[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            self._streams.pop(rid, None)
        with self._cv:
            self._inbox.append(("abort", ids))
            self._cv.notify()

    async def generate(self, prompt: PromptType, params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; aborts it if the caller stops iterating early
        (a disconnected client cancels the task that iterates)."""
        stream = self.add_request(request_id, prompt, params)
        try:
            async for out in stream:
                yield out
        finally:
            if not stream.finished:
                self.abort(request_id)

    # -- the engine thread ----------------------------------------------------

    def _apply_inbox(self) -> list[RequestOutput]:
        """Adds and aborts queued since the last step; called holding the lock
        so `num_waiting` never misses a request in transit."""
        aborted: list[RequestOutput] = []
        for kind, payload in self._inbox:
            if kind == "add":
                request: EngineRequest = payload
                self._pending_waiting -= request.params.n
                try:
                    self.engine.add_processed_request(request)
                except Exception as e:  # e.g. a duplicate id: fail that request only
                    self._post([(request.request_id, e)])
            else:
                aborted += self.engine.abort_request(payload)
        self._inbox.clear()
        return aborted

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                with self._cv:
                    while not (self._inbox or engine.has_unfinished_requests()
                               or self._stopping):
                        self._cv.wait()
                    aborted = self._apply_inbox()
                    stop = self._stopping and not engine.has_unfinished_requests()
                if aborted:
                    self._report(None, len(aborted))
                    self._post([(o.request_id, o) for o in aborted])
                if stop:
                    break
                if not engine.has_unfinished_requests():
                    continue
                outputs = engine.step()
                self._report(engine.last_iteration_stats, 0)
                if outputs:
                    self._post([(o.request_id, o) for o in outputs])
        except BaseException as e:  # a failed step: every caller must hear of it
            logger.exception("the engine thread failed; failing every request in flight")
            self.dead_error = e
            self._post_all(EngineDeadError(f"the engine failed: {type(e).__name__}: {e}"))

    def _report(self, stats: IterationStats | None, num_aborted: int) -> None:
        if self.stats_callback is not None:
            try:
                self.stats_callback(self.engine.scheduler_stats(), stats, num_aborted)
            except Exception:  # metrics must never stop serving
                logger.exception("stats callback failed")

    def _call_in_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed under us (process exit): nobody listens
            pass

    def _post(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        # One callback per step, not per request: fewer wake-ups of the loop.
        self._call_in_loop(self._dispatch, items)

    def _post_all(self, error: BaseException) -> None:
        def fail_all() -> None:
            for stream in self._streams.values():
                stream.put(error)
            self._streams.clear()

        self._call_in_loop(fail_all)

    def _dispatch(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is None:
                continue  # aborted by its caller meanwhile
            stream.put(item)
            if isinstance(item, BaseException) or item.finished:
                del self._streams[rid]
