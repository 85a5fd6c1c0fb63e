"""Loading an artifact directory: validate, bind the weights once, load every graph.

Nothing here imports the compiler or torch._dynamo: a serving host needs only
the runtime of the artifact's backend (runtime/graph_loaders.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from aotllm.graphs.buckets import Bucket, BucketPlan, group_rows
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import (
    ArtifactError,
    Manifest,
    check_files,
    check_runtime_compat,
    check_world_size,
)
from aotllm.models import compact_linear
from aotllm.quantize.config import SCHEMES
from aotllm.runtime.graph_loaders import LOADERS, GraphFn, get_loader
from aotllm.runtime.model_runner import StepShape

logger = logging.getLogger(__name__)


@dataclass
class LoadedArtifact:
    path: Path
    manifest: Manifest
    plan: BucketPlan
    kv_spec: KVCacheSpec
    weights: dict[str, torch.Tensor]
    graphs: dict[Bucket, GraphFn]

    @property
    def weights_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())


def _process_group() -> tuple[int, int]:
    """(rank, world size) of this process's torch.distributed group; (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def load_artifact(path: str | Path, device: torch.device) -> LoadedArtifact:
    """Loads this process's part: under tensor parallelism (a process group of
    the artifact's size, e.g. ranks started by torchrun) the
    rank's weights file, bound to the graphs every rank shares."""
    t0 = time.perf_counter()
    path = Path(path)
    manifest = Manifest.read(path)
    rank, world_size = _process_group()
    check_world_size(manifest, world_size)
    check_runtime_compat(
        manifest, torch_version=torch.__version__, backends=LOADERS, device=str(device),
        quantization_schemes=SCHEMES,
    )
    loader = get_loader(manifest.backend)
    loader.check_available(device)
    # Sizes and sampled digests, not a full hash of every byte on every
    # start: that is `aotllm verify`'s job (graphs/file_digest.py says why).
    check_files(manifest, path)
    weights_file, weights_sha256 = manifest.weights_for_rank(rank)
    weights = loader.read_weights(
        path, dataclasses.replace(manifest, weights_file=weights_file,
                                  weights_sha256=weights_sha256), device)
    constants = dict(weights)
    for library, _ in manifest.kernel_libraries:  # before the graphs that call into them
        try:
            compact_linear.load_library(path / library)
        except OSError as e:
            raise ArtifactError(f"cannot load the kernel library {path / library} ({e}); it "
                                "was built for another machine or torch: recompile the "
                                "artifact with `aotllm compile` here") from None
    for alias, canonical in manifest.extra.get("weight_aliases", {}).items():
        constants[alias] = weights[canonical]
    graphs: dict[Bucket, GraphFn] = {}
    for entry in tqdm(manifest.graphs, desc="Loading graphs", unit="graph",
                      disable=len(manifest.graphs) < 4, dynamic_ncols=True):
        graphs[entry.bucket] = loader.load_graph(path / entry.file, entry.bucket, device,
                                                 constants, manifest)
    plan = manifest.bucket_plan()
    logger.info(
        "Loaded artifact %s: %s %s (%s), %d prefill buckets (tokens %s), %d decode buckets "
        "(batch %s x context %s) in %.2f s",
        path, manifest.architecture, manifest.dtype, manifest.backend, len(plan.prefill),
        sorted({b.tokens for b in plan.prefill}), len(plan.decode),
        sorted({b.batch for b in plan.decode}),
        sorted({b.context_blocks * plan.block_size for b in plan.decode}),
        time.perf_counter() - t0,
    )
    return LoadedArtifact(path, manifest, plan, manifest.kv_cache_spec(), weights, graphs)


class CompiledExecutor:
    """Runs each step on the graph of the cheapest bucket that fits it."""

    def __init__(self, artifact: LoadedArtifact, device: torch.device):
        self.plan = artifact.plan
        self.graphs = artifact.graphs
        self.device = device

    def max_batch(self, phase: str) -> int:
        buckets = self.plan.prefill if phase == "prefill" else self.plan.decode
        return max(b.batch for b in buckets)

    def padded_shape(self, phase: str, shape: StepShape) -> StepShape:
        bucket = self.plan.bucket_for(
            phase, shape.batch, shape.tokens, shape.context_blocks * self.plan.block_size
        )
        return StepShape(bucket.batch, bucket.tokens, bucket.context_blocks)

    def group_rows(self, phase: str, rows: list[StepShape],
                   depends_on: list[list[int]]) -> list[list[int]]:
        limit = self.max_batch(phase)
        if phase == "decode":
            # Decode reads every weight once per call whatever the batch: the
            # fewest calls win, so rows go in order, as many per call as fit.
            return [list(range(i, min(i + limit, len(rows)))) for i in range(0, len(rows), limit)]
        bs = self.plan.block_size
        groups = group_rows(self.plan.prefill, [(r.tokens, r.context_blocks * bs) for r in rows],
                            block_size=bs, depends_on=depends_on)
        return [members for _, members in groups]

    # Inference mode, as the eager path: besides skipping autograd bookkeeping,
    # it keeps the views that gloo cuts inside an in-graph all-gather free of
    # autograd view metadata. Those views are freed on gloo's worker thread,
    # and freeing view metadata takes the GIL, which an AOTInductor graph
    # holds for its whole run (torch 2.13): when the freeing fell inside the
    # next graph call, the worker thread waited for the GIL while holding
    # gloo's queue lock, the graph waited for that lock to enqueue its first
    # all-reduce, and the other rank waited in that all-reduce (stack dumps of
    # TP runs beside a busy core, or with 2 threads per rank on 2 cores).
    @torch.inference_mode()
    def __call__(self, phase: str, shape: StepShape, *inputs) -> torch.Tensor:
        *tensors, kv_caches = inputs
        graph = self.graphs[Bucket(phase, shape.batch, shape.tokens, shape.context_blocks)]
        return graph([*tensors, *kv_caches])[0]
