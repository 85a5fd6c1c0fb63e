"""The OpenAI-compatible server, live on loopback, driven by the official client.

Two servers run in subprocesses over the tiny eager Llama: the main one
(`python -m aotllm.entrypoints.openai.api_server`, vLLM's spelling; API key, small
body limit) and a small one (`aotllm serve`; 2 running, 2 waiting) for the
queue limit and SIGTERM. References are the in-process `LLM` on the same
checkpoint with the same settings, and the tokenizer's own counts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from aotllm import LLM, SamplingParams

REPO = Path(__file__).resolve().parents[1]
KEY = "test-key-123"
MAX_LEN = 512
ENGINE = dict(enforce_eager=True, dtype="float32", block_size=4, max_model_len=MAX_LEN,
              max_num_seqs=16, seed=0)
BODY_LIMIT = 64 * 1024
EAGER_FLAGS = ("--enforce-eager", "--dtype", "float32", "--block-size", "4",
               "--max-model-len", str(MAX_LEN))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, log: Path, *flags: str, cli: bool = False,
                 engine_flags: tuple[str, ...] = EAGER_FLAGS) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO.parent), os.environ.get("PYTHONPATH", "")])}
        env.pop("AOTLLM_API_KEY", None)
        self.log = log
        # vLLM's module spelling, or `aotllm serve MODEL`.
        entry = (["-m", "aotllm.cli", "serve", str(model)] if cli else
                 ["-m", "aotllm.entrypoints.openai.api_server", "--model", str(model)])
        self.proc = subprocess.Popen(
            [sys.executable, *entry, "--port", str(self.port), "--seed", "0",
             "--uvicorn-log-level", "warning", *engine_flags, *flags],
            cwd=REPO.parent, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(llama_dir, tmp_path_factory):
    srv = Server(llama_dir, tmp_path_factory.mktemp("server") / "main.log",
                 "--max-num-seqs", "16", "--api-key", KEY, "--served-model-name", "tiny",
                 "alias", "--max-request-body-bytes", str(BODY_LIMIT),
                 "--enable-prompt-tokens-details")
    yield srv
    assert srv.stop() == 0, srv.tail()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(llama_dir, one_thread) -> LLM:
    return LLM(str(llama_dir), **ENGINE)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


def _ref(llm: LLM, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params), use_tqdm=False)[0]


def _kv(server) -> dict:
    return httpx.get(f"{server.url}/debug/kv").json()


def _metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics")


GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


# -- completions and chat against LLM ------------------------------------------


def test_completion_equals_llm_generate(client, llm, tok):
    prompt = "Hello world"
    r = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    ref = _ref(llm, prompt, temperature=0, max_tokens=12, ignore_eos=True).outputs[0]
    (choice,) = r.choices
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert r.model == "tiny" and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.completion_tokens == 12 == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_token_prompt_and_batch_of_prompts(client, llm, tok):
    prompts = ["Once upon a time", "The quick brown fox"]
    r = client.completions.create(model="alias", prompt=prompts, n=1, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1]
    for p, c in zip(prompts, r.choices):
        assert c.text == _ref(llm, p, temperature=0, max_tokens=12, ignore_eos=True).outputs[0].text
    ids = tok.encode(prompts[0])
    r2 = client.completions.create(model="tiny", prompt=ids, **GREEDY)
    assert r2.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)


def test_chat_equals_llm_chat(client, llm, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    ref = llm.chat(messages, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                   use_tqdm=False)[0]
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12


def test_streaming_equals_non_streaming(client):
    full = client.completions.create(model="tiny", prompt="Hello world", **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt="Hello world", stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])

    messages = [{"role": "user", "content": "Tell me a story"}]
    full = client.chat.completions.create(model="tiny", messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, stream=True,
                                                 **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"

    # vLLM's continuous_usage_stats: the running count on every chunk.
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}, **GREEDY))
    counts = [c.usage.completion_tokens for c in chunks[1:]]
    assert counts == sorted(counts) and counts[-1] == 12
    assert all(c.usage.prompt_tokens == full.usage.prompt_tokens for c in chunks[1:])


def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)


def test_n2_and_seeds_reproducible(client, llm):
    kw = dict(model="tiny", prompt="Hello world", n=2, temperature=1.0, max_tokens=10)
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert sorted(ch.index for ch in a.choices) == [0, 1]
    assert texts(a) == texts(b) and texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]
    ref = _ref(llm, "Hello world", n=2, temperature=1.0, max_tokens=10, seed=7)
    assert texts(a) == [o.text for o in ref.outputs]
    assert a.usage.completion_tokens == sum(len(o.token_ids) for o in ref.outputs)


def test_stop_strings(client, llm):
    full = _ref(llm, "Hello world", temperature=0, max_tokens=30, ignore_eos=True).outputs[0].text
    stop = full[10:13]
    assert stop and full.find(stop) > 0
    r = client.completions.create(model="tiny", prompt="Hello world", temperature=0,
                                  max_tokens=30, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tiny", prompt="Hello world", temperature=0,
                                         max_tokens=30, stop=stop, stream=True,
                                         extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


def test_logprobs(client, llm):
    r = client.completions.create(model="tiny", prompt="Hello world", logprobs=3, **GREEDY)
    ref = _ref(llm, "Hello world", temperature=0, max_tokens=12, ignore_eos=True,
               logprobs=3).outputs[0]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 12
    want = [step[t].logprob for t, step in zip(ref.token_ids, ref.logprobs)]
    assert lp.token_logprobs == pytest.approx(want, abs=1e-5)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(v, abs=1e-5)
               for top, v in zip(lp.top_logprobs, lp.token_logprobs))  # greedy: the top one
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model="tiny", messages=messages, logprobs=True,
                                       top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 12
    for entry in content:
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_echo(client, llm):
    r = client.completions.create(model="tiny", prompt="Once upon a time", echo=True, **GREEDY)
    gen = _ref(llm, "Once upon a time", temperature=0, max_tokens=12, ignore_eos=True)
    assert r.choices[0].text == "Once upon a time" + gen.outputs[0].text
    chunks = client.completions.create(model="tiny", prompt="Once upon a time", echo=True,
                                       stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


# -- load, disconnects ------------------------------------------------------------


def test_burst_of_streaming_clients(server, llm, tok):
    # The load check: 64 streams against 16 running slots, so most
    # wait in the queue first; mixed prompt and output lengths.
    n = 64
    prompts = [" ".join(["word"] * (1 + (3 * i) % 91)) for i in range(n)]
    max_tokens = [5 + (7 * i) % 60 for i in range(n)]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0,
                                 timeout=120)

    async def one(i: int) -> tuple[str, int, str | None]:
        stream = await aclient.completions.create(
            model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
            stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, used, reason = "", -1, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].text
                reason = c.choices[0].finish_reason or reason
            if c.usage:
                used = c.usage.completion_tokens
        return text, used, reason

    async def burst():
        try:
            return await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await aclient.close()

    results = asyncio.run(burst())
    refs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                  for m in max_tokens], use_tqdm=False)
    for (text, used, reason), m, ref in zip(results, max_tokens, refs):
        assert used == m and reason == "length"
        assert text == ref.outputs[0].text
    # Every request finished before its last chunk went out: nothing is held.
    kv = _kv(server)
    assert kv["num_used_blocks"] == 0 and kv["num_free_blocks"] == kv["num_blocks"]
    assert kv["num_unfinished_requests"] == 0 and kv["num_running"] == 0


def test_client_disconnect_aborts_and_frees_blocks(server):
    aborted_before = _metric(server, "vllm:request_success_total", finished_reason="abort")
    headers = {"Authorization": f"Bearer {KEY}"}
    results: dict[int, int] = {}

    def steady(i: int) -> None:
        body = {"model": "tiny", "prompt": f"steady {i}", "max_tokens": 150, "temperature": 0,
                "ignore_eos": True}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)
        results[i] = r.json()["usage"]["completion_tokens"]

    others = [threading.Thread(target=steady, args=(i,)) for i in range(3)]
    for t in others:
        t.start()
    body = {"model": "tiny", "prompt": "long", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers,
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events, then hang up
        assert sum(line.startswith("data: {") for line in got) >= 3
        assert _kv(server)["num_used_blocks"] > 0
    deadline = time.time() + 30
    while _metric(server, "vllm:request_success_total", finished_reason="abort") == aborted_before:
        assert time.time() < deadline, "the dropped stream was never aborted"
        time.sleep(0.05)
    for t in others:
        t.join(120)
    assert results == {0: 150, 1: 150, 2: 150}  # the others ran to the end
    kv = _kv(server)
    assert kv["num_used_blocks"] == 0 and kv["num_unfinished_requests"] == 0


def test_non_streaming_client_timeout_aborts(server):
    aborted_before = _metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": "tiny", "prompt": "long", "max_tokens": 480, "temperature": 0,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    deadline = time.time() + 30
    while _kv(server)["num_unfinished_requests"]:
        assert time.time() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    assert _metric(server, "vllm:request_success_total",
                   finished_reason="abort") == aborted_before + 1
    assert _kv(server)["num_used_blocks"] == 0


def test_metrics_count_a_request(server, client, tok):
    def snap():
        return (_metric(server, "vllm:prompt_tokens_total"),
                _metric(server, "vllm:generation_tokens_total"),
                _metric(server, "vllm:request_success_total", finished_reason="length"),
                _metric(server, "vllm:time_to_first_token_seconds_count"))

    before = snap()
    client.completions.create(model="tiny", prompt="count these tokens", max_tokens=7,
                              temperature=0, extra_body={"ignore_eos": True})
    after = snap()
    assert [a - b for a, b in zip(after, before)] == [
        len(tok.encode("count these tokens")), 7, 1, 1]
    assert _metric(server, "vllm:num_requests_running") == 0
    assert _metric(server, "vllm:kv_cache_usage_perc") == 0


def test_repeated_prefix_is_prefilled_once(server, client, llm, tok):
    # Words no other test sends, so the first request finds nothing cached.
    prefix = " ".join(f"quokka{i} zebra{i}" for i in range(12))
    prompts = [prefix + " first", prefix + " second"]
    ids = [tok.encode(p) for p in prompts]
    common = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    block = 4  # EAGER_FLAGS' --block-size
    expected_hit = min(common, len(ids[1]) - 1) // block * block
    assert expected_hit >= 40
    before = (_metric(server, "vllm:prefix_cache_queries_total"),
              _metric(server, "vllm:prefix_cache_hits_total"), _kv(server)["prefix_cache_hits"])
    cached = []
    for p in prompts:
        r = client.completions.create(model="tiny", prompt=p, **GREEDY)
        # Greedy output with a cache hit equals the in-process engine's.
        assert r.choices[0].text == _ref(llm, p, temperature=0, max_tokens=12,
                                         ignore_eos=True).outputs[0].text
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
    # --enable-prompt-tokens-details: the usage says what the cache served.
    assert cached == [0, expected_hit]
    after = (_metric(server, "vllm:prefix_cache_queries_total"),
             _metric(server, "vllm:prefix_cache_hits_total"), _kv(server)["prefix_cache_hits"])
    assert after[0] - before[0] == len(ids[0]) + len(ids[1])
    assert after[1] - before[1] == expected_hit
    assert after[2] - before[2] == expected_hit
    kv = _kv(server)
    # Nothing held; the prefix's blocks are free but still cached (evictable).
    assert kv["num_used_blocks"] == 0 and kv["num_cached_free_blocks"] >= expected_hit // block
    assert _metric(server, "vllm:kv_cache_usage_perc") == 0
    # The same in a stream's final usage chunk: a chat sent twice.
    usages = [list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prefix + " again"}], stream=True,
        stream_options={"include_usage": True}, **GREEDY))[-1].usage for _ in range(2)]
    full_blocks = (usages[0].prompt_tokens - 1) // block * block
    first, second = (u.prompt_tokens_details.cached_tokens for u in usages)
    # The first finds at most the chat template's opening blocks (earlier chats).
    assert first < 12 and second == full_blocks


# -- the other routes ----------------------------------------------------------------


def test_models_version_tokenize(server, client, tok):
    assert [m.id for m in client.models.list()] == ["tiny", "alias"]
    assert httpx.get(f"{server.url}/version").json()["version"]
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert r["tokens"] == tok.encode("Hello world") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_LEN
    msgs = [{"role": "user", "content": "Hi"}]
    r = httpx.post(f"{server.url}/tokenize", json={"messages": msgs}, headers=h).json()
    assert r["tokens"] == tok.apply_chat_template(msgs, add_generation_prompt=True,
                                                  tokenize=True, return_dict=False)
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": tok.encode("Hello world")},
                   headers=h).json()
    assert r["prompt"] == tok.decode(tok.encode("Hello world"))


# -- bad input -----------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "Hi"}]

BAD = [
    # (path, body (dict, or raw bytes), headers, status, param)
    (C, b'{"prompt": "hi", ', AUTH, 400, None),
    (C, b"", AUTH, 400, None),
    (C, b"[1, 2]", AUTH, 400, None),
    (C, {"prompt": "hi", "max_tokens": "5"}, AUTH, 400, "max_tokens"),
    (C, {"prompt": 5}, AUTH, 400, "prompt"),
    (C, {"prompt": "hi", "n": True}, AUTH, 400, "n"),
    (C, {"prompt": "hi", "temperature": "hot"}, AUTH, 400, "temperature"),
    (C, {"max_tokens": 3}, AUTH, 400, "prompt"),
    (CHAT, {"messages": "hi"}, AUTH, 400, "messages"),
    (C, {"prompt": "hi", "model": "gpt-4"}, AUTH, 404, "model"),
    (CHAT, {"messages": MSG, "model": "gpt-4"}, AUTH, 404, "model"),
    (C, {"prompt": "hi", "temperature": -1}, AUTH, 400, None),
    (C, {"prompt": "hi", "top_p": 2}, AUTH, 400, None),
    (C, {"prompt": "hi", "n": 0}, AUTH, 400, None),
    (C, {"prompt": "hi", "presence_penalty": 5}, AUTH, 400, None),
    (C, {"prompt": "hi", "top_k": -5}, AUTH, 400, None),
    (C, {"prompt": "hi", "max_tokens": 0}, AUTH, 400, None),
    (C, {"prompt": "hi", "logprobs": 50}, AUTH, 400, "logprobs"),
    (C, {"prompt": "hi", "stream": True, "temperature": -1}, AUTH, 400, None),
    (C, {"prompt": [7] * (MAX_LEN + 1)}, AUTH, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": MAX_LEN}, AUTH, 400, "max_tokens"),
    (C, {"prompt": [600, 1]}, AUTH, 400, None),
    (C, {"prompt": []}, AUTH, 400, "prompt"),
    (C, {"prompt": "x" * (BODY_LIMIT + 10)}, AUTH, 413, None),
    (C, {"prompt": "hi", "suffix": "end"}, AUTH, 400, "suffix"),
    (C, {"prompt": "hi", "echo": True, "logprobs": 1}, AUTH, 400, "echo"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": True}}, AUTH, 400,
     "stream_options"),
    (CHAT, {"messages": MSG, "tools": [{"type": "function"}]}, AUTH, 400, "tools"),
    (CHAT, {"messages": MSG, "top_logprobs": 2}, AUTH, 400, "top_logprobs"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, AUTH, 400,
     "messages"),
    (CHAT, {"messages": MSG}, {}, 401, None),
    (C, {"prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, None),
    (C, {"prompt": "hi"}, {"Authorization": KEY}, 401, None),
    ("/v1/nope", {"prompt": "hi"}, AUTH, 404, None),
    ("/tokenize", {"prompt": "hi", "messages": MSG}, AUTH, 400, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, AUTH, 400, "tokens"),
]


@pytest.mark.parametrize("path,body,headers,status,param", BAD,
                         ids=[f"{i}-{b[0]}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(server, path, body, headers, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content,
                   headers={"Content-Type": "application/json", **headers}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in r.text
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_official_client_error_classes(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=-1)
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.get(f"{server.url}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.json()["error"]["message"]
    # Still serving.
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


# -- the small server: queue limit and SIGTERM -------------------------------------------


@pytest.fixture(scope="module")
def small_server(llama_dir, tmp_path_factory):
    srv = Server(llama_dir, tmp_path_factory.mktemp("server") / "small.log",
                 "--max-num-seqs", "2", "--max-waiting-requests", "2", cli=True)
    yield srv
    srv.stop()


def _stream_tokens(url: str, max_tokens: int, out: dict, key: int) -> None:
    body = {"prompt": f"client {key}", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                r.read()
                out[key] = (r.status_code, r.json())
                return
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        usage = json.loads(events[-2])["usage"] if len(events) > 1 else None
        out[key] = (200, events[-1], usage and usage["completion_tokens"])
    except httpx.HTTPError as e:
        out[key] = ("error", repr(e))


def test_full_queue_answers_503(small_server):
    out: dict = {}
    threads = [threading.Thread(target=_stream_tokens, args=(small_server.url, 300, out, i))
               for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    refused = [v for v in out.values() if v[0] == 503]
    served = [v for v in out.values() if v[0] == 200]
    assert len(refused) + len(served) == 10, out
    # At most 2 running + 2 waiting at any moment, and none finishes during the burst.
    assert len(refused) >= 1 and len(served) >= 2, out
    for _, body in refused:
        assert body["error"]["type"] == "ServiceUnavailableError"
        assert "--max-waiting-requests" in body["error"]["message"]
    assert all(v[1] == "[DONE]" and v[2] == 300 for v in served)
    assert httpx.get(f"{small_server.url}/health").status_code == 200


def test_sigterm_during_load_exits_zero(small_server):
    out: dict = {}
    threads = [threading.Thread(target=_stream_tokens, args=(small_server.url, 200, out, i))
               for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while _kv(small_server)["num_running"] == 0:
        assert time.time() < deadline
        time.sleep(0.01)
    small_server.proc.send_signal(signal.SIGTERM)
    assert small_server.proc.wait(60) == 0, small_server.tail()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "a client was left hanging"
    # Whatever was admitted finished; nothing was left half-sent.
    for v in out.values():
        assert v[0] in (200, 503) or v[0] == "error", v
        if v[0] == 200:
            assert v[1] == "[DONE]" and v[2] == 200
    assert any(v[0] == 200 for v in out.values())


# -- a compiled artifact -------------------------------------------------------------


@pytest.mark.slow
def test_compiled_artifact_serves_like_llm(artifacts, tmp_path, one_thread):
    artifact = artifacts.get("llama-gqa", "float32")
    ref_llm = LLM(str(artifact), seed=0)
    prompts = [" ".join(["tok"] * k) for k in (1, 5, 20, 40, 3, 12)]
    max_tokens = [30, 8, 17, 25, 40, 11]
    refs = ref_llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=m,
                                                     ignore_eos=True) for m in max_tokens],
                            use_tqdm=False)
    srv = Server(artifact, tmp_path / "compiled.log", "--served-model-name", "tiny",
                 engine_flags=())
    try:
        aclient = openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)

        async def one(p: str, m: int) -> str:
            stream = await aclient.completions.create(
                model="tiny", prompt=p, max_tokens=m, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream if c.choices])

        async def burst():
            try:
                return await asyncio.gather(*(one(p, m) for p, m in zip(prompts, max_tokens)))
            finally:
                await aclient.close()

        texts = asyncio.run(burst())
        assert texts == [r.outputs[0].text for r in refs]
        kv = _kv(srv)
        assert kv["num_used_blocks"] == 0 and kv["num_unfinished_requests"] == 0
    finally:
        assert srv.stop() == 0, srv.tail()


def test_server_flags(monkeypatch, capsys):
    import argparse

    from aotllm.cli import main
    from aotllm.runtime.entrypoints.openai.cli_args import add_server_args, engine_kwargs

    monkeypatch.setenv("AOTLLM_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_server_args(parser, model_positional=True)
    args = parser.parse_args(["m", "--max-num-seqs", "4", "--gpu-memory-utilization", "0.5"])
    assert args.api_key == "from-env" and args.host == "127.0.0.1" and args.port == 8000
    assert engine_kwargs(args) == {"dtype": "auto", "device": "auto", "enforce_eager": False,
                                   "max_num_seqs": 4, "gpu_memory_utilization": 0.5}
    with pytest.raises(SystemExit):
        parser.parse_args(["m", "--gpu-memory-utilization", "1.5"])
    for flag, value in (("--enable-prefix-caching", True),
                        ("--no-enable-prefix-caching", False)):
        assert engine_kwargs(parser.parse_args(["m", flag]))["enable_prefix_caching"] is value
    assert main(["serve", "--help"]) == 0
    assert "--max-waiting-requests" in capsys.readouterr().out


def test_bench_serve_report_is_consistent(server, llama_dir, tmp_path):
    from tests.conftest import load_script

    bench = load_script("bench_serve")
    common = ["--base-url", server.url, "--api-key", KEY, "--random-output-len", "8"]
    rep = bench.main([*common, "--num-prompts", "6", "--max-concurrency", "3",
                      "--random-input-len", "20", "--vocab-size", "300",
                      "--result-json", str(tmp_path / "r.json")])
    assert (rep["completed"], rep["failed"], rep["short_outputs"]) == (6, 0, 0)
    assert rep["model"] == "tiny"  # the first of /v1/models
    # Token-id prompts of exactly 20 tokens; ignore_eos gives exactly 8 out.
    assert (rep["total_input_tokens"], rep["total_output_tokens"]) == (120, 48)
    assert rep["output_token_source"] == "usage"
    d = rep["duration_s"]
    assert rep["request_throughput"] == pytest.approx(6 / d)
    assert rep["output_throughput"] == pytest.approx(48 / d)
    assert rep["total_token_throughput"] == pytest.approx(168 / d)
    assert 0 < rep["p50_ttft_ms"] <= rep["p99_ttft_ms"] <= rep["p99_e2el_ms"] <= d * 1000
    assert 0 < rep["p50_tpot_ms"] <= rep["p99_tpot_ms"]
    assert 0 < rep["mean_itl_ms"] and rep["p99_itl_ms"] <= rep["p99_e2el_ms"]
    assert json.loads((tmp_path / "r.json").read_text()) == rep

    # Text prompts through the tokenizer, the chat route, Poisson arrivals.
    rep = bench.main([*common, "--num-prompts", "4", "--request-rate", "50",
                      "--tokenizer", str(llama_dir), "--endpoint", "/v1/chat/completions"])
    assert (rep["completed"], rep["total_output_tokens"], rep["short_outputs"]) == (4, 32, 0)
    assert rep["total_input_tokens"] > 4 * 20  # the chat template adds tokens

    # A server that sends no usage (llama.cpp's): outputs counted per chunk.
    rep = bench.main([*common, "--num-prompts", "2", "--vocab-size", "300",
                      "--extra-body", '{"stream_options": {"include_usage": false}}'])
    assert rep["completed"] == 2 and rep["output_token_source"] == "chunks"
    assert 0 < rep["total_output_tokens"] <= 16

    # A failing request is reported, not fatal.
    rep = bench.main([*common, "--num-prompts", "2", "--vocab-size", "300",
                      "--model", "no-such-model"])
    assert rep["completed"] == 0 and rep["failed"] == 2 and "HTTP 404" in rep["errors"][0]


def test_generation_config_defaults_fill_unset_fields():
    """The model's recommended sampling values (generation_config.json) are the
    defaults of request fields left unset; explicit fields win; max_new_tokens
    caps an unset max_tokens by the room left in the context."""
    from types import SimpleNamespace

    from aotllm.runtime.entrypoints.openai.protocol import CompletionRequest
    from aotllm.runtime.entrypoints.openai.serving_engine import OpenAIServing

    core = SimpleNamespace(tokenizer=None, max_model_len=100,
                           default_sampling={"temperature": 0.2, "top_p": 0.9, "max_tokens": 50})
    serving = OpenAIServing(SimpleNamespace(engine=core), ["tiny"])
    unset = CompletionRequest(prompt="x", max_tokens=None)
    p = serving.sampling_params(unset, unset.max_tokens, None, prompt_len=10)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.2, 0.9, 50)
    assert serving.sampling_params(unset, None, None, prompt_len=70).max_tokens == 30
    explicit = CompletionRequest(prompt="x", temperature=1.0, max_tokens=7)
    p = serving.sampling_params(explicit, explicit.max_tokens, None, prompt_len=10)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 0.9, 7)
