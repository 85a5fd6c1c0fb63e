import random
from types import SimpleNamespace

import pytest

from aotllm.graphs.kv_cache import NULL_BLOCK
from aotllm.runtime.config import SchedulerConfig
from aotllm.runtime.request import Request, RequestStatus, SchedulerOutput
from aotllm.runtime.scheduler import Scheduler


def params(max_tokens=8, min_tokens=0, ignore_eos=False, stop_token_ids=None):
    # Stand-in for SamplingParams: the scheduler reads only these fields.
    return SimpleNamespace(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        ignore_eos=ignore_eos,
        stop_token_ids=stop_token_ids,
    )


def make_request(rid, prompt, eos=(), **kw) -> Request:
    if isinstance(prompt, int):
        seed = sum(map(ord, rid))
        prompt = [(seed + 11 * i) % 50 + 3 for i in range(prompt)]
    return Request(rid, list(prompt), params(**kw), eos_token_ids=frozenset(eos))


def make_scheduler(block_size=4, num_blocks=64, max_model_len=64, max_num_seqs=8, budget=None):
    config = SchedulerConfig(
        max_model_len=max_model_len, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget
    )
    return Scheduler(config, block_size=block_size, num_blocks=num_blocks)


def next_token(context: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(context)) * 7 + len(context)) % 100 + 3


class FakeRunner:
    """Simulates the paged KV cache: writes each token into its slot, samples
    from the context read back through the block table. A wrong block table,
    a block shared by mistake or a skipped position changes the output."""

    def __init__(self, sched: Scheduler, script: dict[str, list[int]] | None = None):
        self.block_size = sched.block_manager.block_size
        self.cache: list[int | None] = [None] * (sched.block_manager.num_blocks * self.block_size)
        self.computed: dict[str, int] = {}
        self.script = script or {}

    def _slot(self, block_ids, pos):
        block = block_ids[pos // self.block_size]
        assert block != NULL_BLOCK
        return block * self.block_size + pos % self.block_size

    def execute(self, out: SchedulerOutput) -> dict[str, int]:
        for rid in out.preempted_ids + out.finished_ids:
            self.computed.pop(rid, None)
        sampled = {}
        for s in out.seqs:
            rid = s.request_id
            # Positions are contiguous; a preempted request restarts at 0.
            assert s.start_pos == self.computed.get(rid, 0)
            end = s.start_pos + len(s.token_ids)
            self.computed[rid] = end
            assert len(s.block_ids) * self.block_size >= end
            assert s.sample == (end == s.request.num_tokens)
            if out.phase == "decode":
                assert len(s.token_ids) == 1 and s.sample
            for i, tok in enumerate(s.token_ids):
                self.cache[self._slot(s.block_ids, s.start_pos + i)] = tok
            if s.sample:
                script = self.script.get(rid)
                if script is not None:
                    sampled[rid] = script[s.request.num_output_tokens]
                else:
                    ctx = [self.cache[self._slot(s.block_ids, p)] for p in range(end)]
                    sampled[rid] = next_token(ctx)
        return sampled


def step(sched, runner, before_update=None):
    out = sched.schedule()
    sampled = runner.execute(out)
    if before_update is not None:
        before_update(out)
    sched.update(out, sampled)
    check_invariants(sched)
    return out


def check_invariants(sched: Scheduler):
    bm = sched.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks - 1
    owned = [b for r in sched.requests.values() for b in bm.block_table(r.request_id)]
    assert len(owned) == len(set(owned)), "a block is owned twice"
    assert len(owned) == bm.num_used_blocks
    assert sched.num_running <= sched.config.max_num_seqs
    for r in sched.running:
        assert r.status == RequestStatus.RUNNING
        assert len(bm.block_table(r.request_id)) * bm.block_size >= r.num_computed_tokens
    for r in sched.waiting:
        assert r.status == RequestStatus.WAITING
        assert r.num_computed_tokens == 0 and not bm.has_blocks(r.request_id)


def run_all(sched, runner, max_steps=10_000):
    outs = []
    while sched.has_unfinished_requests():
        outs.append(step(sched, runner))
        assert len(outs) < max_steps, "scheduler made no progress"
    outs.append(step(sched, runner))  # drains finished_ids
    return outs


def solo_output(prompt, max_model_len=64, **kw) -> list[int]:
    sched = make_scheduler(num_blocks=256, max_model_len=max_model_len)
    req = make_request("solo", prompt, **kw)
    sched.add_request(req)
    run_all(sched, FakeRunner(sched))
    return req.output_token_ids


# -- basic flow ---------------------------------------------------------------


def test_prefill_then_decode_then_finish():
    sched = make_scheduler()
    runner = FakeRunner(sched)
    req = make_request("a", 5, max_tokens=3)
    sched.add_request(req)
    assert sched.num_waiting == 1 and sched.get_num_unfinished_requests() == 1

    out = step(sched, runner)
    assert out.phase == "prefill" and len(out.seqs) == 1
    seq = out.seqs[0]
    assert seq.token_ids == req.prompt_token_ids and seq.start_pos == 0 and seq.sample
    assert req.num_output_tokens == 1 and req.num_computed_tokens == 5

    out = step(sched, runner)
    assert out.phase == "decode"
    assert out.seqs[0].token_ids == [req.output_token_ids[0]] and out.seqs[0].start_pos == 5
    out = step(sched, runner)
    assert out.seqs[0].start_pos == 6
    assert req.status == RequestStatus.FINISHED_LENGTH and req.num_output_tokens == 3
    assert not sched.has_unfinished_requests()
    assert sched.block_manager.num_used_blocks == 0

    out = sched.schedule()
    assert out.is_empty and out.finished_ids == ["a"]
    assert sched.schedule().finished_ids == []  # reported once


def test_update_returns_requests_that_got_a_token():
    sched = make_scheduler(budget=4)
    runner = FakeRunner(sched)
    long, short = make_request("long", 6), make_request("short", 2)
    sched.add_request(long)
    sched.add_request(short)
    out = sched.schedule()  # long: chunk of 4, no sample
    assert [s.request_id for s in out.seqs] == ["long"] and not out.seqs[0].sample
    assert sched.update(out, runner.execute(out)) == []
    out = sched.schedule()  # long: last 2 tokens, short: 2 tokens
    got = sched.update(out, runner.execute(out))
    assert [r.request_id for r in got] == ["long", "short"]


def test_continuous_batching_new_request_joins():
    sched = make_scheduler()
    runner = FakeRunner(sched)
    a, b = make_request("a", 5, max_tokens=20), make_request("b", 3, max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    out = step(sched, runner)
    assert out.phase == "prefill" and [s.request_id for s in out.seqs] == ["a", "b"]
    out = step(sched, runner)
    assert out.phase == "decode" and [s.request_id for s in out.seqs] == ["a", "b"]

    c = make_request("c", 4, max_tokens=20)
    sched.add_request(c)
    out = step(sched, runner)
    assert out.phase == "prefill" and [s.request_id for s in out.seqs] == ["c"]
    out = step(sched, runner)
    assert out.phase == "decode" and [s.request_id for s in out.seqs] == ["a", "b", "c"]
    assert [s.start_pos for s in out.seqs] == [6, 4, 4]
    run_all(sched, runner)
    for r in (a, b, c):
        assert r.output_token_ids == solo_output(r.prompt_token_ids, max_tokens=20)


def test_max_num_seqs_respected():
    sched = make_scheduler(max_num_seqs=2)
    runner = FakeRunner(sched)
    reqs = [make_request(f"r{i}", 3, max_tokens=2 + i) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    out = step(sched, runner)
    assert [s.request_id for s in out.seqs] == ["r0", "r1"]
    assert sched.num_running == 2 and sched.num_waiting == 2
    out = step(sched, runner)  # r0 finishes (max_tokens=2)
    assert out.phase == "decode" and reqs[0].status == RequestStatus.FINISHED_LENGTH
    out = step(sched, runner)
    assert out.phase == "prefill" and [s.request_id for s in out.seqs] == ["r2"]
    for out in run_all(sched, runner):
        assert len(out.seqs) <= 2
    assert all(r.num_output_tokens == 2 + i for i, r in enumerate(reqs))


# -- chunked prefill and the token budget ------------------------------------


def test_chunked_prefill_of_long_prompt():
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    req = make_request("a", 20, max_tokens=3)
    sched.add_request(req)
    chunks = [step(sched, runner) for _ in range(3)]
    assert all(o.phase == "prefill" and len(o.seqs) == 1 for o in chunks)
    seqs = [o.seqs[0] for o in chunks]
    assert [s.start_pos for s in seqs] == [0, 8, 16]
    assert [len(s.token_ids) for s in seqs] == [8, 8, 4]
    assert [s.sample for s in seqs] == [False, False, True]
    assert sum((s.token_ids for s in seqs), []) == req.prompt_token_ids
    assert req.num_output_tokens == 1
    assert step(sched, runner).phase == "decode"
    run_all(sched, runner)
    assert req.output_token_ids == solo_output(req.prompt_token_ids, max_tokens=3)


def test_token_budget_shared_between_requests():
    sched = make_scheduler(budget=8)
    runner = FakeRunner(sched)
    a, b, c = make_request("a", 13), make_request("b", 2), make_request("c", 5)
    for r in (a, b, c):
        sched.add_request(r)
    out = step(sched, runner)
    assert [(s.request_id, len(s.token_ids)) for s in out.seqs] == [("a", 8)]
    out = step(sched, runner)
    # The mid-prefill request continues first; the rest of the budget admits
    # the next ones, the last one only partly.
    assert [(s.request_id, len(s.token_ids), s.sample) for s in out.seqs] == [
        ("a", 5, True),
        ("b", 2, True),
        ("c", 1, False),
    ]
    out = step(sched, runner)
    assert [(s.request_id, s.start_pos, len(s.token_ids)) for s in out.seqs] == [("c", 1, 4)]
    for out in run_all(sched, runner):
        assert out.phase == "decode" or out.num_tokens <= 8


# -- FCFS ------------------------------------------------------------------------


def test_fcfs_head_of_queue_blocks_later_requests():
    # 6 usable blocks of 4 tokens.
    sched = make_scheduler(block_size=4, num_blocks=7)
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", 11, max_tokens=4))  # 3 blocks
    step(sched, runner)
    sched.add_request(make_request("big", 16, max_tokens=1))  # 4 blocks: does not fit yet
    sched.add_request(make_request("small", 2, max_tokens=1))  # would fit, must wait
    out = step(sched, runner)
    assert out.phase == "decode" and [s.request_id for s in out.seqs] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["big", "small"]
    prefill_order = [
        s.request_id for o in run_all(sched, runner) if o.phase == "prefill" for s in o.seqs
    ]
    assert prefill_order == ["big", "small"]


# -- stop conditions ----------------------------------------------------------------


@pytest.mark.parametrize(
    "script, kw, output, status, reason",
    [
        ([5, 2, 9], dict(eos={2}), [5, 2], RequestStatus.FINISHED_STOPPED, None),
        ([5, 7, 9], dict(stop_token_ids=[7]), [5, 7], RequestStatus.FINISHED_STOPPED, 7),
        ([2, 2, 2, 2], dict(eos={2}, ignore_eos=True, max_tokens=3), [2, 2, 2],
         RequestStatus.FINISHED_LENGTH, None),
        # ignore_eos does not silence stop_token_ids
        ([5, 2, 9], dict(eos={2}, ignore_eos=True, stop_token_ids=[2]), [5, 2],
         RequestStatus.FINISHED_STOPPED, 2),
        ([2, 7, 2, 9], dict(eos={2}, stop_token_ids=[7], min_tokens=3), [2, 7, 2],
         RequestStatus.FINISHED_STOPPED, None),
        ([2, 7, 7, 9], dict(eos={2}, stop_token_ids=[7], min_tokens=3), [2, 7, 7],
         RequestStatus.FINISHED_STOPPED, 7),
        ([4, 5, 6, 7, 8], dict(max_tokens=4), [4, 5, 6, 7], RequestStatus.FINISHED_LENGTH, None),
        # A stop token on the last allowed token is a stop, not a length finish.
        ([4, 2, 6], dict(eos={2}, max_tokens=2), [4, 2], RequestStatus.FINISHED_STOPPED, None),
        # max_model_len=10 with a 5-token prompt leaves room for 5 tokens.
        ([4, 5, 6, 7, 8, 9], dict(max_tokens=None), [4, 5, 6, 7, 8],
         RequestStatus.FINISHED_LENGTH, None),
    ],
)
def test_stop_conditions(script, kw, output, status, reason):
    sched = make_scheduler(max_model_len=10)
    runner = FakeRunner(sched, script={"a": script})
    req = make_request("a", 5, **kw)
    sched.add_request(req)
    run_all(sched, runner)
    assert req.output_token_ids == output
    assert req.status == status and req.status.finish_reason == status.value
    assert req.stop_reason == reason
    assert sched.block_manager.num_used_blocks == 0


def test_finish_request_for_stop_string():
    sched = make_scheduler()
    runner = FakeRunner(sched)
    req = make_request("a", 5, max_tokens=10)
    sched.add_request(req)
    step(sched, runner)
    step(sched, runner)
    sched.finish_request("a", RequestStatus.FINISHED_STOPPED)
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert sched.block_manager.num_used_blocks == 0 and sched.num_running == 0
    assert sched.schedule().finished_ids == ["a"]
    # Finishing again is a no-op that keeps the first status.
    sched.abort_request("a")
    assert req.status == RequestStatus.FINISHED_STOPPED
    assert sched.schedule().finished_ids == []


# -- aborts ---------------------------------------------------------------------------


def test_abort_in_every_state_frees_all_blocks():
    sched = make_scheduler(budget=8, max_num_seqs=2)
    runner = FakeRunner(sched)
    decoding = make_request("decoding", 3, max_tokens=50)
    chunked = make_request("chunked", 30, max_tokens=50)
    waiting = make_request("waiting", 3, max_tokens=50)
    for r in (decoding, chunked, waiting):
        sched.add_request(r)
    step(sched, runner)  # decoding: prefilled; chunked: first 5 tokens
    assert sched.num_running == 2 and sched.num_waiting == 1
    assert 0 < chunked.num_computed_tokens < 30

    sched.abort_request("chunked")
    sched.abort_request("waiting")
    sched.abort_request("never-added")
    out = step(sched, runner)
    assert sorted(out.finished_ids) == ["chunked", "waiting"]
    assert out.phase == "decode" and [s.request_id for s in out.seqs] == ["decoding"]
    sched.abort_request("decoding")
    for r in (decoding, chunked, waiting):
        assert r.status == RequestStatus.FINISHED_ABORTED and r.status.finish_reason == "abort"
    assert not sched.has_unfinished_requests()
    assert sched.block_manager.num_used_blocks == 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks - 1
    out = sched.schedule()
    assert out.is_empty and out.finished_ids == ["decoding"]


def test_token_sampled_for_request_aborted_meanwhile_is_ignored():
    sched = make_scheduler()
    runner = FakeRunner(sched)
    a, b = make_request("a", 4), make_request("b", 4)
    sched.add_request(a)
    sched.add_request(b)
    step(sched, runner)
    out = step(sched, runner, before_update=lambda _: sched.abort_request("a"))
    assert len(out.seqs) == 2
    assert a.num_output_tokens == 1 and b.num_output_tokens == 2


# -- preemption -------------------------------------------------------------------------


def test_preemption_recomputes_and_keeps_results():
    # 8 usable blocks of 4 tokens; each request needs 5 blocks by its end.
    sched = make_scheduler(block_size=4, num_blocks=9)
    runner = FakeRunner(sched)
    reqs = [make_request(f"r{i}", 6 + i % 2, max_tokens=12) for i in range(4)]
    for r in reqs:
        sched.add_request(r)
    outs = []
    pending: dict[str, list[int]] = {}  # preempted id -> its tokens when preempted
    num_recomputes = 0
    while sched.has_unfinished_requests():
        out = step(sched, runner)
        outs.append(out)
        assert sched.block_manager.num_used_blocks <= 8
        for s in out.seqs:
            if s.request_id in pending:
                # Recomputed from position 0 with prompt + the outputs so far,
                # sampling the next new token at the end.
                assert s.start_pos == 0 and s.sample
                assert s.token_ids == pending.pop(s.request_id)
                num_recomputes += 1
        for rid in out.preempted_ids:
            req = sched.requests[rid]
            assert req.status == RequestStatus.WAITING and req.num_computed_tokens == 0
            assert len(req.all_token_ids) > len(req.prompt_token_ids)
            pending[rid] = req.all_token_ids
        assert len(outs) < 1000
    assert num_recomputes > 0 and not pending
    assert any(o.preempted_ids for o in outs), "the cache was big enough: no preemption tested"
    assert sum(r.num_preemptions for r in reqs) == sum(len(o.preempted_ids) for o in outs)
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert r.output_token_ids == solo_output(r.prompt_token_ids, max_tokens=12)


def test_preempted_request_goes_to_front_of_queue():
    sched = make_scheduler(block_size=2, num_blocks=7, max_num_seqs=2)  # 6 usable blocks
    runner = FakeRunner(sched)
    a = make_request("a", 4, max_tokens=8)
    b = make_request("b", 4, max_tokens=8)
    c = make_request("c", 2, max_tokens=1)
    for r in (a, b, c):
        sched.add_request(r)
    step(sched, runner)  # a, b prefilled: 4 blocks used
    preempted = []
    while not preempted:
        out = step(sched, runner)
        preempted = out.preempted_ids
    assert preempted == ["b"] and b.num_preemptions == 1
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    run_all(sched, runner)
    assert b.output_token_ids == solo_output(b.prompt_token_ids, max_tokens=8)


def test_lone_request_that_cannot_fit_is_an_internal_error():
    sched = make_scheduler(block_size=2, num_blocks=3, max_model_len=16)  # 4 token slots
    runner = FakeRunner(sched)
    sched.add_request(make_request("a", 3, max_tokens=10))
    step(sched, runner)
    step(sched, runner)  # position 4 fills the cache
    with pytest.raises(AssertionError, match="does not fit"):
        sched.schedule()


# -- randomized ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_workload_keeps_invariants(seed):
    rng = random.Random(seed)
    max_model_len = 40
    sched = make_scheduler(
        block_size=4, num_blocks=24, max_model_len=max_model_len, max_num_seqs=5, budget=12
    )
    runner = FakeRunner(sched)
    all_reqs: list[Request] = []
    aborted: set[str] = set()

    def random_abort(_out=None):
        if sched.requests and rng.random() < 0.05:
            rid = rng.choice(sorted(sched.requests))
            sched.abort_request(rid)
            aborted.add(rid)

    for i in range(400):
        if i < 300 and rng.random() < 0.3:
            prompt = [rng.randrange(3, 103) for _ in range(rng.randint(1, 30))]
            max_tokens = rng.choice([None, rng.randint(1, 20)])
            req = make_request(f"q{i}", prompt, eos={rng.randrange(3, 103)}, max_tokens=max_tokens)
            all_reqs.append(req)
            sched.add_request(req)
        random_abort()
        out = step(sched, runner, before_update=random_abort)
        if out.phase == "prefill":
            assert 0 < out.num_tokens <= 12
        else:
            assert out.num_tokens == len(out.seqs) <= 5
    run_all(sched, runner)

    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks - 1
    assert aborted and any(r.num_preemptions for r in all_reqs)
    for r in all_reqs:
        assert r.status.finished
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        assert r.num_tokens <= max_model_len
        solo = solo_output(
            r.prompt_token_ids, max_model_len=max_model_len,
            eos=r.eos_token_ids, max_tokens=r.sampling_params.max_tokens,
        )
        assert r.output_token_ids == solo


def test_prompt_larger_than_the_whole_cache_is_an_internal_error():
    sched = make_scheduler(block_size=2, num_blocks=3, max_model_len=16)
    sched.add_request(make_request("a", 6))
    with pytest.raises(AssertionError, match="empty KV cache"):
        sched.schedule()
