"""The runtime's half of the backend seam: one graph loader per manifest backend.

A loader turns a graph file of its backend into a callable with the graph
signature, binding the artifact's one copy of the weights. The registry is
keyed by the manifest's `backend`; each loader imports its backend's runtime
(AOTInductor's package loader, onnxruntime, torchair) only when chosen, and
nothing here imports the compiler or torch._dynamo.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable, Protocol

import torch
from safetensors import safe_open

from aotllm.graphs.buckets import Bucket
from aotllm.graphs.manifest import (
    WEIGHTS_ALIGNMENT,
    WEIGHTS_PAD_PREFIX,
    ArtifactError,
    Manifest,
)

logger = logging.getLogger(__name__)

# inputs: input_ids, positions, slot_mapping, block_tables, context_lens,
# query_lens, *kv_caches (tensors the runtime owns). Returns a list whose [0]
# is the [B, vocab] float32 logits; when it returns, the KV caches hold this
# step's K/V (the loader's job where the graph returns them instead).
GraphFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class GraphLoader(Protocol):
    backend: str

    def check_available(self, device: torch.device) -> None:
        """Raise ArtifactError when this host cannot run the backend's graphs on
        `device`, saying what to install."""
        ...

    def read_weights(self, artifact_dir: Path, manifest: Manifest,
                     device: torch.device) -> dict[str, torch.Tensor]:
        """The artifact's weights, one copy, on `device`, by constant name."""
        ...

    def load_graph(self, path: Path, bucket: Bucket, device: torch.device,
                   constants: dict[str, torch.Tensor], manifest: Manifest) -> GraphFn: ...


def read_safetensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """The weights by name, one copy in the process.

    On the CPU each tensor is a view of safetensors' memory map of the file
    (copy-on-write, so nothing the process does can change the file): loading
    costs page faults, not a read and a copy of every byte, and processes
    serving the same artifact share its pages. A weight that does not start
    at a multiple of WEIGHTS_ALIGNMENT bytes (a file written before aotllm
    aligned them) is copied into an allocation of its own instead: oneDNN's
    bf16 matmuls read misaligned weights ~15% slower. Elsewhere each tensor
    is copied to the device.
    """
    weights = {}
    copied = 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.startswith(WEIGHTS_PAD_PREFIX):
                    continue
                src = f.get_tensor(name)
                if device.type == "cpu" and src.data_ptr() % WEIGHTS_ALIGNMENT == 0:
                    weights[name] = src
                    continue
                copied += device.type == "cpu"
                weights[name] = torch.empty(src.shape, dtype=src.dtype, device=device).copy_(src)
    except Exception as e:  # safetensors raises its own error types
        raise ArtifactError(
            f"cannot read {path.name} in {path.parent}: {e}. Recompile the artifact."
        ) from e
    if copied:
        logger.info("%d of %d weights in %s are not %d-byte aligned and were copied; "
                    "recompile the artifact to map them instead", copied, len(weights),
                    path, WEIGHTS_ALIGNMENT)
    return weights


class InductorLoader:
    """AOTInductor packages; the weights are bound with user_managed=True, so
    every bucket shares the one copy."""

    backend = "inductor"

    def __init__(self) -> None:
        # A graph file serving several buckets (--dynamic-shapes) is loaded once.
        self._loaded: dict[Path, GraphFn] = {}

    def check_available(self, device: torch.device) -> None:
        if device.type not in ("cpu", "cuda"):
            raise ArtifactError(f"inductor artifacts run on cpu or cuda, not {device.type}")

    def read_weights(self, artifact_dir, manifest, device):
        return read_safetensors(artifact_dir / manifest.weights_file, device)

    def load_graph(self, path, bucket, device, constants, manifest) -> GraphFn:
        if path not in self._loaded:
            self._loaded[path] = self._load(path, device, constants, manifest)
        return self._loaded[path]

    def _load(self, path, device, constants, manifest) -> GraphFn:
        index = device.index if device.type == "cuda" and device.index is not None else -1
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
        names = loader.get_constant_fqns()
        missing = [n for n in names if n not in constants]
        if missing:
            raise ArtifactError(
                f"graph {path.name} needs weights that {manifest.weights_file} lacks "
                f"({', '.join(missing[:4])}); the artifact is inconsistent: recompile it "
                "with `aotllm compile`"
            )
        # user_managed: the graph uses our tensors as they are, so every bucket
        # shares the one copy of the weights instead of holding its own.
        loader.load_constants({n: constants[n] for n in names}, False, True, True)
        return loader.run


# manifest backend -> "module:class", imported when an artifact names it.
LOADERS: dict[str, str] = {
    "inductor": "aotllm.runtime.graph_loaders:InductorLoader",
    "onnx": "aotllm.runtime.onnx_loader:OnnxLoader",
    # Ascend hosts only (imports torch_npu/torchair when an artifact names it).
    "ge": "aotllm.runtime.ge_loader:GeLoader",
}


def get_loader(backend: str) -> GraphLoader:
    if backend not in LOADERS:
        raise ArtifactError(
            f"this aotllm has no loader for {backend!r} graphs (it loads: "
            f"{', '.join(LOADERS)}); upgrade aotllm or recompile with one of those backends"
        )
    module, cls = LOADERS[backend].split(":")
    return getattr(importlib.import_module(module), cls)()
