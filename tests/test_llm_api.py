"""End to end through the public `LLM` API on the eager engine (vLLM semantics).

The tiny checkpoint has random weights, so its text is gibberish, but its
next-token distribution is nearly flat: different seeds diverge at once, and
greedy continuations are deterministic and tie-free.
"""

from __future__ import annotations

import math

import pytest
import torch

from aotllm import LLM, SamplingParams

BLOCK = 4
MAX_LEN = 128
GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def _engine(path, **overrides) -> LLM:
    kwargs = dict(enforce_eager=True, dtype="float32", block_size=BLOCK,
                  max_model_len=MAX_LEN, max_num_seqs=8, seed=0)
    return LLM(str(path), **{**kwargs, **overrides})


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return _engine(llama_dir)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def _random_prompts(vocab: int, lengths: list[int], seed: int) -> list[list[int]]:
    # Ids from 5 up: 0..4 are the special tokens.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _gen(llm: LLM, prompts, params) -> list:
    return llm.generate(prompts, params, use_tqdm=False)


def _tokens(out) -> list[int]:
    return out.outputs[0].token_ids


def _assert_idle(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests()
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks - 1, "KV blocks leaked"


# -- prompt forms and the output structure -------------------------------------


def test_str_prompt_output_fields(llm, tok):
    out = _gen(llm, "Hello world", SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert len(out) == 1
    o = out[0]
    assert isinstance(o.request_id, str) and o.finished
    assert o.prompt == "Hello world"
    assert o.prompt_token_ids == tok.encode("Hello world")
    assert len(o.outputs) == 1
    c = o.outputs[0]
    assert c.index == 0
    assert len(c.token_ids) == 7
    assert c.finish_reason == "length" and c.stop_reason is None
    assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # No logprobs asked for: none reported (vLLM leaves both None).
    assert c.logprobs is None and c.cumulative_logprob is None


def test_list_of_str_keeps_input_order(llm, tok):
    prompts = ["The quick brown fox", "Once upon a time", "Hello world", "a"]
    # The first prompt runs longest, so requests finish in reverse input order.
    max_tokens = [12, 9, 5, 2]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    outs = _gen(llm, prompts, params)
    assert [o.prompt for o in outs] == prompts
    assert [len(_tokens(o)) for o in outs] == max_tokens
    assert len({o.request_id for o in outs}) == len(prompts)
    for p, o in zip(prompts, outs):
        assert o.prompt_token_ids == tok.encode(p)
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)


def test_text_keeps_trailing_partial_character(llm, tok):
    # Byte-level BPE: a run that ends on a token holding the first bytes of a
    # character. The final text renders them as U+FFFD, as a full decode does.
    prompt = "Hello world"
    ids = _tokens(_gen(llm, prompt, GREEDY)[0])
    k = next((k for k in range(3, len(ids) + 1) if tok.decode(ids[:k]).endswith("\ufffd")), None)
    assert k is not None, "no greedy prefix ends inside a character"
    params = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
    c = _gen(llm, prompt, params)[0].outputs[0]
    assert c.token_ids == ids[:k]
    assert c.text == tok.decode(ids[:k])


def test_token_prompts_match_text_prompts(llm, tok):
    texts = ["The quick brown fox", "Once upon a time"]
    ids = [tok.encode(t) for t in texts]
    by_text = _gen(llm, texts, GREEDY)
    one = _gen(llm, {"prompt_token_ids": ids[0]}, GREEDY)
    many = _gen(llm, [{"prompt_token_ids": i} for i in ids], GREEDY)
    assert len(one) == 1 and one[0].prompt is None and one[0].prompt_token_ids == ids[0]
    assert [o.prompt_token_ids for o in many] == ids
    assert _tokens(one[0]) == _tokens(by_text[0])
    assert [_tokens(o) for o in many] == [_tokens(o) for o in by_text]
    assert [o.outputs[0].text for o in many] == [o.outputs[0].text for o in by_text]


def test_special_tokens_are_skipped_in_text(llm, tok):
    # This prompt's greedy continuation contains a special token; find one that
    # does so the skip_special_tokens path is exercised for real.
    prompts = [{"prompt_token_ids": p} for p in _random_prompts(len(tok), [6] * 16, seed=3)]
    outs = _gen(llm, prompts + ["The quick brown fox"], GREEDY)
    special = set(tok.all_special_ids)
    hits = [o.outputs[0] for o in outs if special & set(o.outputs[0].token_ids)]
    assert hits, "no greedy continuation contains a special token"
    for c in hits:
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert c.text != tok.decode(c.token_ids, skip_special_tokens=False)


# -- seeds ---------------------------------------------------------------------


def test_seeded_request_is_independent_of_its_batch(llm):
    seeded = SamplingParams(temperature=1.0, seed=123, max_tokens=20)
    prompt = "Once upon a time"
    alone = _tokens(_gen(llm, prompt, seeded)[0])
    assert len(alone) == 20
    others = ["Hello world", "The quick brown fox", "a b c"]
    unseeded = SamplingParams(temperature=1.0, max_tokens=20)
    other_seed = SamplingParams(temperature=0.8, seed=7, max_tokens=13)
    for pos in range(3):
        batch = [others[0], others[1], others[2], prompt]
        params = [unseeded, other_seed, unseeded, unseeded]
        batch.insert(pos, prompt)
        params.insert(pos, seeded)
        outs = _gen(llm, batch, params)
        assert _tokens(outs[pos]) == alone, f"seeded request at position {pos}"
        # The same prompt unseeded beside it is not tied to the seeded stream.
        assert _tokens(outs[-1]) != alone


def test_different_seeds_differ(llm):
    a, b = (
        _tokens(_gen(llm, "Hello world", SamplingParams(temperature=1.0, seed=s, max_tokens=20))[0])
        for s in (1, 2)
    )
    assert a != b


def test_top_k_1_is_greedy(llm):
    prompts = ["Hello world", "Once upon a time"]
    greedy = _gen(llm, prompts, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    topk = _gen(llm, prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=20,
                                             ignore_eos=True))
    assert [_tokens(o) for o in topk] == [_tokens(o) for o in greedy]


def test_n_samples_with_seed(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=42, max_tokens=12)
    first = _gen(llm, ["Hello world", "a b c"], params)
    second = _gen(llm, ["Hello world", "a b c"], params)
    for o1, o2 in zip(first, second):
        assert [c.index for c in o1.outputs] == [0, 1, 2]
        samples = [tuple(c.token_ids) for c in o1.outputs]
        assert len(set(samples)) > 1, "the n samples are all identical"
        assert samples == [tuple(c.token_ids) for c in o2.outputs]
        assert [c.text for c in o1.outputs] == [c.text for c in o2.outputs]


# -- stopping ------------------------------------------------------------------


def _stop_string_in(tok, ids: list[int]) -> tuple[str, int, int, int]:
    """A substring of decode(ids) that starts inside one token and ends inside the next.

    Returns (stop, start char, end char, tokens up to and including the one it ends in).
    """
    full = tok.decode(ids)
    # Character offsets of each token boundary, kept only where the prefix
    # decodes to a prefix of the full text (no half-decoded UTF-8 there).
    bounds = [len(tok.decode(ids[:k])) for k in range(len(ids) + 1)]
    clean = [full.startswith(tok.decode(ids[:k])) for k in range(len(ids) + 1)]
    for i in range(len(ids) - 1):
        if not (clean[i] and clean[i + 1] and clean[i + 2]):
            continue
        a, b, c = bounds[i], bounds[i + 1], bounds[i + 2]
        if b - a < 2 or c - b < 1 or "\ufffd" in full[a:c]:
            continue
        start, end = a + 1, b + 1
        stop = full[start:end]
        if full.find(stop) == start:
            return stop, start, end, i + 2
    raise AssertionError(f"no usable stop string in {full!r}")


def test_stop_string_spanning_tokens(llm, tok):
    prompt = "Hello world"
    ids = _tokens(_gen(llm, prompt, GREEDY)[0])
    full = tok.decode(ids)
    stop, start, end, n_tokens = _stop_string_in(tok, ids)

    c = _gen(llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0].outputs[0]
    assert c.text == full[:start]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    # The request stops at the token that completes the stop string.
    assert c.token_ids == ids[:n_tokens]

    c = _gen(llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                         include_stop_str_in_output=True))[0].outputs[0]
    assert c.text == full[:end] and c.text.endswith(stop)
    assert c.finish_reason == "stop" and c.stop_reason == stop


def test_streamed_text_is_never_retracted(llm, tok):
    # vLLM holds back text that may be the start of a stop string, so each
    # step's cumulative text is a prefix of the final text.
    prompt = "Hello world"
    ids = _tokens(_gen(llm, prompt, GREEDY)[0])
    stop, start, _, _ = _stop_string_in(tok, ids)
    engine = llm.llm_engine
    engine.add_request("stream", prompt, SamplingParams(temperature=0, max_tokens=30, stop=[stop]))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0].text for o in engine.step() if o.request_id == "stream"]
    final = texts[-1]
    assert final == tok.decode(ids)[:start]
    for i, text in enumerate(texts):
        assert final.startswith(text), f"step {i} showed {text!r}, final text is {final!r}"


def test_stop_token_ids(llm, tok):
    prompt = "Once upon a time"
    ids = _tokens(_gen(llm, prompt, GREEDY)[0])
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    stop_id = ids[k]
    c = _gen(llm, prompt, SamplingParams(temperature=0, max_tokens=30,
                                         stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    assert c.token_ids == ids[: k + 1]
    # As in vLLM, a stop token's own text is left out.
    assert c.text == tok.decode(ids[:k])


def test_min_tokens_holds_back_stop_token(llm):
    prompt = "Once upon a time"
    ids = _tokens(_gen(llm, prompt, GREEDY)[0])
    stop_id = ids[2]
    min_tokens = 8
    c = _gen(llm, prompt, SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id],
                                         min_tokens=min_tokens))[0].outputs[0]
    assert len(c.token_ids) > min_tokens
    assert stop_id not in c.token_ids[:min_tokens]
    if c.finish_reason == "stop":
        assert c.token_ids[-1] == stop_id and c.stop_reason == stop_id
    else:
        assert c.finish_reason == "length" and len(c.token_ids) == 30


@pytest.fixture(scope="module")
def eos_prompt(llm, tok) -> tuple[list[int], list[int]]:
    """A prompt whose greedy continuation ends in EOS within 8 tokens, and that continuation."""
    eos = tok.eos_token_id
    prompts = _random_prompts(len(tok), [8] * 64, seed=0)
    outs = _gen(llm, [{"prompt_token_ids": p} for p in prompts],
                SamplingParams(temperature=0, max_tokens=8))
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        if c.finish_reason == "stop" and len(c.token_ids) >= 2:
            assert c.token_ids[-1] == eos and c.stop_reason is None
            return p, c.token_ids
    pytest.skip("no cheap prompt whose greedy continuation reaches EOS")


def test_eos_stops_and_ignore_eos_continues(llm, tok, eos_prompt):
    prompt, cont = eos_prompt
    eos = tok.eos_token_id
    assert eos not in cont[:-1]
    c = _gen(llm, {"prompt_token_ids": prompt},
             SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    assert c.token_ids == cont and c.finish_reason == "stop" and c.stop_reason is None
    assert c.text == tok.decode(cont[:-1])

    c = _gen(llm, {"prompt_token_ids": prompt},
             SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 20
    assert c.token_ids[: len(cont)] == cont  # ran straight through the EOS

    # min_tokens masks EOS until that many tokens exist.
    c = _gen(llm, {"prompt_token_ids": prompt},
             SamplingParams(temperature=0, max_tokens=20, min_tokens=len(cont) + 3))[0].outputs[0]
    assert len(c.token_ids) >= len(cont) + 3
    assert eos not in c.token_ids[: len(cont) + 3]


def test_max_tokens_none_fills_max_model_len(llm):
    prompt = _random_prompts(llm.llm_engine.vocab_size, [100], seed=5)[0]
    o = _gen(llm, {"prompt_token_ids": prompt},
             SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))[0]
    c = o.outputs[0]
    assert c.finish_reason == "length"
    assert len(o.prompt_token_ids) + len(c.token_ids) == MAX_LEN


# -- logprobs ------------------------------------------------------------------


def test_logprobs_greedy(llm):
    c = _gen(llm, "Hello world", SamplingParams(temperature=0, max_tokens=10, logprobs=3,
                                                ignore_eos=True))[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids) == 10
    for token, step in zip(c.token_ids, c.logprobs):
        assert len(step) == 3  # the greedy token is one of the top 3
        assert step[token].rank == 1
        ranked = sorted(step.values(), key=lambda lp: lp.rank)
        assert [lp.rank for lp in ranked] == [1, 2, 3]
        values = [lp.logprob for lp in ranked]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
    total = sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs))
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-5)


def test_logprobs_sampled(llm):
    c = _gen(llm, "Hello world", SamplingParams(temperature=1.0, seed=3, max_tokens=15,
                                                logprobs=3))[0].outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    for token, step in zip(c.token_ids, c.logprobs):
        assert token in step
        top = sorted((lp for t, lp in step.items() if lp.rank <= 3), key=lambda lp: lp.rank)
        assert [lp.rank for lp in top] == [1, 2, 3]
        # A sampled token outside the top 3 is added with its true rank.
        assert len(step) == (3 if step[token].rank <= 3 else 4)
        assert all(lp.logprob <= 0 for lp in step.values())
        if step[token].rank > 3:
            assert step[token].logprob <= top[-1].logprob
    total = sum(step[t].logprob for t, step in zip(c.token_ids, c.logprobs))
    assert math.isfinite(c.cumulative_logprob)
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-5)


# -- continuous batching, preemption, the engine loop ---------------------------


def test_preemption_gives_the_same_tokens(llama_dir, llm):
    n_req, prompt_len, gen_len = 6, 30, 30
    per_req = math.ceil((prompt_len + gen_len) / BLOCK)  # 15 blocks
    # The engine needs room for one max_model_len sequence (32 blocks); 39
    # usable blocks hold two finished requests, not six.
    num_blocks = 40
    assert n_req * per_req > num_blocks - 1 >= MAX_LEN // BLOCK
    small = _engine(llama_dir, num_gpu_blocks_override=num_blocks)
    sched = small.llm_engine.scheduler
    assert sched.block_manager.num_blocks == num_blocks

    preempted: list[str] = []
    schedule = sched.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(out.preempted_ids)
        return out

    sched.schedule = recording_schedule
    vocab = small.llm_engine.vocab_size
    prompts = [{"prompt_token_ids": p}
               for p in _random_prompts(vocab, [prompt_len - 2 + i for i in range(n_req)], 9)]
    params = SamplingParams(temperature=0, max_tokens=gen_len, ignore_eos=True)
    outs = _gen(small, prompts, params)
    assert preempted, "the cache was large enough that nothing was preempted"
    assert all(len(_tokens(o)) == gen_len for o in outs)
    for prompt, o in zip(prompts, outs):
        assert _tokens(o) == _tokens(_gen(llm, prompt, params)[0])
    _assert_idle(small)


def test_engine_step_add_and_abort(llm):
    engine = llm.llm_engine
    prompts = dict(zip("abcd", _random_prompts(engine.vocab_size, [5, 17, 9, 12], seed=11)))
    params = {rid: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
              for rid, n in zip("abcd", (10, 12, 14, 6))}
    try:
        finals = _drive_engine(engine, prompts, params)
    finally:
        engine.abort_request(list(prompts))  # a failure must not leave work queued
    for rid in "acd":
        want = _tokens(_gen(llm, {"prompt_token_ids": prompts[rid]}, params[rid])[0])
        assert finals[rid].outputs[0].token_ids == want
    _assert_idle(llm)


def _drive_engine(engine, prompts, params) -> dict:
    """a, b, c from the start, d after three steps, b aborted after five."""
    for rid in "abc":
        engine.add_request(rid, {"prompt_token_ids": prompts[rid]}, params[rid])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", {"prompt_token_ids": prompts["a"]}, params["a"])
    finals, seen_after_abort = {}, []
    for i in range(5):
        if i == 3:
            engine.add_request("d", {"prompt_token_ids": prompts["d"]}, params["d"])
        finals.update((o.request_id, o) for o in engine.step() if o.finished)
    assert "b" not in finals
    engine.abort_request("b")
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen_after_abort.append(out.request_id)
            if out.finished:
                assert out.request_id not in finals
                finals[out.request_id] = out
    assert "b" not in seen_after_abort and set(finals) == {"a", "c", "d"}
    for rid in "acd":
        c = finals[rid].outputs[0]
        assert len(c.token_ids) == params[rid].max_tokens and c.finish_reason == "length"
    assert engine.get_num_unfinished_requests() == 0
    return finals


# -- chat ----------------------------------------------------------------------


def _template_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding here; 4.x returned the list.
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_applies_template(llm, tok):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"}]
    outs = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                    use_tqdm=False)
    assert len(outs) == 1
    o = outs[0]
    assert "<|im_start|>user\nHi there<|im_end|>" in o.prompt
    assert o.prompt.endswith("<|im_start|>assistant\n")
    assert o.prompt_token_ids == _template_ids(tok, messages)
    assert o.prompt_token_ids.count(tok.bos_token_id) == 1
    assert len(_tokens(o)) == 6


def test_chat_batch_of_conversations(llm, tok):
    convs = [
        [{"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "What is two plus two?"},
         {"role": "assistant", "content": "Four."},
         {"role": "user", "content": "And three?"}],
    ]
    outs = llm.chat(convs, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                    use_tqdm=False)
    assert len(outs) == 2
    for conv, o in zip(convs, outs):
        assert o.prompt_token_ids == _template_ids(tok, conv)
        assert conv[-1]["content"] in o.prompt
    # The same conversation through chat() alone gives the same tokens.
    alone = llm.chat(convs[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)[0]
    assert _tokens(alone) == _tokens(outs[1])


# -- the model's generation config (vLLM's --generation-config) ----------------


@pytest.fixture(scope="module")
def recommending_dir(llama_dir, tmp_path_factory):
    """The tiny checkpoint, its generation_config.json recommending sampling values."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("gen-config") / "model"
    shutil.copytree(llama_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen.update(temperature=0.0, max_new_tokens=5, repetition_penalty=1.3)
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def test_generation_config_sets_default_sampling(recommending_dir):
    llm = _engine(recommending_dir)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.repetition_penalty) == (
        0.0, 5, 1.3)
    prompt = "the quick brown fox"
    explicit = SamplingParams(temperature=0.0, max_tokens=5, repetition_penalty=1.3)
    assert _tokens(_gen(llm, prompt, None)[0]) == _tokens(_gen(llm, prompt, explicit)[0])
    # chat takes the same defaults.
    conv = [{"role": "user", "content": "hello"}]
    assert _tokens(llm.chat(conv, use_tqdm=False)[0]) == _tokens(
        llm.chat(conv, explicit, use_tqdm=False)[0])
    assert len(_tokens(llm.chat(conv, use_tqdm=False)[0])) <= 5


def test_generation_config_vllm_ignores_it(recommending_dir, llama_dir, tmp_path):
    defaults = _engine(recommending_dir, generation_config="vllm").get_default_sampling_params()
    plain = SamplingParams()
    assert (defaults.temperature, defaults.max_tokens, defaults.repetition_penalty) == (
        plain.temperature, plain.max_tokens, plain.repetition_penalty)
    # A directory: its generation_config.json instead of the model's.
    from_dir = _engine(llama_dir, generation_config=str(recommending_dir))
    assert from_dir.get_default_sampling_params().max_tokens == 5
    with pytest.raises(ValueError, match="generation_config.json does not exist"):
        _engine(llama_dir, generation_config=str(tmp_path))
