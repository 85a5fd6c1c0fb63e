"""Runs ONNX artifacts (compiler/onnx.py) on onnxruntime's CPU provider.

One InferenceSession per bucket. The weights are read once (weights.safetensors,
like every backend) and handed to every session as the same OrtValues with
`SessionOptions.add_initializer`, which onnxruntime uses without copying or
constant-folding; with pre-packing switched off (it would pack a copy per
session) the process holds one copy however many buckets there are.

The KV caches are graph inputs and outputs (ONNX cannot mutate an input). With
IO binding each cache is bound as both `kv_cache_<i>` and `kv_cache_<i>_out`
on the runtime's own tensor: the graph's ScatterND then runs on one buffer and
onnxruntime skips its copy-then-scatter (measured: the write costs microseconds
where a separate output buffer costs a full cache copy). That is correct only
because the ScatterND is the one reader of the cache input, which the compiler
checks before it writes a graph.

onnxruntime is imported inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from aotllm.graphs.buckets import Bucket
from aotllm.graphs.manifest import ArtifactError, Manifest
from aotllm.runtime.graph_loaders import GraphFn, read_safetensors

# The graph signature's non-cache inputs, in order (compiler/onnx.py names them).
_NUM_STEP_INPUTS = 6
_NUMPY_DTYPES = {torch.float32: "float32", torch.int64: "int64", torch.float16: "float16",
                 torch.int8: "int8", torch.int32: "int32", torch.uint8: "uint8"}


def _numpy_dtype(t: torch.Tensor):
    import numpy as np

    try:
        return np.dtype(_NUMPY_DTYPES[t.dtype])
    except KeyError:
        raise ArtifactError(f"onnxruntime cannot bind a {t.dtype} tensor here") from None


class OnnxLoader:
    backend = "onnx"

    def __init__(self) -> None:
        # One OrtValue per weight tensor, shared by every session.
        self._ort_values: dict[int, object] = {}

    def check_available(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ArtifactError(
                f"onnx artifacts run on onnxruntime's CPU provider, not {device.type}; serve "
                "with device='cpu' (for Ascend, convert the graphs with ATC instead)"
            )
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise ArtifactError(
                "this is an onnx artifact and onnxruntime is not installed: "
                "pip install 'aotllm[onnx]'"
            ) from None

    def read_weights(self, artifact_dir: Path, manifest: Manifest,
                     device: torch.device) -> dict[str, torch.Tensor]:
        return read_safetensors(artifact_dir / manifest.weights_file, device)

    def _ort_value(self, tensor: torch.Tensor):
        import onnxruntime as ort

        key = id(tensor)
        if key not in self._ort_values:
            # Wraps the tensor's memory (no copy); the OrtValue keeps the array alive.
            self._ort_values[key] = (ort.OrtValue.ortvalue_from_numpy(tensor.numpy()), tensor)
        return self._ort_values[key][0]

    def load_graph(self, path: Path, bucket: Bucket, device: torch.device,
                   constants: dict[str, torch.Tensor], manifest: Manifest) -> GraphFn:
        import onnx
        import onnxruntime as ort

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and friends
            raise ArtifactError(f"cannot read {path}: {e}. Recompile the artifact.") from e
        weights = [i.name for i in proto.graph.initializer
                   if i.data_location == onnx.TensorProto.EXTERNAL]
        missing = [n for n in weights if n not in constants]
        if missing:
            raise ArtifactError(
                f"graph {path.name} needs weights that {manifest.weights_file} lacks "
                f"({', '.join(missing[:4])}); the artifact is inconsistent: recompile it"
            )
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        # onnxruntime pre-packs Gemm weights per session, even shared ones: a
        # second copy of every weight for each bucket. Measured on a 125M fp32
        # Llama (3 sessions): with pre-packing the sessions added 1208 MiB over
        # the 479 MiB of weights and a decode step took 64 ms, a 64-token
        # prefill 209 ms; without, 63 MiB, 25 ms and 103 ms.
        opts.add_session_config_entry("session.disable_prepacking", "1")
        shared = {name: self._ort_value(constants[name]) for name in weights}
        for name, value in shared.items():
            opts.add_initializer(name, value)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = _BoundGraph(session, bucket, path.name)
        # The session reads these buffers without owning them: the graph keeps
        # them (and the tensors under them) alive for as long as it lives.
        graph.keep_alive = [self._ort_values[id(constants[n])] for n in weights]
        return graph


class _BoundGraph:
    """A session called with the graph signature; caches bound in place."""

    def __init__(self, session, bucket: Bucket, name: str):
        self.session = session
        self.name = name
        self.inputs = [i.name for i in session.get_inputs()]
        outputs = session.get_outputs()
        self.outputs = [o.name for o in outputs]
        self.num_layers = len(self.inputs) - _NUM_STEP_INPUTS
        if self.num_layers < 1 or len(self.outputs) != 1 + self.num_layers:
            raise ArtifactError(
                f"{name} does not have the graph signature ({len(self.inputs)} inputs, "
                f"{len(self.outputs)} outputs); recompile the artifact"
            )
        self.logits_shape = (bucket.batch, int(outputs[0].shape[1]))
        # An int when the graphs were exported for a fixed cache size (ATC), else a name.
        self.num_blocks = session.get_inputs()[_NUM_STEP_INPUTS].shape[1]

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(tensors) != len(self.inputs):
            raise ValueError(f"{self.name} takes {len(self.inputs)} inputs, got {len(tensors)}")
        kv_caches = tensors[_NUM_STEP_INPUTS:]
        if isinstance(self.num_blocks, int) and kv_caches[0].shape[1] != self.num_blocks:
            raise ValueError(
                f"{self.name} was exported for exactly {self.num_blocks} KV blocks, the cache "
                f"has {kv_caches[0].shape[1]}; recompile with --num-gpu-blocks-override"
            )
        binding = self.session.io_binding()
        # Kept referenced until the run returns: onnxruntime reads raw pointers.
        inputs = [t.contiguous() for t in tensors]
        for name, t in zip(self.inputs, inputs):
            binding.bind_input(name, "cpu", 0, _numpy_dtype(t), tuple(t.shape), t.data_ptr())
        logits = torch.empty(self.logits_shape, dtype=torch.float32)
        binding.bind_output(self.outputs[0], "cpu", 0, _numpy_dtype(logits),
                            self.logits_shape, logits.data_ptr())
        for name, kv in zip(self.outputs[1:], kv_caches):
            if not kv.is_contiguous():
                raise ValueError(f"{self.name}: KV caches must be contiguous to update in place")
            # The same buffer as the input: ScatterND writes the new slots in place.
            binding.bind_output(name, "cpu", 0, _numpy_dtype(kv), tuple(kv.shape),
                                kv.data_ptr())
        self.session.run_with_iobinding(binding)
        return [logits]
