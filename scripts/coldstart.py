"""Cold start of an artifact: seconds from the first import to the first token.

Run in a fresh process per measurement (the point is a cold interpreter; the
page cache stays warm, which is how a restarted server finds it):

    PYTHONPATH=.. python scripts/coldstart.py ARTIFACT [--runs 5]

Each run is a child process that times its phases with perf_counter from the
top of the interpreter: `import torch`, the runtime's own imports, building
the engine, and the first token of a short greedy prompt. Inside the build it
times (by wrapping them) the manifest read, the file check, the weights, the
graph packages and the tokenizer (loaded in a thread, so it overlaps the
rest). It also reports whether transformers got imported, the child's peak
RSS, and per phase the median over runs. Pass PYTHONPATH to compare another
checkout of aotllm (the wrapped functions that do not exist there are skipped).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

_CHILD = r"""
import time
t0 = time.perf_counter()
import resource, json, sys, functools
import torch
t_torch = time.perf_counter()
from aotllm import LLM, SamplingParams
import aotllm.runtime.artifact as art
import aotllm.runtime.graph_loaders as gl
import aotllm.runtime.loader as ld
t_imports = time.perf_counter()
phases = {}

def timed(owner, name, label):
    fn = getattr(owner, name, None)
    if fn is None:
        return
    @functools.wraps(fn)
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            phases[label] = phases.get(label, 0.0) + time.perf_counter() - t
    setattr(owner, name, wrapper)

# Whatever of these the code under test has (before/after this change).
timed(art.Manifest, "read", "manifest read")
timed(art, "verify_files", "file check (full sha256)")
timed(art, "check_files", "file check (cheap)")
timed(gl.InductorLoader, "read_weights", "weights")
timed(gl.InductorLoader, "load_graph", "graph packages")
timed(ld, "load_tokenizer", "tokenizer (thread)")
timed(art, "load_artifact", "load_artifact")
llm = LLM(sys.argv[1], max_num_seqs=1, seed=0)
t_engine = time.perf_counter()
out = llm.generate(["The capital of France is"],
                   SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
t_first = time.perf_counter()
print(json.dumps({
    "import torch": t_torch - t0,
    "import aotllm runtime": t_imports - t_torch,
    "build engine": t_engine - t_imports,
    "first token": t_first - t_engine,
    "total": t_first - t0,
    "token": out[0].outputs[0].token_ids,
    "load_phases": phases,
    "transformers imported": "transformers" in sys.modules,
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    runs = []
    for _ in range(args.runs):
        proc = subprocess.run([sys.executable, "-c", _CHILD, args.artifact],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(proc.stderr)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), flush=True)
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    keys += [f"load: {k}" for k in runs[0]["load_phases"]]
    for key in keys:
        if key.startswith("load: "):
            values = [r["load_phases"][key[6:]] for r in runs]
        else:
            values = [r[key] for r in runs]
        unit = "MiB" if key.endswith("mib") else "s"
        print(f"{key:>28}: median {statistics.median(values):8.3f} {unit}  "
              f"(min {min(values):.3f}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
