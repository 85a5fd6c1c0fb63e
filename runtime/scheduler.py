"""Continuous-batching scheduler (vLLM semantics), pure Python.

A step is either all-prefill or all-decode, never mixed, because prefill and
decode run through different bucket graphs. Prefill has priority: running
requests that are part-way through a chunked prefill continue first, then
waiting requests are admitted first-come first-served. When no prefill work
exists, every running request decodes one token. Running out of KV-cache
blocks preempts the most recently admitted request, which drops its blocks and
is later recomputed from position 0 (vLLM's recompute preemption).

With prefix caching, every full block is registered in the block manager's
cache as soon as its tokens are scheduled, and a request being admitted takes
the longest cached run of its leading blocks by reference: it starts with
those tokens computed, so only the rest is prefilled. A hit may be a block
that an earlier row of the same step writes (the `n` samples of one prompt
admitted together): the runner runs rows in order, and a model writes a
layer's K/V for every row before any row attends, so the row that hits reads
K/V already written. The last token is always computed, so that there are
logits to sample. A recompute after preemption finds its own blocks again if
they were not evicted meanwhile.

As in vLLM V1, scheduled tokens count as computed the moment they are
scheduled; `update` only appends the sampled tokens and checks stop conditions.
"""

from __future__ import annotations

from collections import deque

from aotllm.runtime.block_manager import ROOT_HASH, BlockManager, hash_block_tokens
from aotllm.runtime.config import SchedulerConfig
from aotllm.runtime.request import Request, RequestStatus, ScheduledSeq, SchedulerOutput


def needs_prefill(request: Request) -> bool:
    """True while a request has more than one uncomputed token or has never sampled.

    A request with exactly one uncomputed token that already has output is
    decoding: that token is the one it sampled last step.
    """
    uncomputed = request.num_tokens - request.num_computed_tokens
    return uncomputed > 1 or request.num_output_tokens == 0


def _token_slice(request: Request, start: int, stop: int) -> list[int]:
    # Decode steps read only the output list instead of copying prompt+output.
    num_prompt = len(request.prompt_token_ids)
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : stop - num_prompt]
    return request.all_token_ids[start:stop]


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, block_size: int, num_blocks: int,
                 enable_prefix_caching: bool = False) -> None:
        self.config = scheduler_config
        self.enable_prefix_caching = enable_prefix_caching
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        # Prefix-cache lookups on first admission (vLLM's prefix_cache_queries /
        # _hits, in tokens), cumulative. Recomputes after preemption are not
        # counted: they would count the same prompt again.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.waiting: deque[Request] = deque()
        # In admission order: the last one is the first to be preempted.
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._finished_ids: list[str] = []

    # -- bookkeeping ---------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"duplicate id {request.request_id!r}"
        assert request.status == RequestStatus.WAITING, request.status
        assert 0 < len(request.prompt_token_ids) <= self.config.max_model_len
        assert request.num_computed_tokens == 0
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        """Abort in any state; unknown or already finished ids are ignored."""
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request from outside (abort, stop string); frees its blocks.

        A request the scheduler already finished keeps its first status.
        """
        assert status.finished, status
        request = self.requests.get(request_id)
        if request is None:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.block_manager.free(request.request_id)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _preempt_last(self, preempted_ids: list[str]) -> Request:
        victim = self.running.pop()
        self.block_manager.free(victim.request_id)
        victim.num_computed_tokens = 0
        victim.status = RequestStatus.WAITING
        victim.num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting.
        self.waiting.appendleft(victim)
        preempted_ids.append(victim.request_id)
        return victim

    def _reserve(self, request: Request, num_tokens: int, preempted_ids: list[str]) -> bool:
        """Get blocks for `request` to hold `num_tokens`, preempting later requests.

        Returns False when `request` itself had to be preempted.
        """
        bm = self.block_manager
        while not bm.can_allocate(request.request_id, num_tokens):
            assert len(self.running) > 1, (
                f"{request.request_id} alone does not fit in the KV cache "
                f"({bm.blocks_needed(request.request_id, num_tokens)} blocks needed, "
                f"{bm.num_free_blocks} free)"
            )
            if self._preempt_last(preempted_ids) is request:
                return False
        bm.allocate(request.request_id, num_tokens)
        return True

    def _seq(self, request: Request, num_new: int, sample: bool) -> ScheduledSeq:
        start = request.num_computed_tokens
        seq = ScheduledSeq(
            request=request,
            token_ids=_token_slice(request, start, start + num_new),
            start_pos=start,
            block_ids=self.block_manager.block_table(request.request_id),
            sample=sample,
        )
        request.num_computed_tokens += num_new
        self._cache_full_blocks(request)
        return seq

    # -- prefix caching ------------------------------------------------------

    def _ensure_hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The hashes of the request's first `num_blocks` full blocks (computed once)."""
        hashes = request.block_hashes
        bs = self.block_manager.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * bs
            parent = hashes[-1] if hashes else ROOT_HASH
            hashes.append(hash_block_tokens(parent, _token_slice(request, start, start + bs)))
        return hashes

    def _cache_full_blocks(self, request: Request) -> None:
        # Scheduled tokens count as computed: their K/V are written in this
        # step, before any later step can read them.
        if not self.enable_prefix_caching:
            return
        full = request.num_computed_tokens // self.block_manager.block_size
        hashes = self._ensure_hashes(request, full)
        self.block_manager.cache_blocks(request.request_id, hashes, full)

    def _cache_hits(self, request: Request) -> list[int]:
        """Cached blocks for the request's leading tokens, never its last token."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_manager.block_size
        hashes = self._ensure_hashes(request, max_blocks)
        return self.block_manager.get_computed_blocks(hashes, max_blocks)

    # -- the step ------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        preempted: list[str] = []
        seqs = self._schedule_prefill(preempted)
        phase = "prefill"
        if not seqs:
            phase = "decode"
            seqs = self._schedule_decode(preempted)
        assert seqs or not self.waiting or self.running, (
            f"{self.waiting[0].request_id} does not fit in an empty KV cache"
        )
        finished, self._finished_ids = self._finished_ids, []
        first = [s.request_id for s in seqs if s.request.num_cached_tokens < 0]
        for s in seqs:
            if s.request.num_cached_tokens < 0:
                s.request.num_cached_tokens = s.start_pos
        return SchedulerOutput(
            phase=phase, seqs=seqs, preempted_ids=preempted, finished_ids=finished,
            first_scheduled_ids=first,
        )

    def _prefill_chunk(self, request: Request, budget: int,
                       start: int | None = None) -> tuple[int, bool]:
        """Tokens to prefill this step (from `start`, default the computed
        tokens) and whether the chunk reaches the last token."""
        if start is None:
            start = request.num_computed_tokens
        uncomputed = request.num_tokens - start
        num_new = min(uncomputed, budget)
        return num_new, num_new == uncomputed

    def _schedule_prefill(self, preempted: list[str]) -> list[ScheduledSeq]:
        budget = self.config.token_budget
        seqs: list[ScheduledSeq] = []
        # Index loop: preemption pops from the end of `running` mid-iteration.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            i += 1
            if not needs_prefill(request):
                continue
            num_new, sample = self._prefill_chunk(request, budget)
            if not self._reserve(request, request.num_computed_tokens + num_new, preempted):
                break
            seqs.append(self._seq(request, num_new, sample))
            budget -= num_new
        if preempted:
            # Blocks are short: admitting now would only preempt again.
            return seqs
        while (
            self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            hits = self._cache_hits(request)
            num_cached = len(hits) * self.block_manager.block_size
            num_new, sample = self._prefill_chunk(request, budget, start=num_cached)
            total = num_cached + num_new
            if not self.block_manager.can_allocate(request.request_id, total, hits):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.allocate(request.request_id, total, hits)
            request.num_computed_tokens = num_cached
            if self.enable_prefix_caching and request.num_preemptions == 0:
                self.prefix_cache_queries += request.num_tokens
                self.prefix_cache_hits += num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            seqs.append(self._seq(request, num_new, sample))
            budget -= num_new
        return seqs

    def _schedule_decode(self, preempted: list[str]) -> list[ScheduledSeq]:
        seqs: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running):
            request = self.running[i]
            i += 1
            assert not needs_prefill(request), f"{request.request_id} is not ready to decode"
            if not self._reserve(request, request.num_tokens, preempted):
                break
            seqs.append(self._seq(request, 1, sample=True))
        return seqs

    # -- results -------------------------------------------------------------

    def update(
        self, scheduler_output: SchedulerOutput, sampled_token_ids: dict[str, int]
    ) -> list[Request]:
        """Append sampled tokens, finish requests that stop; returns those that got a token."""
        updated: list[Request] = []
        for seq in scheduler_output.seqs:
            request = seq.request
            if self.requests.get(request.request_id) is not request:
                continue  # aborted or finished since it was scheduled
            if request.status != RequestStatus.RUNNING:
                continue  # preempted by a later schedule() call
            token = sampled_token_ids.get(request.request_id)
            if not seq.sample:
                assert token is None, f"{request.request_id} sampled a non-final chunk"
                continue
            assert token is not None, f"no sampled token for {request.request_id}"
            request.output_token_ids.append(token)
            updated.append(request)
            status = self._check_stop(request)
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
        return updated

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= (params.min_tokens or 0):
            if not params.ignore_eos and last in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if last in (params.stop_token_ids or ()):
                request.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        max_tokens = params.max_tokens
        if (max_tokens is not None and request.num_output_tokens >= max_tokens) or (
            request.num_tokens >= self.config.max_model_len
        ):
            return RequestStatus.FINISHED_LENGTH
        return None
