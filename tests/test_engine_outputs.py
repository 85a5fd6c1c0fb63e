"""The engine split: output kinds (cumulative, delta, final only), metrics and
aborts through LLMEngine on the eager tiny model."""

from __future__ import annotations

import pytest

from aotllm import LLM, SamplingParams
from aotllm.runtime.sampling_params import RequestOutputKind


@pytest.fixture(scope="module")
def llm(llama_dir, one_thread) -> LLM:
    return LLM(str(llama_dir), enforce_eager=True, dtype="float32", block_size=4,
               max_model_len=128, max_num_seqs=8, seed=0)


def _run(engine, rid, prompt, params) -> list:
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0, "max_tokens": 12, "ignore_eos": True, **kw})


def test_deltas_add_up_to_the_cumulative_output(llm):
    engine = llm.llm_engine
    final = _run(engine, "c", "Hello world", _greedy(logprobs=2))[-1]
    # A prefix-cache hit prefills fewer tokens, which moves logprobs by
    # rounding; this test compares output kinds, so both runs start cold.
    assert llm.reset_prefix_cache()
    deltas = _run(engine, "d", "Hello world", _greedy(logprobs=2,
                                                     output_kind=RequestOutputKind.DELTA))
    assert len(deltas) == 12  # one output per token
    assert all(len(d.outputs[0].token_ids) == 1 for d in deltas)
    c = final.outputs[0]
    assert "".join(d.outputs[0].text for d in deltas) == c.text
    assert [t for d in deltas for t in d.outputs[0].token_ids] == c.token_ids
    assert [lp for d in deltas for lp in d.outputs[0].logprobs] == c.logprobs
    assert [d.finished for d in deltas] == [False] * 11 + [True]
    assert deltas[-1].outputs[0].finish_reason == "length"


def test_delta_with_n_samples_keeps_indices(llm):
    params = SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=6,
                            output_kind=RequestOutputKind.DELTA)
    deltas = _run(llm.llm_engine, "n2", "Hello world", params)
    cumulative = llm.generate("Hello world", params.clone(output_kind=RequestOutputKind.CUMULATIVE),
                              use_tqdm=False)[0]
    for i in (0, 1):
        got = [t for d in deltas for o in d.outputs if o.index == i for t in o.token_ids]
        assert got == cumulative.outputs[i].token_ids


def test_final_only_gives_one_output(llm):
    outs = _run(llm.llm_engine, "f", "Hello world",
                _greedy(output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 12


def test_metrics_and_cached_tokens(llm):
    out = llm.generate("Once upon a time", _greedy(), use_tqdm=False)[0]
    m = out.metrics
    assert out.num_cached_tokens == 0
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time
    assert m.first_token_time <= m.last_token_time <= m.finished_time
    assert m.time_in_queue == pytest.approx(m.first_scheduled_time - m.arrival_time)


def test_abort_frees_blocks_and_reports_abort(llm):
    engine = llm.llm_engine
    bm = engine.scheduler.block_manager
    engine.add_request("a", "Hello world", _greedy(max_tokens=50))
    engine.step()
    engine.step()
    assert bm.num_used_blocks > 0
    (out,) = engine.abort_request("a")
    assert bm.num_used_blocks == 0 and not engine.has_unfinished_requests()
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert len(out.outputs[0].token_ids) == 2
    assert engine.abort_request("a") == []  # already gone: ignored


def test_stop_string_frees_blocks_in_the_same_step(llm):
    engine = llm.llm_engine
    text = llm.generate("Hello world", _greedy(), use_tqdm=False)[0].outputs[0].text
    stop = text[len(text) // 2:][:3].strip() or text[-2:]
    outs = _run(engine, "s", "Hello world", _greedy(stop=[stop]))
    assert outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].stop_reason == stop
    assert engine.scheduler.block_manager.num_used_blocks == 0
