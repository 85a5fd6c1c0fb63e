"""Tensor-parallel workers: one process per rank, the engine on rank 0 only.

Rank 0 runs the scheduler, the sampler and its own part of the model. Ranks
1..N-1 are spawned processes that load their part (an artifact's rank
weights file, or their slices of a checkpoint) and loop: receive a step's
inputs from rank 0 through two broadcasts (a header: command, phase, shape;
then the six graph inputs as one int64 tensor), run the same graph on their
own KV cache, drop the logits (every rank has them, all-gathered; rank 0
samples). There is never a second scheduler.

A rank that dies ends the group: gloo fails the next collective on the other
ranks when a peer's socket closes, rank 0 turns that into an error naming
the rank and its exit code, and the process group's timeout bounds any wait
that a closed socket does not end.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

from aotllm.graphs.devices import DISTRIBUTED_BACKENDS
from aotllm.runtime.model_runner import StepShape

logger = logging.getLogger(__name__)

# How long a collective may wait for a peer before the group fails.
GROUP_TIMEOUT = timedelta(seconds=float(os.environ.get("AOTLLM_TP_TIMEOUT_S", "60")))
_STEP, _STOP = 1, 0
_PHASES = ("prefill", "decode")


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank needs to load its part (plain data: it is pickled to spawn)."""

    model: str  # artifact directory, or checkpoint for the eager path
    compiled: bool
    dtype: str
    device: str
    size: int
    init_method: str
    block_size: int = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(spec: WorkerSpec, rank: int) -> None:
    import torch.distributed as dist
    # Every rank imports the functional collectives before its group exists:
    # a rank 0 that had imported them (the compiler does) and a worker that
    # had not hung in the graphs' first collective (torch 2.13, gloo).
    import torch.distributed._functional_collectives  # noqa: F401

    backend = DISTRIBUTED_BACKENDS[torch.device(spec.device).type]
    dist.init_process_group(backend, rank=rank, world_size=spec.size,
                            init_method=spec.init_method, timeout=GROUP_TIMEOUT)


class WorkerGroup:
    """Rank 0's handle on the other ranks."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        ctx = multiprocessing.get_context("spawn")
        # Daemons: they end with rank 0's process.
        self.procs = [ctx.Process(target=_worker_main, args=(spec, r), daemon=True,
                                  name=f"aotllm-tp-rank{r}") for r in range(1, spec.size)]
        for p in self.procs:
            p.start()
        _init_group(spec, 0)
        self.closed = False

    @classmethod
    def start(cls, model: str, compiled: bool, dtype: str, device: torch.device,
              size: int, block_size: int = 16) -> "WorkerGroup":
        import atexit

        spec = WorkerSpec(model, compiled, dtype, str(device), size,
                          f"tcp://127.0.0.1:{_free_port()}", block_size)
        logger.info("Starting %d tensor-parallel worker processes", size - 1)
        group = cls(spec)
        atexit.register(group.close)
        return group

    def dead(self) -> str | None:
        gone = [(p.name, p.exitcode) for p in self.procs if p.exitcode is not None]
        if not gone:
            return None
        return ", ".join(f"{name} exited with code {code}" for name, code in gone)

    def broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast(t, src=0)
        except RuntimeError as e:
            raise self.failure(e) from e

    def failure(self, e: BaseException) -> RuntimeError:
        import time

        # The socket of a dead rank closes before its exit code is reaped.
        for _ in range(20):
            if self.dead():
                break
            time.sleep(0.05)
        why = self.dead() or f"a collective failed ({e})"
        self.close(graceful=False)
        return RuntimeError(f"tensor-parallel group failed: {why}. The engine cannot "
                            "continue; start it again")

    def close(self, graceful: bool = True) -> None:
        import torch.distributed as dist

        if self.closed:
            return
        self.closed = True
        if graceful and not self.dead():
            try:
                dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0]), src=0)
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=5 if graceful else 0.1)
            if p.is_alive():
                p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()


class BroadcastExecutor:
    """Rank 0's executor: sends each call's inputs to the other ranks, then runs
    its own part (the graph's all-reduces meet the other ranks' there)."""

    def __init__(self, inner, group: WorkerGroup):
        self.inner = inner
        self.group = group
        self.device = inner.device

    def start(self, num_blocks: int) -> None:
        """Tells the workers the KV cache size rank 0 chose, so every rank
        allocates the same number of blocks."""
        self.group.broadcast(torch.tensor([num_blocks]))

    def max_batch(self, phase):
        return self.inner.max_batch(phase)

    def padded_shape(self, phase, shape):
        return self.inner.padded_shape(phase, shape)

    def group_rows(self, phase, rows, depends_on):
        return self.inner.group_rows(phase, rows, depends_on)

    def __call__(self, phase: str, shape: StepShape, *inputs) -> torch.Tensor:
        *tensors, kv_caches = inputs
        header = torch.tensor([_STEP, _PHASES.index(phase), shape.batch, shape.tokens,
                               shape.context_blocks])
        self.group.broadcast(header)
        self.group.broadcast(torch.cat([t.reshape(-1).cpu() for t in tensors]))
        try:
            return self.inner(phase, shape, *tensors, kv_caches)
        except RuntimeError as e:
            raise self.group.failure(e) from e


def _split_inputs(flat: torch.Tensor, shape: StepShape) -> list[torch.Tensor]:
    b, t, maxb = shape.batch, shape.tokens, shape.context_blocks
    n = b * t
    ids, pos, slots, tables, ctx, qlens = flat.split((n, n, n, b * maxb, b, b))
    return [ids.view(b, t), pos.view(b, t), slots, tables.view(b, maxb), ctx, qlens]


def _load(spec: WorkerSpec, rank: int):
    """(executor, KV cache spec, KV dtype) of this rank."""
    device = torch.device(spec.device)
    if spec.compiled:
        from aotllm.runtime.artifact import CompiledExecutor, load_artifact

        artifact = load_artifact(spec.model, device)
        return (CompiledExecutor(artifact, device), artifact.kv_spec,
                getattr(torch, artifact.manifest.dtype))
    from aotllm.models.loader import load_model
    from aotllm.models.parallel import TensorParallel
    from aotllm.runtime.model_runner import EagerExecutor

    model = load_model(spec.model, spec.dtype, device, tp=TensorParallel(rank, spec.size))
    return EagerExecutor(model, device), eager_kv_spec(model, spec.block_size), model.dtype


def eager_kv_spec(model, block_size: int):
    """A rank's cache: its own KV heads only."""
    from aotllm.graphs.kv_cache import KVCacheSpec

    c = model.config
    return KVCacheSpec(c.num_layers, model.model.layers[0].self_attn.num_kv_heads, c.head_dim,
                       block_size, str(model.dtype).removeprefix("torch."))


def _worker_main(spec: WorkerSpec, rank: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(os.environ.get("AOTLLM_TP_THREADS", "1"))))
    _init_group(spec, rank)
    executor, kv_spec, kv_dtype = _load(spec, rank)
    device = torch.device(spec.device)
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    kv_caches = [torch.zeros(kv_spec.layer_shape(int(size)), dtype=kv_dtype, device=device)
                 for _ in range(kv_spec.num_layers)]
    header = torch.zeros(5, dtype=torch.int64)
    while True:
        dist.broadcast(header, src=0)
        cmd, phase, b, t, maxb = (int(x) for x in header)
        if cmd == _STOP:
            break
        shape = StepShape(b, t, maxb)
        flat = torch.empty(3 * b * t + b * maxb + 2 * b, dtype=torch.int64)
        dist.broadcast(flat, src=0)
        inputs = [x.to(device) for x in _split_inputs(flat, shape)]
        executor(_PHASES[phase], shape, *inputs, kv_caches)
    dist.destroy_process_group()
