"""Runtime loader for `--backend ge` artifacts, on Ascend hosts only.

UNVERIFIED: written without Ascend hardware; nothing below has run on an NPU.
This is the one loader that imports torch_npu and torchair: GE graphs run
through torchair, which is this backend's runtime, so the serving host needs
torch_npu (with torchair inside it) and CANN. Elsewhere `check_available`
raises ArtifactError saying so, before anything is loaded.

How it runs a bucket: the model is rebuilt from the manifest with NpuOps,
its parameters bound to the artifact's one copy of the weights (no copy),
and `model.forward` goes through torchair's `cache_compile` with the
bucket's cache directory (`ge_cache/<bucket>-kv<num_blocks>`, written at
compile time), so a cached graph loads instead of recompiling, and a KV
size other than the compiled one is refused rather than silently reused.
The `.air` files are for offline deployment (GE/ATC), not read here.
A quantized artifact's model is rebuilt from the manifest's quantization
record (quantize.apply.quantized_skeleton) and takes the compile-time
layout (models.npu_ops.prepare: int8 weights [in, out], buffers as frozen
Parameters) before the weights are bound.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aotllm.graphs.manifest import ArtifactError
from aotllm.runtime.graph_loaders import GraphFn, read_safetensors

NEEDS_TORCH_NPU = (
    "this artifact holds GE graphs (--backend ge), which run only on an Ascend NPU "
    "host with torch_npu and CANN (pip install 'aotllm[ascend]', source CANN's "
    "set_env.sh); here {why}. Recompile the model with --backend inductor to serve it "
    "on this host."
)


class GeLoader:
    backend = "ge"

    def __init__(self) -> None:
        self._model = None  # one model for every bucket: one copy of the weights
        # Buckets that share a geared graph (--ge-dim-gears) name one file: load it once.
        self._graphs: dict[Path, GraphFn] = {}

    def check_available(self, device: torch.device) -> None:
        try:
            import torch_npu  # noqa: F401
            import torchair  # noqa: F401
        except Exception as e:  # ImportError, or OSError from missing CANN libraries
            raise ArtifactError(NEEDS_TORCH_NPU.format(why=f"import torch_npu failed: {e}")) from None
        if device.type != "npu":
            raise ArtifactError(NEEDS_TORCH_NPU.format(why=f"the device is {device.type}"))

    def read_weights(self, artifact_dir: Path, manifest, device: torch.device):
        return read_safetensors(artifact_dir / manifest.weights_file, device)

    def _bound_model(self, manifest, constants: dict[str, torch.Tensor], device: torch.device):
        if self._model is not None:
            return self._model
        from aotllm.models.config import ModelConfig
        from aotllm.models.npu_ops import NpuOps, prepare
        from aotllm.models.registry import build_model

        dtype = getattr(torch, manifest.dtype)
        tp = None
        if manifest.tensor_parallel_size > 1:  # this rank's part (load_artifact checked the group)
            import torch.distributed as dist

            from aotllm.models.parallel import TensorParallel

            tp = TensorParallel(dist.get_rank(), manifest.tensor_parallel_size)
        with torch.device("meta"):
            model = build_model(ModelConfig.from_hf_dict(manifest.model_config), dtype, NpuOps,
                                tp)
        if manifest.quantization is not None:
            from aotllm.quantize.apply import quantized_skeleton

            try:
                quantized_skeleton(model, manifest.quantization)
            except (KeyError, ValueError) as e:
                raise ArtifactError(f"the manifest's quantization record does not fit the "
                                    f"model ({e}); recompile the artifact") from None
        # The compile-time layout and names: int8 weights [in, out], buffers
        # as frozen Parameters.
        prepare(model)
        names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
        missing = [n for n in names if n not in constants]
        if missing:
            raise ArtifactError(f"{manifest.weights_file} lacks weights the GE model needs "
                                f"({', '.join(missing[:4])}); recompile the artifact")
        state = {name: constants[name] for name in names}
        model.load_state_dict(state, strict=True, assign=True)
        self._model = model.eval()
        return model

    def load_graph(self, path: Path, bucket, device: torch.device,
                   constants: dict[str, torch.Tensor], manifest) -> GraphFn:
        from aotllm.models.npu_ops import GE_CACHE_DIR, ge_compiler_config, import_torchair_ops

        if path in self._graphs:
            return self._graphs[path]
        model = self._bound_model(manifest, constants, device)
        num_blocks = manifest.backend_traits.num_blocks
        # Named after the graph's own bucket (the file's stem), which for a
        # geared graph is the largest batch it serves, not `bucket`.
        cache = path.parent.parent / GE_CACHE_DIR / f"{path.stem}-kv{num_blocks}"
        if manifest.tensor_parallel_size > 1:
            # Compiled per rank on first use (compiler/ge.py says why): a cache
            # miss makes torchair compile the graph and fill the directory.
            cache.mkdir(parents=True, exist_ok=True)
        elif not cache.is_dir():
            raise ArtifactError(f"{cache} is missing: the artifact has no compiled-graph "
                                f"cache for {path.stem} at {num_blocks} KV blocks; recompile it")
        torchair = import_torchair_ops()
        fn = torchair.inference.cache_compile(
            model.forward, config=ge_compiler_config(torchair), dynamic=False,
            cache_dir=str(cache), ge_cache=True)

        def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # input_ids .. query_lens, then one KV cache per layer.
            with torch.no_grad():
                return [fn(*inputs[:6], list(inputs[6:]))]

        self._graphs[path] = run
        return run
