"""Loading an artifact directory: validate, bind the weights once, load every graph.

Nothing here imports the compiler or torch._dynamo: a serving host needs only
torch's AOTInductor package loader.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from tqdm import tqdm

from aotllm.graphs.buckets import Bucket, BucketPlan
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import ArtifactError, Manifest, check_runtime_compat, verify_files
from aotllm.quantize.config import SCHEMES
from aotllm.runtime.model_runner import StepShape

logger = logging.getLogger(__name__)

GraphFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]

# Backends whose graph files this runtime can load.
RUNTIME_BACKENDS = ("inductor",)


def _load_inductor_graph(path: Path, device: torch.device, constants: dict) -> GraphFn:
    index = device.index if device.type == "cuda" and device.index is not None else -1
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
    names = loader.get_constant_fqns()
    missing = [n for n in names if n not in constants]
    if missing:
        raise ArtifactError(
            f"graph {path.name} needs weights that weights.safetensors lacks "
            f"({', '.join(missing[:4])}); the artifact is inconsistent: recompile it "
            "with `aotllm compile`"
        )
    # user_managed: the graph uses our tensors as they are, so every bucket
    # shares the one copy of the weights instead of holding its own.
    loader.load_constants({n: constants[n] for n in names}, False, True, True)
    return loader.run


def _read_weights(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Each weight in a fresh allocation of its own.

    safetensors hands out views into the memory-mapped file at offsets that
    are not even 64-byte aligned; oneDNN's bf16 matmuls read such weights ~15%
    slower. Copying tensor by tensor keeps the process at one copy.
    """
    weights = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in f.keys():
            src = f.get_tensor(name)
            weights[name] = torch.empty(src.shape, dtype=src.dtype, device=device).copy_(src)
    return weights


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


def load_artifact(path: str | Path, device: torch.device) -> LoadedArtifact:
    t0 = time.perf_counter()
    path = Path(path)
    manifest = Manifest.read(path)
    check_runtime_compat(
        manifest, torch_version=torch.__version__, backends=RUNTIME_BACKENDS, device=str(device),
        quantization_schemes=SCHEMES,
    )
    verify_files(manifest, path, check_hashes=True)
    try:
        weights = _read_weights(path / manifest.weights_file, device)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(
            f"cannot read {manifest.weights_file} in {path}: {e}. Recompile the artifact."
        ) from e
    constants = dict(weights)
    for alias, canonical in manifest.extra.get("weight_aliases", {}).items():
        constants[alias] = weights[canonical]
    graphs: dict[Bucket, GraphFn] = {}
    for entry in tqdm(manifest.graphs, desc="Loading graphs", unit="graph",
                      disable=len(manifest.graphs) < 4, dynamic_ncols=True):
        graphs[entry.bucket] = _load_inductor_graph(path / entry.file, device, constants)
    plan = manifest.bucket_plan()
    logger.info(
        "Loaded artifact %s: %s %s, %d prefill buckets (tokens %s), %d decode buckets "
        "(batch %s x context %s) in %.2f s",
        path, manifest.architecture, manifest.dtype, len(plan.prefill),
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

    def __call__(self, phase: str, shape: StepShape, *inputs) -> torch.Tensor:
        *tensors, kv_caches = inputs
        graph = self.graphs[Bucket(phase, shape.batch, shape.tokens, shape.context_blocks)]
        return graph([*tensors, *kv_caches])[0]
