"""Decode tokens/s of one checkpoint compiled twice, for onnxruntime (--backend
onnx) and for AOTInductor, plus the resident memory of the ONNX artifact's
sessions (shared weights vs what plain onnxruntime sessions would hold).

Not a test: it prints figures. Both artifacts are float32 (the ONNX backend's
one dtype) with the same bucket plan; each measurement runs in a fresh process
so one runtime's thread pool never competes with the other's.

    python scripts/bench_onnx.py [--preset 125m] [--batch-sizes 1,4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("AOTLLM_BENCH_DIR", Path.home() / ".cache" / "aotllm-bench"))
PLAN = dict(max_model_len=256, max_num_seqs=4, prefill_buckets=(64,), decode_batch_sizes=(1, 4),
            context_buckets=(256,))


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / (1 << 20)


def _compile(checkpoint: Path, out: Path, backend: str) -> float:
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact

    t0 = time.perf_counter()
    compile_artifact(CompileConfig(model=str(checkpoint), output=str(out), dtype="float32",
                                   backend=backend, **PLAN))
    return time.perf_counter() - t0


def measure(artifact: Path, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Decode tokens/s: (time for new_tokens) - (time for 1 token) over the extra tokens."""
    import torch

    from aotllm import LLM, SamplingParams

    rss0 = _rss_mib()
    llm = LLM(str(artifact))
    rss_loaded = _rss_mib()
    g = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(5, 30000, (prompt_len,), generator=g).tolist()}
               for _ in range(batch)]

    def run(n: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0

    run(4)  # warm-up
    first = min(run(1) for _ in range(2))
    full = min(run(new_tokens) for _ in range(2))
    return {"decode_tok_s": batch * (new_tokens - 1) / (full - first),
            "rss_before_load_mib": rss0, "rss_loaded_mib": rss_loaded}


def plain_sessions_rss(artifact: Path) -> dict:
    """RSS of plain onnxruntime sessions, one per graph, each loading the
    external weights itself: what the shared initializers avoid."""
    import onnxruntime as ort

    rss0 = _rss_mib()
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
                for p in sorted((artifact / "graphs").glob("*.onnx"))]
    return {"sessions": len(sessions), "rss_added_mib": _rss_mib() - rss0}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="125m")
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--plain-rss", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch, args.prompt_len, args.new_tokens)))
        return
    if args.plain_rss:
        print(json.dumps(plain_sessions_rss(args.plain_rss)))
        return

    sys.path.insert(0, str(HERE))
    from build_tiny_model import build_tiny_model

    checkpoint = args.cache_dir / f"llama-{args.preset}"
    if not (checkpoint / "config.json").exists():
        build_tiny_model(checkpoint, family="llama", preset=args.preset, dtype="float32")
    results = {}
    for backend in ("onnx", "inductor"):
        out = args.cache_dir / f"llama-{args.preset}-{backend}"
        seconds = _compile(checkpoint, out, backend)
        graphs = sorted((out / "graphs").glob(f"*.{'onnx' if backend == 'onnx' else 'pt2'}"))
        from aotllm.graphs.manifest import Manifest

        manifest = Manifest.read(out)
        results[backend] = {
            "compile_s": round(seconds, 1),
            "weights_mib": round((out / manifest.weights_file).stat().st_size / (1 << 20), 1),
            "graph_files_mib": round(sum(p.stat().st_size for p in graphs) / (1 << 20), 2),
            "graphs": len(graphs),
        }
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            r = _child("--measure", str(out), "--batch", str(b), "--prompt-len",
                       str(args.prompt_len), "--new-tokens", str(args.new_tokens))
            results[backend][f"batch{b}"] = {k: round(v, 1) for k, v in r.items()}
    results["onnx"]["plain_ort_sessions"] = _child(
        "--plain-rss", str(args.cache_dir / f"llama-{args.preset}-onnx"))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
