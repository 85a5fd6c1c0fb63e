"""Decode throughput and time to first token: aotllm vs transformers `generate`.

Not a test: it prints figures. Default workload (the issues' reference):
a ~125M Llama config (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000), bf16, prompt 128 tokens, 128 new tokens,
batch 1 and 8, greedy.

    python scripts/bench.py [--modes eager,transformers] [--batch-sizes 1,8]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("AOTLLM_BENCH_DIR", Path.home() / ".cache" / "aotllm-bench"))


def _builder():
    spec = importlib.util.spec_from_file_location("build_tiny_model", HERE / "build_tiny_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ensure_checkpoint(root: Path, preset: str, dtype: str) -> Path:
    path = root / f"llama-{preset}-{dtype}"
    if not (path / "config.json").is_file():
        print(f"building {preset} llama checkpoint ({dtype}) in {path} ...", flush=True)
        _builder().build_tiny_model(path, family="llama", preset=preset, dtype=dtype)
    return path


@dataclass
class Result:
    mode: str
    batch: int
    ttft_s: float  # prefill of the whole batch until its first tokens
    decode_tok_s: float  # generated tokens per second after the first, whole batch
    total_s: float


def _prompts(vocab: int, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def bench_engine(engine, mode: str, prompts, new_tokens: int) -> Result:
    from aotllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    # Warm-up: one short request through prefill and decode.
    engine.add_request("warmup", {"prompt_token_ids": prompts[0][:16]},
                       SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    t0 = time.perf_counter()
    t_first = None
    generated = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        if outs and t_first is None and all(len(o.outputs[0].token_ids) for o in outs) \
                and len(outs) == len(prompts):
            t_first = time.perf_counter()
        generated = sum(len(o.outputs[0].token_ids) for o in outs) or generated
    total = time.perf_counter() - t0
    decode_tokens = len(prompts) * (new_tokens - 1)
    return Result(mode, len(prompts), t_first - t0, decode_tokens / (total - (t_first - t0)), total)


def bench_transformers(path: Path, dtype: torch.dtype, prompts, new_tokens: int) -> Result:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    gen(2)  # warm-up
    ttft = gen(1)
    total = gen(new_tokens)
    decode_tokens = len(prompts) * (new_tokens - 1)
    return Result("transformers", len(prompts), ttft, decode_tokens / (total - ttft), total)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="eager,transformers")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    path = ensure_checkpoint(args.cache_dir, args.preset, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    max_len = args.prompt_len + args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"checkpoint {path}, {args.dtype}")
    results: list[Result] = []
    for mode in modes:
        if mode == "transformers":
            for b in batches:
                vocab = json.loads((path / "config.json").read_text())["vocab_size"]
                results.append(bench_transformers(path, getattr(torch, args.dtype),
                                                  _prompts(vocab, b, args.prompt_len), args.new_tokens))
                print(results[-1], flush=True)
            continue
        if mode != "eager":
            raise SystemExit(f"unknown mode {mode!r}")
        from aotllm import LLM

        llm = LLM(str(path), dtype=args.dtype, enforce_eager=True, max_model_len=max_len,
                  max_num_seqs=max(batches))
        for b in batches:
            prompts = _prompts(llm.llm_engine.vocab_size, b, args.prompt_len)
            results.append(bench_engine(llm.llm_engine, mode, prompts, args.new_tokens))
            print(results[-1], flush=True)
        del llm

    print()
    print(f"{'mode':<14}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'total s':>9}")
    for r in results:
        print(f"{r.mode:<14}{r.batch:>6}{r.ttft_s * 1e3:>10.1f}{r.decode_tok_s:>14.1f}{r.total_s:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
