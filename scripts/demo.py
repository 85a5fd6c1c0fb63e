"""aotllm end to end on a built-in model: build, compile, load, generate, measure.

1. builds a small random-weight Llama checkpoint (the "tiny" preset of
   scripts/build_tiny_model.py, widened so the figures mean something);
2. compiles it into an artifact with a small bucket plan (graphs that did not
   change are reused, so a second run skips the compile);
3. loads `LLM(artifact)`, generates greedily for a few prompts and prints them;
4. prints load and compile time, time to first token, and decode tokens/s at
   batch 1 and batch 4.

The weights are random, so the completions are gibberish; the figures are real.
Nothing is downloaded.

    python scripts/demo.py [--work-dir out/demo] [--eager] [--rebuild]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Big enough that a step is not all Python overhead, small enough that the
# whole bucket plan compiles in about a minute on 2 cores.
MODEL_OVERRIDES = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, intermediate_size=512)
PLAN = dict(max_model_len=256, max_num_seqs=4, block_size=16, prefill_buckets=(32, 128),
            decode_batch_sizes=(1, 2, 4), context_buckets=(256,))
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Ahead-of-time compilation means",
    "Once upon a time",
]
BENCH_PROMPT_LEN = 32


def build_checkpoint(path: Path, rebuild: bool) -> Path:
    if (path / "config.json").is_file() and not rebuild:
        print(f"checkpoint: reusing {path}")
        return path
    spec = importlib.util.spec_from_file_location("build_tiny_model", HERE / "build_tiny_model.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    t0 = time.perf_counter()
    builder.build_tiny_model(path, family="llama", preset="tiny", **MODEL_OVERRIDES)
    print(f"checkpoint: built {path} in {time.perf_counter() - t0:.1f} s")
    return path


def compile_model(checkpoint: Path, out: Path, rebuild: bool) -> tuple[float, float, int, int]:
    """(wall seconds now, graph compile seconds recorded, graphs compiled now, graphs)."""
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.graphs.manifest import ArtifactError, Manifest

    try:
        before = {(g.key, g.sha256) for g in Manifest.read(out).graphs}
    except ArtifactError:
        before = set()
    t0 = time.perf_counter()
    manifest = compile_artifact(CompileConfig(model=str(checkpoint), output=str(out),
                                              reuse=not rebuild, **PLAN))
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
    ap.add_argument("--work-dir", type=Path, default=Path("out/demo"),
                    help="where the checkpoint and the artifact go (default: out/demo)")
    ap.add_argument("--eager", action="store_true",
                    help="skip compiling: run the checkpoint with the eager torch model")
    ap.add_argument("--rebuild", action="store_true",
                    help="rebuild the checkpoint and recompile every graph")
    ap.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    args = ap.parse_args(argv)

    from aotllm.cli import setup_logging

    setup_logging()
    checkpoint = build_checkpoint(args.work_dir / "checkpoint", args.rebuild)
    compile_s = recorded_s = None
    if args.eager:
        model = checkpoint
    else:
        model = args.work_dir / "artifact"
        compile_s, recorded_s, fresh, total = compile_model(checkpoint, model, args.rebuild)
        print(f"artifact: {model} ({fresh} of {total} graphs compiled now, "
              f"{total - fresh} reused)")

    from aotllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(str(model), enforce_eager=args.eager, max_model_len=PLAN["max_model_len"],
              max_num_seqs=PLAN["max_num_seqs"])
    load_s = time.perf_counter() - t0

    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    print()
    n_tokens = 0
    for out in outputs:
        c = out.outputs[0]
        n_tokens += len(c.token_ids)
        print(f"Prompt:    {out.prompt!r}")
        print(f"Generated: {c.text!r}  ({len(c.token_ids)} tokens, {c.finish_reason})")
    print(f"\n{len(PROMPTS)} prompts, {n_tokens} tokens in {gen_s:.2f} s "
          f"({n_tokens / gen_s:.1f} tokens/s, first call, no warm-up)")

    engine = llm.llm_engine
    for batch in (1, 4):  # warm-up: the first call of each graph pays one-off costs
        measure(engine, batch, 4)
    ttft1, tps1 = measure(engine, 1, args.max_tokens)
    ttft4, tps4 = measure(engine, 4, args.max_tokens)

    mode = "eager" if args.eager else "compiled (AOTInductor)"
    print(f"\nSummary: {mode}, {PLAN['max_num_seqs']} seqs max, "
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
