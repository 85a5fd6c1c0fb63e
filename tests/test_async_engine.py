"""AsyncLLM in process over the eager tiny model: batching across callers,
aborts, the waiting-queue bound, and a failing step."""

from __future__ import annotations

import asyncio

import pytest

from aotllm import LLM, SamplingParams
from aotllm.runtime.async_engine import AsyncLLM, EngineDeadError, QueueFullError
from aotllm.runtime.sampling_params import RequestOutputKind

DELTA = RequestOutputKind.DELTA


def _llm(llama_dir, **kw) -> LLM:
    return LLM(str(llama_dir), **{**dict(enforce_eager=True, dtype="float32", block_size=4,
                                         max_model_len=128, max_num_seqs=4, seed=0), **kw})


@pytest.fixture(scope="module")
def llm(llama_dir, one_thread) -> LLM:
    return _llm(llama_dir)


def _params(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, output_kind=DELTA, **kw)


async def _collect(engine: AsyncLLM, rid: str, prompt, params) -> list[int]:
    tokens = []
    async for out in engine.generate(prompt, params, rid):
        tokens += out.outputs[0].token_ids
    return tokens


def test_concurrent_callers_match_llm_generate(llm):
    prompts = [f"prompt number {i}" for i in range(10)]
    lengths = [3 + 4 * i for i in range(10)]
    want = [o.outputs[0].token_ids for o in llm.generate(
        prompts, [_params(n).clone(output_kind=RequestOutputKind.CUMULATIVE) for n in lengths],
        use_tqdm=False)]
    seen_batch = []

    async def main():
        engine = AsyncLLM(llm.llm_engine, stats_callback=lambda s, it, a: seen_batch.append(
            s.num_running))
        engine.start()
        try:
            return await asyncio.gather(*(_collect(engine, f"r{i}", p, _params(n))
                                          for i, (p, n) in enumerate(zip(prompts, lengths))))
        finally:
            await engine.shutdown()

    got = asyncio.run(main())
    assert got == want
    assert max(seen_batch) == 4  # callers were batched together, up to max_num_seqs
    assert llm.llm_engine.scheduler.block_manager.num_used_blocks == 0


def test_abandoned_stream_is_aborted(llm):
    bm = llm.llm_engine.scheduler.block_manager

    async def main():
        engine = AsyncLLM(llm.llm_engine)
        engine.start()
        try:
            gen = engine.generate("Hello", _params(100), "long")
            first = await gen.__anext__()
            assert first.outputs[0].token_ids and not first.finished
            await gen.aclose()  # what a disconnected client's cancellation does
            for _ in range(200):
                if not llm.llm_engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.01)
            assert not llm.llm_engine.has_unfinished_requests()
            assert bm.num_used_blocks == 0
            # The engine keeps serving.
            assert len(await _collect(engine, "next", "Hello", _params(5))) == 5
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_waiting_queue_bound_and_bad_input(llm):
    sched = llm.llm_engine.scheduler

    async def main():
        engine = AsyncLLM(llm.llm_engine, max_waiting_requests=3)
        engine.start()
        try:
            # Fill the running batch (max_num_seqs=4) with long requests, so
            # the next ones stay waiting.
            running = []
            for i in range(4):  # one at a time: queued ones count as waiting too
                running.append(engine.add_request(f"r{i}", "Hello", _params(100)))
                while sched.num_running <= i:
                    await asyncio.sleep(0.001)
            waiting = [engine.add_request(f"w{i}", "Hello", _params(5)) for i in range(3)]
            with pytest.raises(QueueFullError, match="max-waiting-requests"):
                engine.add_request("w3", "Hello", _params(5))
            with pytest.raises(ValueError, match="maximum model length"):
                engine.add_request("long", {"prompt_token_ids": [5] * 200}, _params(2))
            with pytest.raises(ValueError, match="n must be 1"):
                engine.add_request("n", "Hello", SamplingParams(n=2, temperature=0))
            for s in running + waiting:
                async for _ in s:
                    pass
            assert all(s.finished for s in running + waiting)
            # Room again once the queue drained.
            assert len(await _collect(engine, "later", "Hello", _params(3))) == 3
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_failed_step_fails_every_stream(llama_dir):
    llm = _llm(llama_dir)

    def broken(sched):
        raise RuntimeError("device lost")

    async def main():
        engine = AsyncLLM(llm.llm_engine)
        engine.start()
        llm.llm_engine.runner.execute = broken
        streams = [engine.add_request(f"r{i}", "Hello", _params(5)) for i in range(2)]
        for s in streams:
            with pytest.raises(EngineDeadError, match="device lost"):
                async for _ in s:
                    pass
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            engine.add_request("after", "Hello", _params(5))
        await engine.shutdown()

    asyncio.run(main())


def test_shutdown_ends_running_streams_with_abort(llm):
    async def main():
        engine = AsyncLLM(llm.llm_engine)
        engine.start()
        gen = engine.generate("Hello", _params(100), "s2")
        outs = [await gen.__anext__()]
        task = asyncio.ensure_future(engine.shutdown())
        async for out in gen:
            outs.append(out)
        await task
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert sum(len(o.outputs[0].token_ids) for o in outs) < 100
    assert not llm.llm_engine.has_unfinished_requests()
