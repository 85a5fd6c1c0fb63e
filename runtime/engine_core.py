"""EngineCore: the scheduler and the model runner, one step at a time.

The core knows token ids only: no text, no `n`-sample groups, no output
formats. Each `step()` schedules, runs the model, feeds the sampled tokens
back to the scheduler and reports, per request that got a token, what is new
(`CoreOutput`). Turning that into text and `RequestOutput`s is the output
processor's job (runtime/output_processor.py), so the same core serves the
blocking `LLM` and the async server.

Not thread-safe: one thread owns a core. The async engine queues adds and
aborts from other threads and applies them between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aotllm.runtime.model_runner import ModelRunner
from aotllm.runtime.outputs import Logprob
from aotllm.runtime.request import Request, RequestStatus
from aotllm.runtime.scheduler import Scheduler


@dataclass
class CoreOutput:
    """What one request got in one step."""

    request_id: str
    new_token_ids: list[int]
    # One dict per new token (token id -> Logprob, decoded_token not yet set);
    # None unless the request asked for logprobs.
    new_logprobs: list[dict[int, Logprob]] | None
    # The scheduler's verdict after this step: set when the request finished
    # on EOS, a stop token id or its length limit.
    status: RequestStatus
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot of the scheduler after a step, for metrics and health checks."""

    num_running: int
    num_waiting: int
    num_blocks: int  # usable blocks (the null block excluded)
    num_free_blocks: int  # evictable cached blocks included
    # Free blocks that still hold a cached prefix (reused last, LRU).
    num_cached_free_blocks: int = 0
    # Cumulative prefix-cache lookups on first admission, in tokens.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks if self.num_blocks else 0.0


@dataclass
class EngineCoreOutputs:
    outputs: list[CoreOutput]
    # When the step's results were ready (time.time()).
    timestamp: float
    # Requests scheduled for the first time this step, and when (before the model ran).
    first_scheduled: list[str] = field(default_factory=list)
    scheduled_time: float = 0.0
    stats: SchedulerStats | None = None


class EngineCore:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler) -> None:
        self.runner = runner
        self.scheduler = scheduler

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Frees the requests' KV blocks now; unknown or finished ids are ignored."""
        for rid in request_ids:
            self.scheduler.abort_request(rid)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> None:
        """Ends requests that something outside the core stopped (a stop string)."""
        for rid in request_ids:
            self.scheduler.finish_request(rid, status)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def stats(self) -> SchedulerStats:
        bm = self.scheduler.block_manager
        return SchedulerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_blocks=bm.num_usable_blocks,
            num_free_blocks=bm.num_free_blocks,
            num_cached_free_blocks=bm.num_cached_free_blocks,
            prefix_cache_queries=self.scheduler.prefix_cache_queries,
            prefix_cache_hits=self.scheduler.prefix_cache_hits,
        )

    def step(self) -> EngineCoreOutputs:
        sched = self.scheduler.schedule()
        scheduled_time = time.time()
        first = sched.first_scheduled_ids
        sampled = self.runner.execute(sched)
        updated = self.scheduler.update(sched, {rid: s.token_id for rid, s in sampled.items()})
        outputs = []
        for req in updated:
            tok = sampled[req.request_id]
            outputs.append(CoreOutput(
                request_id=req.request_id,
                new_token_ids=[tok.token_id],
                new_logprobs=[tok.logprobs] if tok.logprobs is not None else None,
                status=req.status,
                stop_reason=req.stop_reason,
                num_cached_tokens=max(req.num_cached_tokens, 0),
            ))
        return EngineCoreOutputs(outputs=outputs, timestamp=time.time(), first_scheduled=first,
                                 scheduled_time=scheduled_time, stats=self.stats())
