"""ONNX backend: one .onnx graph per bucket, for onnxruntime and for Ascend's ATC.

Layout inside the artifact::

    graphs/weights.safetensors   every weight once (the default safetensors file)
    graphs/<bucket>.onnx         the graph; its weight initializers are ONNX
                                 external data pointing into weights.safetensors
                                 (location, offset, length), so no graph file
                                 carries a copy and each one is a complete,
                                 standard ONNX model on its own

The weights sit next to the graphs because onnx.checker and onnxruntime both
refuse external data outside the model's own directory ("../" is rejected).

Graph signature (every bucket): inputs input_ids[B,T], positions[B,T],
slot_mapping[B*T], block_tables[B,MAXB], context_lens[B], query_lens[B],
kv_cache_<i>[2, num_blocks, block_size, Hkv, D]; outputs logits[B, vocab]
float32 and kv_cache_<i>_out, the updated caches. ONNX has no in-place
mutation, so the model's write into the cache comes out as a ScatterND whose
result is a graph output; this module checks that the ScatterND is the only
reader of each cache input, which is what makes it safe for the runtime to bind
one buffer as both kv_cache_<i> and kv_cache_<i>_out (runtime/onnx_loader.py).
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from aotllm.graphs.buckets import Bucket
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import GRAPHS_DIR, BackendTraits
from aotllm.models.onnx_ops import OnnxOps

# ATC (CANN 8.0) documents ai.onnx opsets 11-15 for --framework=5; torch 2.13's
# exporter writes 18 or later (its translations are written for 18), so 18 it is.
OPSET = 18
WEIGHTS_NAME = "weights.safetensors"
INPUT_NAMES = ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens",
               "query_lens")
# What onnxruntime's CPU provider (1.32) runs these graphs in. float16 runs
# (logits within ~4e-3 of eager float16 on the tiny test model) and is what
# ATC wants; bfloat16 fails at session creation (no bfloat16 Mul kernel).
RUNTIME_DTYPES = ("float32", "float16")
# Initializers that are not model weights (index constants, shapes) stay inside
# the graph file; anything bigger than this that is not a weight means the
# exporter derived a second copy of one (a folded transpose, say).
_MAX_INLINE_BYTES = 4096


def kv_input(layer: int) -> str:
    return f"kv_cache_{layer}"


def kv_output(layer: int) -> str:
    return f"kv_cache_{layer}_out"


@dataclass(frozen=True)
class _Stored:
    offset: int  # from the start of the file
    length: int
    dtype: str  # safetensors' name, e.g. "F32"
    shape: tuple[int, ...]


def read_safetensors_index(path: Path) -> dict[str, _Stored]:
    """Where each tensor's bytes lie in a safetensors file (header only)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        name: _Stored(base + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0],
                      e["dtype"], tuple(e["shape"]))
        for name, e in header.items() if name != "__metadata__"
    }


class _WithKVOutputs(torch.nn.Module):
    """Returns the caches the model wrote into, so the export has them as outputs
    (the exporter drops mutations of inputs that are not returned)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.m = model

    def forward(self, input_ids, positions, slot_mapping, block_tables, context_lens,
                query_lens, kv_caches):
        logits = self.m(input_ids, positions, slot_mapping, block_tables, context_lens,
                        query_lens, kv_caches)
        return (logits, *kv_caches)


class OnnxBackend:
    name = "onnx"
    file_suffix = ".onnx"
    quantization_schemes = frozenset({"w8a16", "w8a8", "w8a8_static"})
    ops = OnnxOps

    def __init__(self, cfg):
        if cfg.device != "cpu":
            raise ValueError(
                f"the onnx backend exports on cpu (the graphs are device-neutral; "
                f"onnxruntime runs them on cpu, ATC converts them for Ascend), not "
                f"{cfg.device!r}: pass --device cpu"
            )
        self.dtype = cfg.dtype
        self.num_blocks: int | None = cfg.num_gpu_blocks_override
        self._weights: dict[str, _Stored] = {}
        self._aliases: dict[str, str] = {}
        self._weights_path: Path | None = None

    def version(self) -> str:
        import onnx
        import onnxscript

        return f"torch-{torch.__version__}+onnxscript-{onnxscript.__version__}" \
               f"+onnx-{onnx.__version__}+opset{OPSET}"

    def check_available(self) -> None:
        missing = []
        for module in ("onnx", "onnxscript"):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
        if missing:
            raise ValueError(
                f"--backend onnx needs {' and '.join(missing)}: pip install 'aotllm[onnx]'"
            )
        self._check_dtype(self.dtype)
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"--num-gpu-blocks-override must be at least 2 (block 0 is the "
                             f"null block), got {self.num_blocks}")

    @staticmethod
    def _check_dtype(dtype: str) -> None:
        if dtype not in ("auto", *RUNTIME_DTYPES):
            raise ValueError(
                f"--backend onnx compiles float32 or float16, not {dtype}: onnxruntime's "
                f"CPU provider has no {dtype} kernels for these graphs (Mul, Gemm). Pass "
                "--dtype float32 or --dtype float16"
            )

    def traits(self) -> BackendTraits:
        # The graphs return the caches; the onnxruntime loader aliases them back.
        return BackendTraits(kv_in_place=False, num_blocks=self.num_blocks,
                             shared_weights=True)

    def write_weights(self, model, out_dir: Path) -> tuple[str, dict[str, str]]:
        from aotllm.compiler.weights import write_safetensors

        self._check_dtype(str(model.dtype).removeprefix("torch."))
        graphs = out_dir / GRAPHS_DIR
        graphs.mkdir(parents=True, exist_ok=True)
        name, aliases = write_safetensors(model, graphs)
        assert name == WEIGHTS_NAME, name
        self._weights_path = graphs / name
        self._weights = read_safetensors_index(self._weights_path)
        self._aliases = aliases
        return f"{GRAPHS_DIR}/{name}", aliases

    def compile_bucket(self, model, bucket: Bucket, spec: KVCacheSpec, out_path: Path) -> None:
        import onnx
        import onnx_ir as ir

        if self._weights_path is None:
            raise RuntimeError("write_weights must run before compile_bucket")
        program = self._export(model, bucket, spec)
        with torch.no_grad():
            onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=OPSET,
                                             optimize=False, verbose=False)
        self._optimize(onnx_program.model)
        graph = onnx_program.model.graph
        for node in graph:
            # The exporter's per-node provenance (FX node text, module path) is
            # ~90% of a graph file's bytes and no runtime reads it.
            node.metadata_props.clear()
        _drop_identity_transposes(graph)
        _name_signature(graph, spec.num_layers, dynamic=self.num_blocks is None)
        _check_kv_written_once(graph, spec.num_layers)
        self._externalize_weights(graph)
        proto = ir.serde.serialize_model(onnx_program.model)
        onnx.save(proto, str(out_path))
        self._check(out_path)

    def _export(self, model, bucket: Bucket, spec: KVCacheSpec) -> torch.export.ExportedProgram:
        from torch.export import Dim

        from aotllm.compiler.export import example_inputs

        args = list(example_inputs(bucket, spec, model.dtype, torch.device("cpu")))
        if self.num_blocks is not None:
            # ATC needs every shape static: the cache size is fixed here, once.
            # empty, not zeros: export reads only shapes, and a serving-sized
            # cache would otherwise be written through once per bucket.
            args[-1] = [torch.empty(spec.layer_shape(self.num_blocks), dtype=model.dtype)
                        for _ in range(spec.num_layers)]
            dynamic_shapes = None
        else:
            num_blocks = Dim("num_blocks", min=2)
            dynamic_shapes = (None,) * 6 + ([{1: num_blocks}] * spec.num_layers,)
        with torch.no_grad():
            return torch.export.export(_WithKVOutputs(model), tuple(args),
                                       dynamic_shapes=dynamic_shapes, strict=False)

    def _is_weight(self, value) -> bool:
        if not value.is_initializer():
            return False
        name = value.name.removeprefix("m.")
        return self._aliases.get(name, name) in self._weights

    def _optimize(self, model) -> None:
        """The exporter's own clean-up (constant folding, CSE, inlining its
        CastLike/SequenceAt helpers, which ATC does not list), except that no node
        reading a weight is folded: folding Cast(int8 weight) would bake a float
        copy of the weight into every graph file."""
        from onnxscript.optimizer import optimize_ir

        def should_fold(node) -> bool | None:
            # Shape/Size and CastLike's second input read only a weight's type or shape.
            if node.op_type in ("Shape", "Size"):
                return None
            read = node.inputs[:1] if node.op_type == "CastLike" else node.inputs
            return False if any(v is not None and self._is_weight(v) for v in read) else None

        optimize_ir(model, should_fold=should_fold)

    def _externalize_weights(self, graph) -> None:
        """Points every weight initializer at its bytes in weights.safetensors."""
        import onnx_ir as ir

        for value in list(graph.initializers.values()):
            name = value.name.removeprefix("m.")
            canonical = self._aliases.get(name, name)
            stored = self._weights.get(canonical)
            tensor = value.const_value
            if stored is None:
                if tensor is not None and tensor.nbytes > _MAX_INLINE_BYTES:
                    raise RuntimeError(
                        f"the ONNX export made a {tensor.nbytes}-byte constant {value.name!r} "
                        "that is not a stored weight; it would put a second copy of weight "
                        "data in every graph file"
                    )
                continue
            if (tuple(tensor.shape) != stored.shape
                    or str(tensor.dtype.name) != _ONNX_DTYPES[stored.dtype]):
                raise RuntimeError(
                    f"initializer {value.name} is {tensor.dtype.name}{list(tensor.shape)} but "
                    f"{WEIGHTS_NAME} holds {stored.dtype}{list(stored.shape)}"
                )
            value.name = name
            value.const_value = ir.ExternalTensor(
                WEIGHTS_NAME, stored.offset, stored.length, tensor.dtype,
                shape=ir.Shape(stored.shape), name=name,
                base_dir=str(self._weights_path.parent),
            )

    def _check(self, out_path: Path) -> None:
        """onnx.checker on the file, external data included. The checker wants the
        weights in the graph's own folder and refuses links to them; the pipeline
        writes into a scratch folder first, so a copy of the (small) graph file is
        checked next to the weights instead."""
        import onnx

        probe = self._weights_path.parent / f".check-{out_path.name}"
        shutil.copyfile(out_path, probe)
        try:
            onnx.checker.check_model(str(probe), full_check=True)
        finally:
            probe.unlink()


_ONNX_DTYPES = {"F32": "FLOAT", "F16": "FLOAT16", "BF16": "BFLOAT16", "I8": "INT8",
                "U8": "UINT8", "I32": "INT32", "I64": "INT64", "F64": "DOUBLE"}


def _drop_identity_transposes(graph) -> None:
    """The exporter wraps index_put's ScatterND in Transposes with the identity
    permutation; without them the ScatterND reads the cache input itself and
    writes the cache output itself (the in-place binding depends on it)."""
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        perm = node.attributes.get("perm")
        src, out = node.inputs[0], node.outputs[0]
        # perm covers every axis, so it is the identity exactly when sorted.
        if perm is None or list(perm.as_ints()) != list(range(len(perm.as_ints()))):
            continue
        if out.is_graph_output() and (src.is_graph_input() or src.is_graph_output()):
            continue  # a graph output must stay a distinct value
        out.replace_all_uses_with(src, replace_graph_outputs=True)
        graph.remove(node, safe=True)


def _name_signature(graph, num_layers: int, dynamic: bool) -> None:
    import onnx_ir as ir

    inputs, outputs = graph.inputs, graph.outputs
    if len(inputs) != len(INPUT_NAMES) + num_layers or len(outputs) != 1 + num_layers:
        raise RuntimeError(
            f"the exported graph has {len(inputs)} inputs and {len(outputs)} outputs; the "
            f"graph signature needs {len(INPUT_NAMES) + num_layers} and {1 + num_layers} "
            "(an unused input was dropped?)"
        )
    for value, name in zip(inputs, INPUT_NAMES):
        value.name = name
    outputs[0].name = "logits"
    for i in range(num_layers):
        kv_in, kv_out = inputs[len(INPUT_NAMES) + i], outputs[1 + i]
        kv_in.name, kv_out.name = kv_input(i), kv_output(i)
        dims = list(kv_in.shape)
        if dynamic:  # the exporter's symbol (s71, ...) -> a name a reader understands
            dims[1] = "num_blocks"
        # The output is the ScatterND's result, which the exporter left untyped.
        for v in (kv_in, kv_out):
            v.type = kv_in.type
            v.shape = ir.Shape(dims)


def _check_kv_written_once(graph, num_layers: int) -> None:
    """Each cache input may be read only by the one ScatterND that produces its
    output (and by Shape). Then writing that ScatterND's result into the input's
    own buffer changes nothing any other node reads."""
    for i in range(num_layers):
        kv_in = graph.inputs[len(INPUT_NAMES) + i]
        kv_out = graph.outputs[1 + i]
        writer = kv_out.producer()
        readers = [n for n, _ in kv_in.uses() if n.op_type != "Shape"]
        ok = (writer is not None and writer.op_type == "ScatterND"
              and writer.inputs[0] is kv_in and readers == [writer])
        if not ok:
            raise RuntimeError(
                f"layer {i}: the exported graph does not write the KV cache with one "
                f"ScatterND from {kv_in.name} to {kv_out.name} (readers: "
                f"{[n.op_type for n in readers]}, writer: "
                f"{writer.op_type if writer is not None else None}); the runtime could not "
                "bind the cache in place"
            )
