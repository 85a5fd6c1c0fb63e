"""Runs a function in N spawned ranks of a gloo process group (one thread
each) and returns rank 0's result; tensor-parallel tests use it to compare a
sharded model's greedy tokens with the unsharded model's."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.runtime.config import SchedulerConfig
from aotllm.runtime.engine_core import EngineCore
from aotllm.runtime.model_runner import EagerExecutor, ModelRunner
from aotllm.runtime.request import Request
from aotllm.runtime.sampler import Sampler
from aotllm.runtime.sampling_params import SamplingParams
from aotllm.runtime.scheduler import Scheduler

# Prompt lengths past the token budget (chunked prefill) and more prompts
# than one decode call's rows would need one at a time (batched decode).
PROMPTS = [[3 + (7 * i + j) % 97 for j in range(n)] for i, n in enumerate((5, 37, 20, 11))]
TOKEN_BUDGET = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def greedy(executor, kv_spec: KVCacheSpec, max_tokens: int = 12) -> list[list[int]]:
    """Greedy tokens of PROMPTS through the runtime's scheduler and runner."""
    runner = ModelRunner(executor, kv_spec, 64, Sampler(set()), torch.float32)
    sched = Scheduler(SchedulerConfig(max_model_len=128, max_num_seqs=4,
                                      max_num_batched_tokens=TOKEN_BUDGET), 16, 64)
    core = EngineCore(runner, sched)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        core.add_request(Request(str(i), list(prompt), params))
    out: dict[str, list[int]] = {str(i): [] for i in range(len(PROMPTS))}
    while core.has_unfinished_requests():
        for o in core.step().outputs:
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(PROMPTS))]


def greedy_eager(model: torch.nn.Module) -> list[list[int]]:
    c = model.config
    spec = KVCacheSpec(c.num_layers, model.model.layers[0].self_attn.num_kv_heads, c.head_dim,
                       16, "float32")
    return greedy(EagerExecutor(model, torch.device("cpu")), spec)


def greedy_compiled(artifact: Path) -> list[list[int]]:
    from aotllm.runtime.artifact import CompiledExecutor, load_artifact

    loaded = load_artifact(artifact, torch.device("cpu"))
    return greedy(CompiledExecutor(loaded, torch.device("cpu")), loaded.kv_spec)


def _rank_main(rank: int, size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size,
                            init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = fn(rank, size, *args)
        if rank == 0:
            queue.put(result)
    finally:
        dist.destroy_process_group()


def run_ranks(size: int, fn: Callable, *args, timeout: float = 240.0):
    """fn(rank, size, *args) in `size` spawned ranks; rank 0's return value."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, size, port, fn, args, queue))
             for r in range(size)]
    for p in procs:
        p.start()
    try:
        result = queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return result


def eager_rank_tokens(rank: int, size: int, checkpoint: Path) -> list[list[int]]:
    from aotllm.models.loader import load_model
    from aotllm.models.parallel import TensorParallel

    return greedy_eager(load_model(checkpoint, "float32", tp=TensorParallel(rank, size)))


def compiled_rank_tokens(rank: int, size: int, artifact: Path) -> list[list[int]]:
    return greedy_compiled(artifact)
