"""Decode throughput and time to first token: compiled aotllm vs eager aotllm
vs transformers `generate`, one run, same checkpoint.

Not a test: it prints figures. Default workload (the issues' reference):
a ~125M Llama config (hidden 768, 12 layers, 12 heads, 4 KV heads,
intermediate 2048, vocab 32000), bf16, prompt 128 tokens, 128 new tokens,
batch 1 and 8, greedy. It also reports compile seconds per bucket, artifact
size, cold start (a new process from start to first token), this machine's
memory read bandwidth and the model bandwidth utilisation (MBU) of decode,
and where a compiled decode step's time goes (graph vs runtime overhead).

Run it on an otherwise idle machine: with 2 OpenMP threads on 2 cores, any
other busy process stalls every parallel region of the graph.

    python scripts/bench.py [--modes compiled,eager,transformers] [--batch-sizes 1,8]
    python scripts/bench.py --modes compiled --peers bf16,f32,q8_0   # llama.cpp side by side
    python scripts/bench.py --modes compiled --no-dynamic-shapes      # one graph per bucket
    python scripts/bench.py --device cuda --batch-sizes 1,8,32        # a CUDA GPU

On CUDA, bandwidth and MBU are the GPU's, and "graph ms" is the time to
launch a graph's kernels (they run asynchronously; the step's sampling waits
for them), so compare "step ms" there.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
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
    mbu: float | None = None  # decode bytes read per second / measured bandwidth
    graph_ms_per_step: float | None = None  # compiled decode: time inside the graph
    step_ms: float | None = None  # compiled decode: whole engine step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth_gb_s(device: torch.device = torch.device("cpu")) -> float:
    """Read bandwidth: the faster of two streaming reads of a 512 MiB tensor (far
    beyond any cache; 2 GiB on a GPU, beyond its L2), summing it and a BLAS
    matrix-vector product over it. On the 2-core Xeon of the README's figures
    the sum read 23.7 GB/s and the product 30.2: with the sum alone, decode
    steps read their weights faster than "the bandwidth" (MBU over 100%)."""
    x = torch.ones((128 if device.type == "cpu" else 512) << 20, dtype=torch.float32,
                   device=device)
    matrix, vector = x.view(-1, 4096), torch.ones(4096, device=device)
    best = float("inf")
    for read in (x.sum, lambda: torch.mv(matrix, vector)):
        read()
        for _ in range(5):
            _sync(device)
            t = time.perf_counter()
            read()
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def decode_bytes_per_step(path: Path, dtype_bytes: float, batch: int, context: int) -> float:
    """Weights a decode step reads (the input embedding only by row) plus its KV."""
    c = json.loads((path / "config.json").read_text())
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    per_layer = h * (heads + 2 * kv_heads) * hd + heads * hd * h + 3 * h * i + 2 * h
    weights = (layers * per_layer + h + v * h) * dtype_bytes
    kv = 2 * layers * kv_heads * hd * context * batch * dtype_bytes
    return weights + kv


def _prompts(vocab: int, batch: int, prompt_len: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]


def bench_engine(engine, mode: str, prompts, new_tokens: int) -> Result:
    """Times the engine; for compiled engines also the time spent inside graphs."""
    executor = engine.runner.executor
    graph_time = [0.0, 0]
    original = type(executor).__call__

    def timed(self, phase, *args):
        t = time.perf_counter()
        out = original(self, phase, *args)
        if phase == "decode":
            graph_time[0] += time.perf_counter() - t
            graph_time[1] += 1
        return out

    _warm_up(engine, prompts)
    type(executor).__call__ = timed
    try:
        result = _bench_engine(engine, mode, prompts, new_tokens)
    finally:
        type(executor).__call__ = original
    steps = new_tokens - 1
    result.graph_ms_per_step = graph_time[0] / max(graph_time[1], 1) * 1e3
    result.step_ms = (result.total_s - result.ttft_s) / steps * 1e3
    return result


def _warm_up(engine, prompts) -> None:
    """Every bucket the run will use, once (first calls of a graph are slower)."""
    from aotllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"warmup{i}", {"prompt_token_ids": p}, params)
    while engine.has_unfinished_requests():
        engine.step()


def _bench_engine(engine, mode: str, prompts, new_tokens: int) -> Result:
    from aotllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    t0 = time.perf_counter()
    t_first = None
    started: set[str] = set()  # requests that have their first token
    while engine.has_unfinished_requests():
        started.update(o.request_id for o in engine.step())
        if t_first is None and len(started) == len(prompts):
            t_first = time.perf_counter()
    total = time.perf_counter() - t0
    decode_tokens = len(prompts) * (new_tokens - 1)
    return Result(mode, len(prompts), t_first - t0, decode_tokens / (total - (t_first - t0)), total)


def bench_transformers(path: Path, dtype: torch.dtype, prompts, new_tokens: int,
                       device: torch.device = torch.device("cpu")) -> Result:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def gen(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        _sync(device)
        return time.perf_counter() - t

    gen(2)  # warm-up
    ttft = gen(1)
    total = gen(new_tokens)
    decode_tokens = len(prompts) * (new_tokens - 1)
    return Result("transformers", len(prompts), ttft, decode_tokens / (total - ttft), total)


def compile_for_bench(path: Path, out: Path, max_len: int, max_batch: int, prompt_len: int,
                      dynamic_shapes: bool | None = None, device: str = "cpu"):
    """The artifact the compiled mode serves; per-bucket compile seconds come back."""
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact

    cfg = CompileConfig(
        model=str(path), output=str(out), dtype="auto", max_model_len=max_len,
        max_num_seqs=max_batch, prefill_buckets=(16, 64, prompt_len),
        context_buckets=(max_len,), dynamic_shapes=dynamic_shapes, device=device,
    )
    t = time.perf_counter()
    manifest = compile_artifact(cfg)
    return manifest, time.perf_counter() - t


def cold_start(artifact: Path) -> tuple[float, float]:
    """(python + torch import s, rest of a new process until its first token s)."""
    code = (
        "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter()\n"
        "from aotllm import LLM, SamplingParams\n"
        f"llm = LLM({str(artifact)!r})\n"
        "llm.generate({'prompt_token_ids': [5, 6, 7, 8]}, SamplingParams(max_tokens=1),"
        " use_tqdm=False)\n"
        "t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    total = time.perf_counter() - t
    torch_s, rest = map(float, out.stdout.split()[-2:])
    return total - rest, rest


def cpu_line() -> str:
    """The ISA flags that decide the kernels, and what torch/oneDNN may use of them."""
    from aotllm.models.cpu_isa import _cpuinfo_flags, detect

    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8")
    flags = [f for f in wanted if f in _cpuinfo_flags()]
    restricted = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
                  if k in os.environ}
    return (f"CPU flags: {' '.join(flags) or 'unknown'}; in use: {detect().describe()}"
            + (f" (restricted: {restricted})" if restricted else ""))


# Bytes per weight of llama.cpp's GGUF types (q8_0: 34-byte blocks of 32).
_GGUF_BYTES = {"bf16": 2.0, "f16": 2.0, "f32": 4.0, "q8_0": 34 / 32}


def bench_peer(path: Path, outtype: str, batches: list[int], args, bandwidth: float) -> list:
    """llama.cpp on the checkpoint converted by its own converter (scripts/peers_llamacpp.py)."""
    spec = importlib.util.spec_from_file_location("peers_llamacpp", HERE / "peers_llamacpp.py")
    peers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peers)
    if not peers.llama_cpp_available():
        print("llama.cpp peers skipped: llama_cpp is not importable (pip install "
              "llama-cpp-python)", flush=True)
        return []
    gguf = peers.convert_to_gguf(path, outtype, args.cache_dir / f"{path.name}-{outtype}.gguf",
                                 args.cache_dir, pre_tokenizer=args.pre_tokenizer)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    out = []
    for b in batches:
        peer = peers.bench_llamacpp(gguf, _prompts(vocab, b, args.prompt_len), args.new_tokens)
        r = Result(f"llama.cpp {outtype}", b, peer.ttft_s, peer.decode_tok_s, 0.0)
        per_step = decode_bytes_per_step(path, _GGUF_BYTES.get(outtype, 2.0), b,
                                         args.prompt_len + args.new_tokens // 2)
        r.mbu = per_step * r.decode_tok_s / b / (bandwidth * 1e9)
        print(r, flush=True)
        out.append(r)
    return out


# Issue 9's targets, aotllm compiled (BF16) over llama.cpp bf16 on one machine.
_TARGETS = (("decode b1", 1, "decode", 1.2), ("decode b8", 8, "decode", 1.5),
            ("TTFT b1", 1, "ttft", 0.8))


def print_targets(results: list) -> None:
    by = {(r.mode, r.batch): r for r in results}
    lines = []
    for label, b, what, target in _TARGETS:
        ours, peer = by.get(("compiled", b)), by.get(("llama.cpp bf16", b))
        if ours is None or peer is None:
            continue
        if what == "decode":
            ratio = ours.decode_tok_s / peer.decode_tok_s
            ok = ratio >= target
        else:
            ratio = ours.ttft_s / peer.ttft_s
            ok = ratio <= target
        lines.append(f"  {label}: {ratio:.2f}x llama.cpp bf16 (target "
                     f"{'>=' if what == 'decode' else '<='} {target}x): "
                     f"{'met' if ok else 'NOT met'}")
    if lines:
        print("\ntargets (aotllm compiled vs llama.cpp bf16):\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--modes", default="compiled,eager,transformers")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--pre-tokenizer", default="qwen2",
                    help="tokenizer.ggml.pre for llama.cpp's converter when it does not know "
                         "the tokenizer's hash (the built-in checkpoints' byte-level BPE)")
    ap.add_argument("--dynamic-shapes", action=argparse.BooleanOptionalAction, default=None,
                    help="--no-dynamic-shapes compiles one graph per bucket (default: one "
                         "per shape group)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                    help="where aotllm and transformers run (--peers, llama.cpp, needs cpu)")
    ap.add_argument("--peers", default="", metavar="TYPES",
                    help="also run llama.cpp (llama-cpp-python) on GGUF conversions of the same "
                         "checkpoint, e.g. bf16,f32,q8_0, and print the target ratios")
    args = ap.parse_args(argv)

    if args.peers and args.device != "cpu":
        ap.error("--peers runs llama.cpp on the CPU: compare it with --device cpu")
    path = ensure_checkpoint(args.cache_dir, args.preset, args.dtype)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    modes = args.modes.split(",")
    max_len = args.prompt_len + args.new_tokens
    device = torch.device(args.device)
    bandwidth = memory_bandwidth_gb_s(device)
    dtype_bytes = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, checkpoint {path}, "
          f"{args.dtype}; memory read bandwidth {bandwidth:.1f} GB/s", flush=True)
    print(cpu_line(), flush=True)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}; bandwidth and MBU are the GPU's",
              flush=True)
    results: list[Result] = []
    extra: dict = {"bandwidth_gb_s": bandwidth}
    for mode in modes:
        if mode == "transformers":
            vocab = json.loads((path / "config.json").read_text())["vocab_size"]
            for b in batches:
                prompts = _prompts(vocab, b, args.prompt_len)
                results.append(bench_transformers(path, getattr(torch, args.dtype), prompts,
                                                  args.new_tokens, device))
                print(results[-1], flush=True)
            continue
        from aotllm import LLM

        if mode == "compiled":
            artifact = args.cache_dir / (f"artifact-{path.name}-{max_len}-{max(batches)}"
                                         + ("-static" if args.dynamic_shapes is False else "")
                                         + ("" if device.type == "cpu" else f"-{device.type}"))
            manifest, seconds = compile_for_bench(path, artifact, max_len, max(batches),
                                                  args.prompt_len, args.dynamic_shapes,
                                                  args.device)
            # Per graph file: with --dynamic-shapes one file serves several buckets.
            extra["compile_s"] = {Path(e.file).stem: round(e.compile_seconds, 1)
                                  for e in manifest.graphs}
            extra["compile_total_s"] = seconds
            extra["artifact_mib"] = sum(
                p.stat().st_size for p in artifact.rglob("*") if p.is_file()) / (1 << 20)
            extra["graph_file_mib"] = {Path(e.file).stem: (artifact / e.file).stat().st_size / (1 << 20)
                                       for e in manifest.graphs}
            extra["cold_start_python_torch_s"], extra["cold_start_to_first_token_s"] = \
                cold_start(artifact)
            llm = LLM(str(artifact))
        elif mode == "eager":
            llm = LLM(str(path), dtype=args.dtype, enforce_eager=True, max_model_len=max_len,
                      max_num_seqs=max(batches), device=args.device)
        else:
            raise SystemExit(f"unknown mode {mode!r}")
        for b in batches:
            prompts = _prompts(llm.llm_engine.vocab_size, b, args.prompt_len)
            r = bench_engine(llm.llm_engine, mode, prompts, args.new_tokens)
            # Average context over the decode steps.
            per_step = decode_bytes_per_step(path, dtype_bytes, b, args.prompt_len + args.new_tokens // 2)
            r.mbu = per_step * r.decode_tok_s / b / (bandwidth * 1e9)
            results.append(r)
            print(r, flush=True)
        del llm
    for outtype in filter(None, args.peers.split(",")):
        results += bench_peer(path, outtype, batches, args, bandwidth)

    print()
    print(f"{'mode':<14}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'MBU':>7}"
          f"{'step ms':>9}{'graph ms':>10}")
    for r in results:
        mbu = f"{r.mbu:.0%}" if r.mbu is not None else "-"
        step = f"{r.step_ms:.2f}" if r.step_ms is not None else "-"
        graph = f"{r.graph_ms_per_step:.2f}" if r.graph_ms_per_step is not None else "-"
        print(f"{r.mode:<14}{r.batch:>6}{r.ttft_s * 1e3:>10.1f}{r.decode_tok_s:>14.1f}{mbu:>7}"
              f"{step:>9}{graph:>10}")
    print_targets(results)
    if "compile_s" in extra:
        print(f"\ncompile: {extra['compile_total_s']:.1f} s total; per bucket: "
              + ", ".join(f"{k} {v} s" for k, v in extra["compile_s"].items()))
        print(f"artifact: {extra['artifact_mib']:.1f} MiB; graph files: "
              + ", ".join(f"{k} {v:.1f} MiB" for k, v in extra["graph_file_mib"].items()))
        print(f"cold start: python + torch import {extra['cold_start_python_torch_s']:.2f} s, "
              f"then {extra['cold_start_to_first_token_s']:.2f} s to the first token")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results], **extra}, indent=2))


if __name__ == "__main__":
    main()
