"""Tensor-parallel workers: one process per rank, the engine on rank 0 only.

Rank 0 runs the scheduler, the sampler and its own part of the model. Ranks
1..N-1 are spawned processes that load their part (an artifact's rank
weights file, or their slices of a checkpoint) and loop: receive a step's
inputs from rank 0 through two broadcasts on a control group of their own
(a header: command, phase, shape; then the six graph inputs as one int64
tensor), run the same graph on their own KV cache, drop the logits (every
rank has them, all-gathered; rank 0 samples). There is never a second
scheduler.

A rank that dies ends the group: gloo fails the next collective on the other
ranks when a peer's socket closes, rank 0 turns that into an error naming
the rank and its exit code, and the process group's timeout bounds any wait
that a closed socket does not end.

Ranks that torchrun started (every rank runs the user's program) join the
same way: rank 0's `LLM` becomes the engine, the other ranks' `LLM(...)`
calls serve rank 0's steps until its engine closes and then end the process
(`follow_launched`); there is still one scheduler.
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

# How long a collective inside a step (or the start-up rendezvous) may wait
# for a peer before the group fails.
GROUP_TIMEOUT = timedelta(seconds=float(os.environ.get("AOTLLM_TP_TIMEOUT_S", "60")))
# The workers wait for rank 0's next step on the control group, as long as an
# idle server has no requests: its timeout must not end an idle group. A dead
# rank 0 still ends the wait at once (its socket closes).
IDLE_TIMEOUT = timedelta(days=365)
_STEP, _STOP = 1, 0


def rank_threads(size: int) -> int:
    """Compute threads per rank on the CPU: the cores split between the ranks
    (AOTLLM_TP_THREADS overrides), so the ranks' OpenMP threads do not
    oversubscribe the cores and spin against each other."""
    if "AOTLLM_TP_THREADS" in os.environ:
        return max(1, int(os.environ["AOTLLM_TP_THREADS"]))
    return max(1, (os.cpu_count() or 1) // size)
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
    quantization: str | None = None  # eager path: the scheme every rank applies


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(spec: WorkerSpec, rank: int):
    """Joins the group the graphs' collectives run on, and returns a second,
    gloo group for rank 0's control broadcasts.

    The step inputs never travel on the graphs' group. They are Python
    tensors: gloo's worker thread may free the last reference to one after
    the broadcast, which takes the GIL, and it does so holding its group's
    queue lock (a stack dump caught it freeing a broadcast's tensor). An
    AOTInductor graph holds the GIL for its whole run, so when that happened
    inside a graph, the graph could not enqueue its next all-reduce and both
    ranks waited until the timeout (about half of the 10-token runs, torch
    2.13). See CompiledExecutor for the same deadlock through the graphs'
    own all-gather. On CUDA the graphs' group is nccl, and the inputs are
    host tensors anyway."""
    import torch.distributed as dist
    # Every rank imports the functional collectives before its group exists:
    # a rank 0 that had imported them (the compiler does) and a worker that
    # had not hung in the graphs' first collective (torch 2.13, gloo).
    import torch.distributed._functional_collectives  # noqa: F401

    backend = DISTRIBUTED_BACKENDS[torch.device(spec.device).type]
    dist.init_process_group(backend, rank=rank, world_size=spec.size,
                            init_method=spec.init_method, timeout=GROUP_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)


def launched_rank(size: int, device: torch.device) -> int | None:
    """This process's rank when ranks were launched by the user (torchrun, or a
    process group already initialised), None when aotllm starts them. Joins
    torchrun's group from its environment if the program has not."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    elif "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return None
        import torch.distributed._functional_collectives  # noqa: F401  (see _init_group)

        dist.init_process_group(DISTRIBUTED_BACKENDS[device.type], init_method="env://",
                                timeout=GROUP_TIMEOUT)
    else:
        return None
    if world != size:
        raise ValueError(
            f"{world} ranks were launched but the model is split across {size} "
            f"(tensor_parallel_size {size}): launch {size} (torchrun --nproc-per-node {size}), "
            "or start one process and let aotllm start the ranks")
    return dist.get_rank()


def _limit_threads(device: torch.device, size: int) -> None:
    """Rank 0's share of the cores (`rank_threads`), logged when it lowers
    the count this process had."""
    if device.type != "cpu":
        return
    threads = rank_threads(size)
    if torch.get_num_threads() != threads:
        logger.info("Tensor parallel on the CPU: %d compute thread(s) per rank (was %d in "
                    "this process; AOTLLM_TP_THREADS overrides)", threads,
                    torch.get_num_threads())
        torch.set_num_threads(threads)


class WorkerGroup:
    """Rank 0's handle on the other ranks."""

    def __init__(self, procs: list, control, owns_group: bool):
        self.procs = procs  # empty when torchrun started the ranks
        self.control = control
        self.owns_group = owns_group
        self.closed = False

    @classmethod
    def attach(cls) -> "WorkerGroup":
        """Rank 0 of ranks the user launched: the group exists already (torchrun
        sets OMP_NUM_THREADS=1 per rank; the program owns its thread count)."""
        import atexit

        import torch.distributed as dist

        group = cls([], dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT), False)
        atexit.register(group.close)
        return group

    @classmethod
    def start(cls, model: str, compiled: bool, dtype: str, device: torch.device,
              size: int, block_size: int = 16,
              quantization: str | None = None) -> "WorkerGroup":
        import atexit

        spec = WorkerSpec(model, compiled, dtype, str(device), size,
                          f"tcp://127.0.0.1:{_free_port()}", block_size, quantization)
        logger.info("Starting %d tensor-parallel worker processes", size - 1)
        _limit_threads(device, size)
        ctx = multiprocessing.get_context("spawn")
        # Daemons: they end with rank 0's process.
        procs = [ctx.Process(target=_worker_main, args=(spec, r), daemon=True,
                             name=f"aotllm-tp-rank{r}") for r in range(1, spec.size)]
        for p in procs:
            p.start()
        group = cls(procs, None, True)
        try:
            group.control = group._meet(spec)
        except Exception as e:
            group.closed = True
            for p in procs:
                p.join(timeout=0.5)
                p.kill()
            why = group.dead() or f"the ranks did not meet ({e})"
            raise RuntimeError(
                f"tensor-parallel ranks failed to start: {why}. The ranks are spawned "
                "processes that import your program's main module: guard its code with "
                "`if __name__ == \"__main__\":` (see the rank's own error above)") from None
        atexit.register(group.close)
        return group

    def _meet(self, spec: WorkerSpec):
        """Rank 0's side of the rendezvous, in a thread, so a rank that dies while
        starting (a program without a main guard dies at once) is an error now,
        not after the rendezvous timeout."""
        import threading

        result: dict = {}

        def meet() -> None:
            try:
                result["group"] = _init_group(spec, 0)
            except BaseException as e:  # noqa: BLE001 (re-raised in the caller)
                result["error"] = e

        # A daemon: if a rank died, the rendezvous it never joins must not
        # keep this process alive until its timeout.
        thread = threading.Thread(target=meet, name="aotllm-tp-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if thread.is_alive() and self.dead():
                raise RuntimeError(self.dead())
        if "error" in result:
            raise result["error"]
        return result["group"]

    def dead(self) -> str | None:
        gone = [(p.name, p.exitcode) for p in self.procs if p.exitcode is not None]
        if not gone:
            return None
        return ", ".join(f"{name} exited with code {code}" for name, code in gone)

    def broadcast(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        try:
            dist.broadcast(t, src=0, group=self.control)
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
                dist.broadcast(torch.tensor([_STOP, 0, 0, 0, 0]), src=0, group=self.control)
            except RuntimeError:
                pass
        for p in self.procs:
            p.join(timeout=5 if graceful else 0.1)
            if p.is_alive():
                p.kill()
        if self.owns_group and dist.is_initialized():
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
    from aotllm.models.checkpoint import open_checkpoint
    from aotllm.models.parallel import TensorParallel
    from aotllm.runtime.model_runner import EagerExecutor

    model = load_eager_rank(open_checkpoint(spec.model), spec.dtype, device,
                            TensorParallel(rank, spec.size), spec.quantization)
    return EagerExecutor(model, device), eager_kv_spec(model, spec.block_size), model.dtype


def load_eager_rank(source, dtype: str, device: torch.device, tp, quantization: str | None):
    """A rank's eager model. Float: only the rank's slices are read. With a
    scheme: the whole model is loaded and quantized (whole rows, so per-channel
    scales equal TP=1's), then cut to the rank's part, scales with their
    weights. Calibrated schemes calibrate on every rank; compile the model
    (`--tensor-parallel-size N`) to calibrate once."""
    from aotllm.quantize.modelslim import is_modelslim_checkpoint

    if quantization is None and not is_modelslim_checkpoint(source.path):
        from aotllm.models.loader import load_model

        return load_model(source, dtype, device, tp=tp)
    from aotllm.models.shard import shard_model
    from aotllm.quantize.config import QuantConfig
    from aotllm.quantize.load import load_quantized

    full, quant = load_quantized(source, dtype, device,
                                 QuantConfig(quantization) if quantization else None,
                                 source.load_tokenizer)
    return shard_model(full, tp, quant)


def eager_kv_spec(model, block_size: int):
    """A rank's cache: its own KV heads only."""
    from aotllm.graphs.kv_cache import KVCacheSpec

    c = model.config
    return KVCacheSpec(c.num_layers, model.model.layers[0].self_attn.num_kv_heads, c.head_dim,
                       block_size, str(model.dtype).removeprefix("torch."))


def follow(executor, kv_spec, kv_dtype: torch.dtype, device: torch.device, control) -> None:
    """A worker rank's loop: rank 0's KV block count, then each step's inputs,
    run on this rank's part and KV cache, until rank 0 says stop."""
    import torch.distributed as dist

    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=control)
    kv_caches = [torch.zeros(kv_spec.layer_shape(int(size)), dtype=kv_dtype, device=device)
                 for _ in range(kv_spec.num_layers)]
    header = torch.zeros(5, dtype=torch.int64)
    while True:
        dist.broadcast(header, src=0, group=control)
        cmd, phase, b, t, maxb = (int(x) for x in header)
        if cmd == _STOP:
            return
        shape = StepShape(b, t, maxb)
        flat = torch.empty(3 * b * t + b * maxb + 2 * b, dtype=torch.int64)
        dist.broadcast(flat, src=0, group=control)
        inputs = [x.to(device) for x in _split_inputs(flat, shape)]
        executor(_PHASES[phase], shape, *inputs, kv_caches)


def follow_launched(executor, kv_spec, kv_dtype: torch.dtype, device: torch.device):
    """A torchrun rank other than 0: serve rank 0's steps, then end the process
    (this rank's program must not go on as if it had an engine)."""
    import sys

    import torch.distributed as dist

    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    logger.info("Rank %d serves rank 0's engine until it closes", dist.get_rank())
    try:
        follow(executor, kv_spec, kv_dtype, device, control)
    except RuntimeError as e:
        logger.error("Rank %d: the tensor-parallel group failed: %s", dist.get_rank(), e)
        sys.exit(1)
    sys.exit(0)


def _worker_main(spec: WorkerSpec, rank: int) -> None:
    import torch.distributed as dist

    if spec.device == "cpu":
        torch.set_num_threads(rank_threads(spec.size))
    control = _init_group(spec, rank)
    executor, kv_spec, kv_dtype = _load(spec, rank)
    follow(executor, kv_spec, kv_dtype, torch.device(spec.device), control)
    dist.destroy_process_group()
