"""BF16 vs W8A16 vs W8A8 artifacts, next to llama.cpp on the same checkpoint, one run.

Not a test: it prints figures. For each scheme it compiles an artifact (one
prefill bucket of the prompt length, decode at the given batch sizes), then
measures time to first token at the prompt length, decode tokens/s after the
first token, and bandwidth utilisation (MBU: weight and KV bytes a decode
step reads, per second, over this machine's measured read bandwidth). With
--ppl also the held-out perplexity and top-1 agreement with the bf16
artifact. With --peers, llama.cpp (llama-cpp-python, built from source)
runs the same token ids on GGUF files its own converter made from the same
checkpoint (bf16, q8_0; for SmolLM2 also the Q4_1 file it ships as).

    python scripts/bench_quant.py [--model smollm2|125m|PATH] [--schemes none,w8a16,w8a8]
        [--batch-sizes 1,8] [--prompt-len 128] [--new-tokens 128] [--ppl] [--peers]

A scheme may end in +head (w8a16+head): the LM head quantized too, as in
llama.cpp's q8_0 files.

Run it on an idle machine (see scripts/bench.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _script(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _script("bench")


def cpu_flags() -> str:
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16",
              "amx_int8")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return " ".join(f for f in wanted if f in flags) or "unknown"


def checkpoint(name: str, cache: Path) -> Path:
    if name == "smollm2":
        return _script("real_model").smollm2_gguf()
    if name in ("125m", "tiny"):
        return bench.ensure_checkpoint(cache, name, "bfloat16")
    return Path(name)


def weight_bytes_read(artifact: Path) -> int:
    """Bytes of weights one decode step reads: every tensor but an input
    embedding that the LM head does not share (a lookup reads one row per
    token). A tied embedding is the head unless the head was quantized into
    its own `lm_head` tensors."""
    from safetensors import safe_open

    manifest = json.loads((artifact / "manifest.json").read_text())
    tied = manifest["model_config"].get("tie_word_embeddings", False)
    total = 0
    with safe_open(str(artifact / "weights.safetensors"), "pt") as f:
        names = list(f.keys())
        head_apart = not tied or any(n.startswith("lm_head.") for n in names)
        for name in names:
            if name == "model.embed_tokens.weight" and head_apart:
                continue
            t = f.get_slice(name)
            total += torch.Size(t.get_shape()).numel() * _itemsize(t.get_dtype())
    return total


def _itemsize(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "I8": 1, "I32": 4, "I64": 8}[dtype]


def kv_bytes(manifest: dict, batch: int, context: int) -> int:
    kv = manifest["kv_cache"]
    per_token = 2 * kv["num_layers"] * kv["num_kv_heads"] * kv["head_dim"]
    return per_token * context * batch * torch.empty(0, dtype=getattr(torch, kv["dtype"])).element_size()


def compile_scheme(model: Path, out: Path, scheme: str | None, args,
                   tensor_parallel_size: int = 1) -> tuple[Path, float]:
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact

    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    max_len = -(-(args.prompt_len + args.new_tokens) // 16) * 16
    manifest = compile_artifact(CompileConfig(
        model=str(model), output=str(out), dtype=args.dtype, max_model_len=max_len,
        max_num_seqs=max(batches), prefill_buckets=(args.prompt_len,),
        decode_batch_sizes=batches, context_buckets=(max_len,),
        quantization=quant_config(scheme), tensor_parallel_size=tensor_parallel_size))
    return out, sum(g.compile_seconds for g in manifest.graphs)


def quant_config(scheme: str | None):
    """A scheme name, optionally with "+head": the LM head quantized too (as
    llama.cpp's q8_0 files quantize their output matrix)."""
    from aotllm.quantize.config import QuantConfig

    if scheme is None:
        return None
    name, _, extra = scheme.partition("+")
    if extra not in ("", "head"):
        raise SystemExit(f"unknown scheme suffix +{extra} (only +head)")
    return QuantConfig(name, quantize_lm_head=extra == "head")


def hf_dir_for_peers(model: Path, cache: Path) -> Path:
    """An HF safetensors directory of the checkpoint for llama.cpp's converter
    (a GGUF checkpoint is written out dequantized, through aotllm's reader)."""
    if model.is_dir():
        return model
    from safetensors.torch import save_file

    from aotllm.models.checkpoint import open_checkpoint

    out = cache / f"hf-{model.stem}"
    if not (out / "model.safetensors").is_file():
        out.mkdir(parents=True, exist_ok=True)
        source = open_checkpoint(model)
        (out / "config.json").write_text(json.dumps(source.raw_config()))
        source.save_tokenizer(out)
        save_file({n: t.contiguous() for n, t in source.tensors()}, str(out / "model.safetensors"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2, 125m, or a checkpoint path")
    ap.add_argument("--schemes", default="none,w8a16,w8a8")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ppl", action="store_true", help="held-out perplexity and top-1 agreement")
    ap.add_argument("--peers", action="store_true", help="llama.cpp on the same checkpoint")
    ap.add_argument("--cache-dir", type=Path, default=bench.DEFAULT_CACHE)
    args = ap.parse_args(argv)

    from aotllm import LLM
    from aotllm.runtime.scoring import BF16_NEAR_TIE, score_tokens, top1_agreement

    model = checkpoint(args.model, args.cache_dir)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    bandwidth = bench.memory_bandwidth_gb_s()
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; CPU flags: {cpu_flags()}; memory read bandwidth "
          f"{bandwidth:.1f} GB/s; model {model}", flush=True)
    rows: list[tuple[str, int, float, float, float | None]] = []
    notes: list[str] = []
    prompts_by_batch: dict[int, list[list[int]]] = {}
    reference = None
    for scheme in [None if s == "none" else s for s in args.schemes.split(",")]:
        label = f"aotllm {args.dtype}" + (f" {scheme}" if scheme else "")
        out = args.cache_dir / f"quant-{model.stem}-{args.dtype}-{scheme}-{args.prompt_len}"
        artifact, compile_s = compile_scheme(model, out, scheme, args)
        manifest = json.loads((artifact / "manifest.json").read_text())
        wbytes = weight_bytes_read(artifact)
        size = (artifact / "weights.safetensors").stat().st_size / (1 << 20)
        notes.append(f"{label}: compile {compile_s:.0f} s ({len(manifest['graphs'])} graphs), "
                     f"weights file {size:.1f} MiB, decode reads {wbytes / (1 << 20):.1f} MiB "
                     "of weights per step")
        llm = LLM(str(artifact))
        engine = llm.llm_engine
        for b in batches:
            prompts = prompts_by_batch.setdefault(
                b, bench._prompts(engine.vocab_size, b, args.prompt_len))
            r = bench.bench_engine(engine, label, prompts, args.new_tokens)
            step_bytes = wbytes + kv_bytes(manifest, b, args.prompt_len + args.new_tokens // 2)
            mbu = step_bytes * r.decode_tok_s / b / (bandwidth * 1e9)
            rows.append((label, b, r.ttft_s, r.decode_tok_s, mbu))
            print(rows[-1], flush=True)
        if args.ppl:
            ids = llm.get_tokenizer().encode((HERE / "data" / "corpus.txt").read_text())[:1281]
            s = score_tokens(engine, ids, window=min(256, engine.max_model_len))
            agree = ""
            if reference is not None:
                everywhere, _ = top1_agreement(s, reference)
                resolved, kept = top1_agreement(s, reference, BF16_NEAR_TIE)
                agree = (f", top-1 agreement with the first scheme {everywhere:.1%} (on the "
                         f"{kept} positions it resolves beyond a bf16 near-tie: {resolved:.1%})")
            reference = reference or s
            notes.append(f"{label}: held-out perplexity {s.perplexity:.3f} over {s.num_tokens} "
                         f"tokens{agree}")
        del llm, engine

    if args.peers:
        peers = _script("peers_llamacpp")
        if not peers.llama_cpp_available():
            notes.append("llama.cpp: not installed (pip install llama-cpp-python)")
        else:
            hf = hf_dir_for_peers(model, args.cache_dir)
            pre = "qwen2" if args.model in ("125m", "tiny") else None  # build_tiny_model's BPE
            ggufs = {f"llama.cpp {t}": peers.convert_to_gguf(
                hf, t, args.cache_dir / f"{hf.name}-{t}.gguf", args.cache_dir, pre_tokenizer=pre)
                for t in ("bf16", "q8_0")}
            if model.suffix == ".gguf":
                ggufs[f"llama.cpp {model.stem.rsplit('.', 1)[-1].lower()} (as shipped)"] = model
            for name, path in ggufs.items():
                for b in batches:
                    r = peers.bench_llamacpp(path, prompts_by_batch[b], args.new_tokens, name=name)
                    rows.append((name, b, r.ttft_s, r.decode_tok_s, None))
                    print(rows[-1], flush=True)

    print(f"\n{'':<28}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}{'MBU':>7}")
    for name, b, ttft, tps, mbu in rows:
        print(f"{name:<28}{b:>6}{ttft * 1e3:>10.1f}{tps:>14.1f}"
              f"{(f'{mbu:.0%}' if mbu is not None else '-'):>7}")
    print()
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
