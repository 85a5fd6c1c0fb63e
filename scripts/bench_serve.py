"""Serving benchmark against a running OpenAI-compatible server (aotllm's,
vLLM's or llama.cpp's), after vLLM's `vllm bench serve`.

Sends `--num-prompts` streaming requests, at `--request-rate` (Poisson
arrivals; inf: all at once) and at most `--max-concurrency` in flight, and
reports request throughput, output tokens/s, and TTFT, TPOT, ITL and
end-to-end latency (mean, p50, p99) in milliseconds.

    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --max-concurrency 8 \\
        --num-prompts 64 --random-input-len 128 --random-output-len 128

Prompts: `--dataset-name random` (default) draws token ids; without
`--tokenizer` they are sent as token-id lists (exact lengths; aotllm and vLLM
accept them), with `--tokenizer DIR` as the decoded text (what llama.cpp's
server needs). `--dataset-name file --dataset-path F` takes one prompt per
line (or JSON lines with a "prompt" field). `--ignore-eos` (default on) sends
vLLM's `ignore_eos` and `min_tokens = max_tokens` (llama-cpp-python honours
the latter), so every output has the asked length.

Output tokens come from the stream's `usage` (`stream_options.include_usage`)
where the server sends it, else from `--tokenizer` over the generated text,
else one per streamed chunk; the report says which (`output_token_source`).
Needs only httpx (and transformers for `--tokenizer`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int | None  # known when sent as token ids
    output_len: int


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    prompt_tokens: int | None = None
    output_tokens: int | None = None  # from usage or the tokenizer
    num_chunks: int = 0  # streamed chunks that carried text
    text: str = ""
    ttft: float | None = None  # None: no text ever arrived
    itl: list[float] = field(default_factory=list)  # gaps between text chunks
    latency: float = 0.0


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions",
                   choices=("/v1/completions", "/v1/chat/completions"))
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=_positive(int), default=100)
    p.add_argument("--request-rate", type=_positive(float), default=float("inf"),
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=_positive(int), default=None,
                   help="most requests in flight at once (default: no limit)")
    p.add_argument("--dataset-name", choices=("random", "file"), default="random")
    p.add_argument("--dataset-path", default=None, help="prompts file for --dataset-name file")
    p.add_argument("--random-input-len", type=_positive(int), default=128)
    p.add_argument("--random-output-len", type=_positive(int), default=128,
                   help="max_tokens of every request (for file prompts too)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from len*(1-r) .. len*(1+r)")
    p.add_argument("--vocab-size", type=_positive(int), default=None,
                   help="random token ids below this (default: the tokenizer's, else 1000)")
    p.add_argument("--tokenizer", default=None,
                   help="Hugging Face tokenizer dir: random prompts as text, output counts")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--extra-body", type=json.loads, default={},
                   help="JSON merged into every request body")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--result-json", default=None, help="write the report here too")
    return p


def _lengths(rng: random.Random, n: int, base: int, ratio: float) -> list[int]:
    if not 0.0 <= ratio < 1.0:
        raise SystemExit(f"--random-range-ratio must be in [0, 1), got {ratio}")
    lo, hi = max(1, int(base * (1 - ratio))), max(1, int(base * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def build_requests(args, tokenizer) -> list[RequestSpec]:
    rng = random.Random(args.seed)
    out_lens = _lengths(rng, args.num_prompts, args.random_output_len, args.random_range_ratio)
    if args.dataset_name == "file":
        if not args.dataset_path:
            raise SystemExit("--dataset-name file needs --dataset-path")
        lines = [ln for ln in Path(args.dataset_path).read_text().splitlines() if ln.strip()]
        if not lines:
            raise SystemExit(f"{args.dataset_path} holds no prompts")
        prompts = [json.loads(ln)["prompt"] if ln.lstrip().startswith("{") else ln
                   for ln in lines]
        return [RequestSpec(prompts[i % len(prompts)], None, out_lens[i])
                for i in range(args.num_prompts)]
    vocab = args.vocab_size or (len(tokenizer) if tokenizer is not None else 1000)
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    in_lens = _lengths(rng, args.num_prompts, args.random_input_len, args.random_range_ratio)
    specs = []
    for n, out_len in zip(in_lens, out_lens):
        ids = []
        while len(ids) < n:
            t = rng.randrange(vocab)
            if t not in special:  # an EOS inside a prompt would confuse some servers
                ids.append(t)
        if tokenizer is None:
            specs.append(RequestSpec(ids, n, out_len))
        else:
            # Random ids decode to text that re-tokenizes to more tokens (byte-level
            # BPE merges differ at the seams: up to 1.6x here), which overflowed
            # the context. Re-encode and cut until the text is exactly n tokens.
            text = tokenizer.decode(ids)
            for _ in range(8):
                again = tokenizer.encode(text, add_special_tokens=False)
                if len(again) <= n:
                    break
                text = tokenizer.decode(again[:n])
            specs.append(RequestSpec(text, None, out_len))
    return specs


def _body(args, spec: RequestSpec) -> dict:
    body: dict = {"model": args.model, "max_tokens": spec.output_len, "temperature": 0.0,
                  "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint.endswith("chat/completions"):
        if not isinstance(spec.prompt, str):
            raise SystemExit("the chat endpoint needs text prompts: pass --tokenizer")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if args.ignore_eos:
        body.update(ignore_eos=True, min_tokens=spec.output_len)
    body.update(args.extra_body)
    return body


async def send(client, args, spec: RequestSpec) -> RequestResult:
    res = RequestResult(prompt_tokens=spec.prompt_len)
    chat = args.endpoint.endswith("chat/completions")
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", args.endpoint, json=_body(args, spec)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", res.prompt_tokens)
                    res.output_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or ():
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if not text:
                        continue
                    now = time.perf_counter()
                    if res.num_chunks == 0:
                        res.ttft = now - start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.num_chunks += 1
                    res.text += text
        res.latency = time.perf_counter() - start
        # A random-weight model can sample only tokens that decode to nothing
        # (special or partial UTF-8 tokens): no text, yet the usage chunk
        # counts its tokens. Such a request succeeded; it has no TTFT.
        res.success = res.num_chunks > 0 or bool(res.output_tokens)
        if not res.success:
            res.error = "the stream carried no text and no usage"
    except Exception as exc:  # one failed request must not end the run
        res.error = f"{type(exc).__name__}: {exc}"
    return res


def _pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without numpy."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(args, specs, results: list[RequestResult], duration: float, tokenizer) -> dict:
    ok = [r for r in results if r.success]
    source = "usage"
    for r in ok:
        if r.output_tokens is None:
            if tokenizer is not None:
                r.output_tokens, source = len(tokenizer.encode(r.text, add_special_tokens=False)), "tokenizer"
            else:
                r.output_tokens, source = r.num_chunks, "chunks"
    out_tokens = [r.output_tokens for r in ok]
    # TPOT: time after the first token per further token, per request (vLLM's).
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok
            if r.ttft is not None and r.output_tokens > 1]
    ms = 1000.0
    report = {
        "base_url": args.base_url, "endpoint": args.endpoint, "model": args.model,
        "num_prompts": len(specs), "completed": len(ok), "failed": len(results) - len(ok),
        "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
        "duration_s": duration,
        "total_input_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "total_output_tokens": sum(out_tokens),
        "output_token_source": source,
        "short_outputs": sum(1 for r, s in zip(results, specs)
                             if r.success and r.output_tokens < s.output_len),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": sum(out_tokens) / duration if duration else 0.0,
        "errors": sorted({r.error for r in results if r.error})[:5],
    }
    report["total_token_throughput"] = (
        (report["total_input_tokens"] + report["total_output_tokens"]) / duration
        if duration else 0.0)
    for name, values in (("ttft", [r.ttft for r in ok if r.ttft is not None]), ("tpot", tpot),
                         ("itl", [x for r in ok for x in r.itl]),
                         ("e2el", [r.latency for r in ok])):
        report[f"mean_{name}_ms"] = sum(values) / len(values) * ms if values else 0.0
        report[f"p50_{name}_ms"] = _pct(values, 50) * ms
        report[f"p99_{name}_ms"] = _pct(values, 99) * ms
    return report


async def run(args) -> dict:
    import httpx

    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                 timeout=args.timeout) as client:
        if args.model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            args.model = r.json()["data"][0]["id"]
        specs = build_requests(args, tokenizer)
        sem = asyncio.Semaphore(args.max_concurrency or len(specs))
        rng = random.Random(args.seed + 1)

        async def limited(spec):
            async with sem:
                return await send(client, args, spec)

        start = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(limited(spec)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    return summarize(args, specs, results, duration, tokenizer)


def print_report(rep: dict) -> None:
    rows = [("Successful requests", rep["completed"]), ("Failed requests", rep["failed"]),
            ("Max concurrency", rep["max_concurrency"]), ("Request rate (req/s)", rep["request_rate"]),
            ("Benchmark duration (s)", rep["duration_s"]),
            ("Total input tokens", rep["total_input_tokens"]),
            ("Total output tokens", f'{rep["total_output_tokens"]} ({rep["output_token_source"]})'),
            ("Request throughput (req/s)", rep["request_throughput"]),
            ("Output token throughput (tok/s)", rep["output_throughput"]),
            ("Total token throughput (tok/s)", rep["total_token_throughput"])]
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "p50", "p99"):
            rows.append((f"{stat.capitalize()} {name.upper()} (ms)", rep[f"{stat}_{name}_ms"]))
    print(f"{' Serving Benchmark Result ':=^56}")
    for label, value in rows:
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{label:<40}{shown:>16}")
    if rep["short_outputs"]:
        print(f"warning: {rep['short_outputs']} outputs were shorter than asked "
              "(the server ignored ignore_eos / min_tokens?)")
    for err in rep["errors"]:
        print(f"error: {err}")
    print("=" * 56)


def main(argv: list[str] | None = None) -> dict:
    args = make_parser().parse_args(argv)
    report = asyncio.run(run(args))
    print_report(report)
    if args.result_json:
        Path(args.result_json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["failed"] == 0 else 1)
