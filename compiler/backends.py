"""The compiler backend interface: a backend owns how one bucket becomes a file.

Each backend decides its own capture step (torch.export for Inductor and
ONNX, torch.compile for torchair's GE), the ops layer the model is built
with, how the weights are stored, and what holds for its graphs
(`BackendTraits`: KV written in place, a fixed or dynamic KV block count,
shared weights), which the manifest records. The runtime has a matching
loader per backend name (runtime/graph_loaders.py); the two halves share
nothing but the files and the manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from aotllm.graphs.buckets import Bucket
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import BackendTraits
from aotllm.models.ops import Ops

if TYPE_CHECKING:
    from aotllm.compiler.config import CompileConfig
    from aotllm.models.decoder import CausalLM


class GraphBackend(Protocol):
    name: str  # the manifest's `backend`, and the key of the runtime's loader registry
    file_suffix: str
    # Quantization schemes whose linears this backend has kernels for.
    quantization_schemes: frozenset[str]
    # The ops layer the model is built with for this backend (models/ops.py).
    ops: Ops

    def version(self) -> str:
        """Recorded in the manifest and in every bucket's reuse key."""
        ...

    def check_available(self) -> None:
        """Raise (ValueError) before any work when this host cannot compile for
        the backend, saying what to install or which host to use."""
        ...

    def traits(self) -> BackendTraits: ...

    # Optional: `load_device() -> torch.device`, where the pipeline loads the
    # model for capture when that is not `torch.device(cfg.device)` (the GE
    # backend: the NPU device type exists only once torch_npu is imported).

    # Optional: `check_model(config: ModelConfig) -> None`, raising (ValueError)
    # before the weights load when the backend cannot build this model (a
    # family feature its ops layer lacks), naming the feature and the backend.

    # Optional: `graph_groups(buckets, model=, quant=) -> [(graph bucket,
    # buckets it serves)]` when one graph serves several buckets (GE's
    # dimension gears, Inductor's --dynamic-shapes groups); the pipeline
    # compiles each graph bucket once and every bucket it serves names that
    # one file. Without it, each bucket has its own graph.

    def write_weights(self, model: "CausalLM", out_dir: Path) -> tuple[str, dict[str, str]]:
        """Store every weight once under `out_dir`, before any bucket compiles;
        returns (the file relative to `out_dir`, {alias: canonical} of tied tensors)."""
        ...

    def compile_bucket(self, model: "CausalLM", bucket: Bucket, spec: KVCacheSpec,
                       out_path: Path) -> None:
        """Capture `model` at `bucket`'s shapes and write its graph to `out_path`.

        The file must not carry its own copy of the weights: they are stored
        once per artifact (`write_weights`) and shared by every graph.
        """
        ...


def check_quantization(backend: GraphBackend, scheme: str | None) -> None:
    if scheme is not None and scheme not in backend.quantization_schemes:
        have = ", ".join(sorted(backend.quantization_schemes)) or "none"
        raise ValueError(
            f"the {backend.name} backend has no kernel for {scheme} linears (it has: {have}); "
            "choose one of those schemes or another --backend"
        )


# name -> "module:class"; imported only when chosen, so one backend's
# toolchain (torchair, onnx) is never needed by another's.
BACKENDS = {
    "inductor": "aotllm.compiler.inductor:InductorBackend",
    "onnx": "aotllm.compiler.onnx:OnnxBackend",
    "ge": "aotllm.compiler.ge:GeBackend",
}


def get_backend(cfg: "CompileConfig") -> GraphBackend:
    if cfg.backend not in BACKENDS:
        raise ValueError(
            f"unknown compiler backend {cfg.backend!r}; available: {', '.join(BACKENDS)}"
        )
    import importlib

    module, cls = BACKENDS[cfg.backend].split(":")
    return getattr(importlib.import_module(module), cls)(cfg)
