"""Tensor parallel on this CPU: TP=1 against TP=2 (gloo, one thread per rank), one run.

Not a test: it prints figures. It compiles the ~125M Llama config (or a
checkpoint you name) at TP=1 and TP=2 with one prefill bucket and decode at
the given batch sizes, then measures decode tokens/s and time to first token
through `LLM`: TP=1 with one thread and with every core, TP=2 with one
thread per rank (rank 0 and its spawned worker). Then the collectives' share
of a TP=2 decode step: the all-reduces and all-gathers in the decode graph
are counted from its generated code, and each is timed alone between two
gloo ranks at the graph's shapes.

    python scripts/bench_tp.py [--model 125m|PATH] [--batch-sizes 1,8]
        [--prompt-len 128] [--new-tokens 64]

Two ranks on two shared cores cannot be faster than one process using both:
the figures show what the split costs here. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
import zipfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _bench_quant():
    """scripts/bench_quant.py, whose checkpoint, compile and timing helpers this reuses."""
    if "bench_quant" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_quant", HERE / "bench_quant.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_quant"] = module
        spec.loader.exec_module(module)
    return sys.modules["bench_quant"]


def collectives_in_graph(artifact: Path, batch: int) -> dict[str, int]:
    """Calls of each functional collective in the batch-`batch` decode graph's
    generated wrapper code."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    entry = next(g for g in manifest["graphs"]
                 if g["bucket"]["phase"] == "decode" and g["bucket"]["batch"] == batch)
    with zipfile.ZipFile(artifact / entry["file"]) as z:
        code = "\n".join(z.read(n).decode(errors="replace") for n in z.namelist()
                         if n.endswith(".cpp") and "wrapper" in n)
    # all_reduce has a C shim; all_gather_into_tensor goes through the proxy
    # executor, named only in the comment Inductor writes above each call.
    counts = {"all_reduce": len(re.findall(r"aoti_torch_cpu__c10d_functional_all_reduce_\(", code)),
              "all_gather": 0}
    source = ""
    for line in code.splitlines():
        if "Original ATen:" in line:
            source = line
        elif "proxy_executor_call_function(" in line and "all_gather_into_tensor" in source:
            counts["all_gather"] += 1
    return counts


def _time_collectives(rank: int, size: int, port: int, shapes: dict, dtype, iters: int, queue):
    import warnings

    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    # all_gather_tensor is what the ops layer calls (models/ops.py); its
    # deprecation notice would repeat on every call.
    warnings.simplefilter("ignore", FutureWarning)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size,
                            init_method=f"tcp://127.0.0.1:{port}")
    out = {}
    for name, shape in shapes.items():
        x = torch.randn(shape).to(dtype if name == "all_reduce" else torch.float32)
        for _ in range(10):
            (fc.all_reduce(x, "sum", dist.group.WORLD) if name == "all_reduce"
             else fc.all_gather_tensor(x, 0, dist.group.WORLD)).wait()
        dist.barrier()
        t = time.perf_counter()
        for _ in range(iters):
            (fc.all_reduce(x, "sum", dist.group.WORLD) if name == "all_reduce"
             else fc.all_gather_tensor(x, 0, dist.group.WORLD)).wait()
        out[name] = (time.perf_counter() - t) / iters
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def collective_seconds(shapes: dict, dtype: torch.dtype, iters: int = 300) -> dict[str, float]:
    import torch.multiprocessing as mp

    from aotllm.runtime.tp_workers import _free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_time_collectives, args=(r, 2, port, shapes, dtype, iters, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join()
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="125m", help="125m, or a checkpoint path")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    quant = _bench_quant()
    bench = quant.bench
    ap.add_argument("--cache-dir", type=Path, default=bench.DEFAULT_CACHE)
    args = ap.parse_args(argv)

    from aotllm import LLM

    model = quant.checkpoint(args.model, args.cache_dir)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    cores = os.cpu_count() or 1
    print(f"torch {torch.__version__}; CPU flags: {quant.cpu_flags()}; {cores} cores; "
          f"model {model}", flush=True)
    artifacts = {tp: quant.compile_scheme(
        model, args.cache_dir / f"tp{tp}-{model.stem}-{args.dtype}-{args.prompt_len}", None, args,
        tensor_parallel_size=tp)[0] for tp in (1, 2)}
    rows = []
    step_ms: dict[int, float] = {}
    for label, tp, threads in (("TP=1, 1 thread", 1, 1), (f"TP=1, {cores} threads", 1, cores),
                               ("TP=2, 1 thread per rank", 2, 1)):
        torch.set_num_threads(threads)
        llm = LLM(str(artifacts[tp]))
        engine = llm.llm_engine
        for b in batches:
            prompts = bench._prompts(engine.vocab_size, b, args.prompt_len)
            r = bench.bench_engine(engine, label, prompts, args.new_tokens)
            rows.append((label, b, r.ttft_s, r.decode_tok_s))
            if tp == 2:
                step_ms[b] = r.step_ms
            print(rows[-1], flush=True)
        group = getattr(engine.runner.executor, "group", None)
        if group is not None:
            group.close()
        del llm, engine

    print(f"\n{'':<28}{'batch':>6}{'TTFT ms':>10}{'decode tok/s':>14}")
    for name, b, ttft, tps in rows:
        print(f"{name:<28}{b:>6}{ttft * 1e3:>10.1f}{tps:>14.1f}")

    manifest = json.loads((artifacts[2] / "manifest.json").read_text())
    hidden = manifest["model_config"]["hidden_size"]
    vocab = manifest["model_config"]["vocab_size"]
    print()
    for b in batches:
        counts = collectives_in_graph(artifacts[2], b)
        # The all-reduces carry [b, hidden] activations; the all-gather each
        # rank's half of the logits (float32), padded to a multiple of the ranks.
        secs = collective_seconds({"all_reduce": (b, hidden),
                                   "all_gather": (b, -(-vocab // 2))},
                                  getattr(torch, args.dtype))
        total = (counts["all_reduce"] * secs["all_reduce"]
                 + counts["all_gather"] * secs["all_gather"])
        print(f"TP=2 decode batch {b}: the graph has {counts['all_reduce']} all-reduces "
              f"({secs['all_reduce'] * 1e6:.0f} us each, timed alone) and "
              f"{counts['all_gather']} all-gather "
              f"({secs['all_gather'] * 1e6:.0f} us): {total * 1e3:.1f} ms of a "
              f"{step_ms[b]:.1f} ms step ({total * 1e3 / step_ms[b]:.0%})")


if __name__ == "__main__":
    main()
