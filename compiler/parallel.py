"""Compiling several graphs at once (`--compile-workers N`).

Most of a graph's compile time is single-threaded: Python lowering in
Inductor, then one C++ compiler process. N worker processes compile N graphs
side by side. They are forked after the model is loaded (and quantized), so
they share its weights copy-on-write instead of loading it N times, and they
inherit the backend and the graph list through module state, since a forked
child needs nothing pickled but a bucket name.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from aotllm.graphs.buckets import Bucket
from aotllm.models.parallel import TensorParallel, init_group_for_trace

# A graph that takes longer than this in a worker is reported as a failure
# instead of leaving the compile waiting forever.
_GRAPH_TIMEOUT_S = 3600

# What the forked workers compile: set in the parent right before the fork.
_JOB: dict = {}


def _compile(backend, model, spec, bucket: Bucket, scratch: Path) -> float:
    """Compile one graph into the scratch folder; its seconds."""
    t0 = time.perf_counter()
    backend.compile_bucket(model, bucket, spec, scratch / f"{bucket.name}{backend.file_suffix}")
    return time.perf_counter() - t0


def _compile_one(name: str) -> tuple[str, float]:
    job = _JOB
    return name, _compile(job["backend"], job["model"], job["spec"], job["buckets"][name],
                          job["scratch"])


def compile_graphs(backend, model, spec, buckets: list[Bucket], scratch: Path, workers: int,
                   done: Callable[[Bucket, float], None], tp_size: int = 1) -> None:
    """Compile each bucket's graph to `scratch/<name><suffix>`; `done(bucket,
    seconds)` is called in the parent as each one finishes.

    A tensor-parallel model is always traced in forked workers, each with a
    fake process group (its collectives need a group to trace, not peers):
    the parent never holds one, so `LLM` can compile a TP artifact and then
    start its own group of ranks in the same process."""
    if not buckets:
        return
    initializer = None
    if tp_size > 1:
        workers = max(workers, 1)
        initializer = functools.partial(init_group_for_trace, TensorParallel(0, tp_size))
    elif workers <= 1 or len(buckets) <= 1:
        for bucket in buckets:
            done(bucket, _compile(backend, model, spec, bucket, scratch))
        return
    _JOB.update(backend=backend, model=model, spec=spec, scratch=scratch,
                buckets={b.name: b for b in buckets})
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=min(workers, len(buckets)), mp_context=ctx,
                                 initializer=initializer) as pool:
            futures = [pool.submit(_compile_one, b.name) for b in buckets]
            for future in as_completed(futures, timeout=_GRAPH_TIMEOUT_S * len(buckets)):
                name, seconds = future.result()
                done(_JOB["buckets"][name], seconds)
    finally:
        _JOB.clear()
