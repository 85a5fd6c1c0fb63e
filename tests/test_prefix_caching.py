"""Prefix caching: the block manager's cache, the scheduler's hits, and greedy
outputs with caching equal to those without, token for token, on the eager
model and on a compiled artifact (n=2 and preemption included)."""

from __future__ import annotations

import random

import pytest

from aotllm import LLM, SamplingParams
from aotllm.graphs.kv_cache import NULL_BLOCK
from aotllm.runtime.block_manager import ROOT_HASH, BlockManager, hash_block_tokens
from aotllm.runtime.config import SchedulerConfig
from aotllm.runtime.request import Request, SchedulerOutput
from aotllm.runtime.scheduler import Scheduler
from tests.test_scheduler import next_token, params


def chain(tokens: list[int], block_size: int) -> list[bytes]:
    hashes, parent = [], ROOT_HASH
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes


# -- the block manager ----------------------------------------------------------


def test_hash_chain_names_the_whole_prefix():
    a = chain([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = chain([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert len(a) == 2 and a == chain([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)  # partial block: no hash
    assert a[1] != b[1]  # same tokens in block 1, different parent
    assert hash_block_tokens(ROOT_HASH, [1, 2]) != hash_block_tokens(ROOT_HASH, [2, 1])
    assert hash_block_tokens(ROOT_HASH, [1, 2]) == hash_block_tokens(b"", (1, 2))


def test_hit_shares_blocks_by_reference_count():
    bm = BlockManager(num_blocks=10, block_size=4, enable_caching=True)
    tokens = list(range(10, 22))  # 3 full blocks
    hashes = chain(tokens, 4)
    bm.allocate("a", 12)
    bm.cache_blocks("a", hashes, 3)
    table_a = bm.block_table("a")
    assert [bm.block_hash(b) for b in table_a] == hashes
    hits = bm.get_computed_blocks(hashes, max_blocks=2)
    assert hits == table_a[:2]
    assert bm.blocks_needed("b", 10, hits) == 1  # 3 blocks, 2 of them hits
    new = bm.allocate("b", 10, hits)
    assert bm.block_table("b") == table_a[:2] + new and new[0] not in table_a
    assert [bm.ref_count(b) for b in table_a] == [2, 2, 1]
    bm.check_invariants()
    bm.free("a")
    # The shared blocks stay held by b; a's last block is free but still cached.
    assert [bm.ref_count(b) for b in table_a] == [1, 1, 0]
    assert bm.num_cached_free_blocks == 1 and bm.num_used_blocks == 3
    bm.free("b")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_usable_blocks
    assert bm.num_cached_free_blocks == 3  # b's own last block was never registered
    bm.check_invariants()


def test_freed_cached_block_is_hit_again_and_counts_against_free():
    bm = BlockManager(num_blocks=5, block_size=2, enable_caching=True)  # 4 usable
    hashes = chain([1, 2, 3, 4], 2)
    bm.allocate("a", 4)
    bm.cache_blocks("a", hashes, 2)
    first = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 4 and bm.num_cached_free_blocks == 2
    hits = bm.get_computed_blocks(hashes, 2)
    assert hits == first
    # Both hits leave the free pool, plus 2 new blocks: 4 of the 4 free.
    assert bm.blocks_needed("b", 8, hits) == 4 and bm.can_allocate("b", 8, hits)
    assert not bm.can_allocate("b", 10, hits)
    bm.allocate("b", 8, hits)
    assert bm.block_table("b")[:2] == first and bm.num_free_blocks == 0
    bm.check_invariants()


def test_lru_eviction_reuses_uncached_blocks_first_and_drops_the_hash():
    bm = BlockManager(num_blocks=6, block_size=1, enable_caching=True)  # 5 usable
    old, new = chain([1, 2], 1), chain([7, 8], 1)
    bm.allocate("old", 2)
    bm.cache_blocks("old", old, 2)
    bm.allocate("new", 2)
    bm.cache_blocks("new", new, 2)
    old_blocks, new_blocks = bm.block_table("old"), bm.block_table("new")
    bm.free("old")
    bm.free("new")
    # One never-cached block is left: it goes first, and every cache entry survives.
    (plain,) = bm.allocate("x", 1)
    assert plain not in old_blocks + new_blocks and bm.num_cached_blocks == 4
    # Then the least recently freed chain, its tail block first.
    assert bm.allocate("y", 1) == [old_blocks[1]]
    assert bm.block_hash(old_blocks[1]) is None
    assert bm.get_computed_blocks(old, 2) == old_blocks[:1]  # the chain is cut at the tail
    assert bm.allocate("z", 1) == [old_blocks[0]]
    assert bm.get_computed_blocks(old, 2) == []
    assert bm.get_computed_blocks(new, 2) == new_blocks  # newer: still cached
    bm.check_invariants()


def test_a_hit_refreshes_lru_order():
    bm = BlockManager(num_blocks=4, block_size=1, enable_caching=True)  # 3 usable
    a, b = chain([1], 1), chain([2], 1)
    for rid, h in (("a", a), ("b", b)):
        bm.allocate(rid, 1)
        bm.cache_blocks(rid, h, 1)
        bm.free(rid)
    # a was freed first, but a hit and a free make it the most recent.
    hit = bm.get_computed_blocks(a, 1)
    bm.allocate("a2", 1, hit)
    bm.free("a2")
    bm.allocate("x", 2)  # the plain block, then the LRU cached one: b's
    assert bm.get_computed_blocks(b, 1) == [] and bm.get_computed_blocks(a, 1) == hit
    bm.check_invariants()


def test_duplicate_content_keeps_the_first_block():
    bm = BlockManager(num_blocks=6, block_size=2, enable_caching=True)
    hashes = chain([5, 6], 2)
    bm.allocate("a", 2)
    bm.allocate("b", 2)
    bm.cache_blocks("a", hashes, 1)
    bm.cache_blocks("b", hashes, 1)  # computed twice (e.g. admitted in one step)
    assert bm.get_computed_blocks(hashes, 1) == bm.block_table("a")
    assert bm.block_hash(bm.block_table("b")[0]) is None
    bm.free("b")
    assert bm.num_cached_free_blocks == 0  # b's copy went back as a plain free block
    bm.check_invariants()


def test_disabled_caching_and_reset():
    off = BlockManager(num_blocks=4, block_size=1)
    off.allocate("a", 1)
    off.cache_blocks("a", chain([1], 1), 1)
    assert off.num_cached_blocks == 0 and off.get_computed_blocks(chain([1], 1), 1) == []
    on = BlockManager(num_blocks=4, block_size=1, enable_caching=True)
    on.allocate("a", 2)
    on.cache_blocks("a", chain([1, 2], 1), 2)
    on.free("a")
    on.reset_prefix_cache()
    assert on.num_cached_blocks == 0 and on.num_free_blocks == 3
    on.check_invariants()


# -- the scheduler, with a simulated KV cache ------------------------------------


class CachingFakeRunner:
    """Writes each token into its slot and samples from the context read back
    through the block table. A request's first chunk may start past 0 (a cache
    hit): the slots it skips must already hold its own tokens."""

    def __init__(self, sched: Scheduler) -> None:
        self.bs = sched.block_manager.block_size
        self.cache: list[int | None] = [None] * (sched.block_manager.num_blocks * self.bs)
        self.computed: dict[str, int] = {}
        self.prefilled = 0

    def _slot(self, block_ids: list[int], pos: int) -> int:
        block = block_ids[pos // self.bs]
        assert block != NULL_BLOCK
        return block * self.bs + pos % self.bs

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for rid in out.preempted_ids + out.finished_ids:
            self.computed.pop(rid, None)
        sampled = {}
        for s in out.seqs:
            req = s.request
            if req.request_id not in self.computed:
                tokens = req.all_token_ids
                assert s.start_pos < req.num_tokens  # the last token is always computed
                got = [self.cache[self._slot(s.block_ids, p)] for p in range(s.start_pos)]
                assert got == tokens[: s.start_pos], "a cache hit holds other tokens"
            else:
                assert s.start_pos == self.computed[req.request_id]
            end = s.start_pos + len(s.token_ids)
            self.computed[req.request_id] = end
            if out.phase == "prefill":
                self.prefilled += len(s.token_ids)
            for i, tok in enumerate(s.token_ids):
                self.cache[self._slot(s.block_ids, s.start_pos + i)] = tok
            if s.sample:
                ctx = [self.cache[self._slot(s.block_ids, p)] for p in range(end)]
                sampled[req.request_id] = next_token(ctx)
        return sampled


def _run_workload(prompts: dict[str, list[int]], max_tokens: dict[str, int], caching: bool,
                  num_blocks: int, budget: int | None = None, arrive_every: int = 0):
    config = SchedulerConfig(max_model_len=64, max_num_seqs=6, max_num_batched_tokens=budget)
    sched = Scheduler(config, block_size=4, num_blocks=num_blocks,
                      enable_prefix_caching=caching)
    runner = CachingFakeRunner(sched)
    reqs = {rid: Request(rid, list(p), params(max_tokens=max_tokens[rid], ignore_eos=True))
            for rid, p in prompts.items()}
    pending = list(reqs.values())
    preemptions = steps = 0
    while pending or sched.has_unfinished_requests():
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            sched.add_request(pending.pop(0))
        out = sched.schedule()
        preemptions += len(out.preempted_ids)
        sched.update(out, runner.execute(out))
        sched.block_manager.check_invariants()
        steps += 1
        assert steps < 5000
    sched.schedule()
    assert sched.block_manager.num_used_blocks == 0
    return ({rid: r.output_token_ids for rid, r in reqs.items()},
            {rid: r.num_cached_tokens for rid, r in reqs.items()}, preemptions, runner, sched)


@pytest.mark.parametrize("seed", range(6))
def test_scheduler_outputs_equal_without_caching(seed):
    rng = random.Random(seed)
    shared = [rng.randrange(3, 90) for _ in range(rng.randrange(4, 20))]
    prompts, max_tokens = {}, {}
    for i in range(8):
        tail = [rng.randrange(3, 90) for _ in range(rng.randrange(1, 12))]
        prompts[f"r{i}"] = (shared if rng.random() < 0.7 else []) + tail
        max_tokens[f"r{i}"] = rng.randrange(1, 20)
    budget = rng.choice([None, 8])
    # Few blocks: requests get preempted and recompute, partly from the cache.
    num_blocks = rng.choice([20, 64])
    want, _, _, _, _ = _run_workload(prompts, max_tokens, False, 200, budget, arrive_every=2)
    got, cached, _, runner, sched = _run_workload(prompts, max_tokens, True, num_blocks, budget,
                                                  arrive_every=2)
    assert got == want
    assert all(0 <= c < len(prompts[r]) for r, c in cached.items())
    assert sched.prefix_cache_hits == sum(cached.values())


def test_repeated_prefix_is_prefilled_once_and_preemption_recomputes_from_cache():
    prefix = list(range(3, 23))  # 20 tokens: 5 blocks of 4
    prompts = {"a": prefix + [30], "b": prefix + [31, 32], "c": prefix[:9]}
    max_tokens = {"a": 3, "b": 3, "c": 3}
    want, _, _, base_runner, _ = _run_workload(prompts, max_tokens, False, 100)
    got, cached, _, runner, sched = _run_workload(prompts, max_tokens, True, 100, arrive_every=5)
    assert got == want
    # a computes the prefix; b hits all 5 blocks; c (9 tokens) hits 2 blocks.
    assert cached == {"a": 0, "b": 20, "c": 8}
    assert runner.prefilled == base_runner.prefilled - 28
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (21 + 22 + 9, 28)
    assert sched.block_manager.num_cached_free_blocks > 0

    # A prompt of exactly 5 full blocks still computes its last token.
    got, cached, *_ = _run_workload({"a": prefix, "b": prefix}, {"a": 2, "b": 2}, True, 100,
                                    arrive_every=5)
    assert got["a"] == got["b"] and cached == {"a": 0, "b": 16}

    # Preemption: with 12 blocks the two long requests cannot both finish, and
    # the recompute finds its own blocks in the cache.
    long = {"x": prefix + [40], "y": prefix + [41]}
    want, *_ = _run_workload(long, {"x": 20, "y": 20}, False, 100)
    got, _, preemptions, _, sched = _run_workload(long, {"x": 20, "y": 20}, True, 14)
    assert preemptions > 0 and got == want


# -- engines: eager and compiled -------------------------------------------------


def _prompts(vocab: int = 200) -> list[list[int]]:
    rng = random.Random(0)
    prefix = [rng.randrange(3, vocab) for _ in range(37)]
    return [prefix + [rng.randrange(3, vocab) for _ in range(k)] for k in (1, 5, 11, 3)]


class PrefillCounter:
    """Counts the tokens each step runs through prefill."""

    def __init__(self, llm: LLM) -> None:
        self.tokens = 0
        self.preemptions = 0
        runner, sched = llm.llm_engine.runner, llm.llm_engine.scheduler
        execute, schedule = runner.execute, sched.schedule

        def counting_execute(out):
            if out.phase == "prefill":
                self.tokens += out.num_tokens
            return execute(out)

        def counting_schedule():
            out = schedule()
            self.preemptions += len(out.preempted_ids)
            return out

        runner.execute = counting_execute
        sched.schedule = counting_schedule


def _generate(llm: LLM, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[o.token_ids for o in r.outputs] for r in outs], [r.num_cached_tokens for r in outs]


GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
# n=2 may not be greedy by temperature; top_k=1 samples the argmax all the same.
TOP1_N2 = SamplingParams(n=2, temperature=1.0, top_k=1, max_tokens=16, ignore_eos=True)


def _check_engine_pair(model: str, small_blocks: int, **engine) -> None:
    on = LLM(model, enable_prefix_caching=True, **engine)
    off = LLM(model, enable_prefix_caching=False, **engine)
    prompts = _prompts()
    block_size = on.llm_engine.scheduler.block_manager.block_size
    full = (37 // block_size) * block_size  # the shared prefix's full blocks

    # One prompt first, then the rest: they hit its prefix.
    counter = PrefillCounter(on)
    want, _ = _generate(off, prompts, GREEDY)
    got0, cached0 = _generate(on, prompts[:1], GREEDY)
    got, cached = _generate(on, prompts[1:], GREEDY)
    assert got0 + got == want
    assert cached0 == [0] and cached == [full] * 3
    assert counter.tokens == sum(map(len, prompts)) - 3 * full
    stats = on.llm_engine.scheduler_stats()
    assert stats.prefix_cache_hits == 3 * full
    assert stats.prefix_cache_queries == sum(map(len, prompts))

    # n=2: the second sample takes the first one's prompt blocks.
    on.reset_prefix_cache()
    counter.tokens = 0
    want, _ = _generate(off, prompts[:2], TOP1_N2)
    got, cached = _generate(on, prompts[:2], TOP1_N2)
    assert got == want and all(a == b for a, b in want)
    assert cached == [0, full]  # the first sample of the second prompt hits the first's
    p0, p1 = map(len, prompts[:2])
    own = lambda n: n - ((n - 1) // block_size) * block_size  # noqa: E731
    assert counter.tokens == p0 + own(p0) + (p1 - full) + own(p1)

    # After everything finished no block is held; cached ones are free but kept.
    bm = on.llm_engine.scheduler.block_manager
    assert bm.num_used_blocks == 0 and bm.num_cached_free_blocks > 0
    bm.check_invariants()

    # Preemption: a KV cache too small for every request at once.
    small = LLM(model, enable_prefix_caching=True, num_gpu_blocks_override=small_blocks,
                **engine)
    counter = PrefillCounter(small)
    long = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    want, _ = _generate(off, prompts, long)
    got, _ = _generate(small, prompts, long)
    assert counter.preemptions > 0, "the case meant to preempt did not"
    assert got == want
    assert small.llm_engine.scheduler.block_manager.num_used_blocks == 0


def test_eager_outputs_equal_without_caching(llama_dir, one_thread):
    _check_engine_pair(str(llama_dir), small_blocks=60, enforce_eager=True, dtype="float32",
                       block_size=4, max_model_len=128, max_num_seqs=8, seed=0)


def test_compiled_outputs_equal_without_caching(artifacts, one_thread):
    # The default test plan: block_size 16, prefill 16/64, decode batch 1/4.
    _check_engine_pair(str(artifacts.get()), small_blocks=14, max_num_seqs=4, seed=0)
