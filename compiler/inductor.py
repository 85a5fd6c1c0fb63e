"""AOTInductor backend (CPU and CUDA): torch.export per bucket, one .pt2 package
each, without weights."""

from __future__ import annotations

from pathlib import Path

import torch

from aotllm.compiler.export import export_bucket
from aotllm.compiler.shape_groups import ShapeGroup, group_buckets, row_thresholds
from aotllm.compiler.weights import write_safetensors
from aotllm.graphs.buckets import Bucket
from aotllm.graphs.devices import supported_device_type
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import BackendTraits, sha256_file
from aotllm.models import compact_linear, float_kernels
from aotllm.models.float_kernels import COMPACT_MAX_ROWS, FP32_MIN_ROWS
from aotllm.models.int8_kernels import INT8PACK_MAX_ROWS
from aotllm.models.ops import TorchOps

# Constants (weights) stay out of the package; the runtime binds the one
# shared copy from weights.safetensors to every graph with user_managed=True.
# emulate_precision_casts: round bf16/fp16 intermediates where eager does
# instead of keeping fused chains in fp32. Without it a bf16 SmolLM2 artifact
# answered "What is the capital of France?" with another first token than
# eager and transformers (a near-tie of two logits flipped); with it, the same.
_INDUCTOR_CONFIGS = {"aot_inductor.package_constants_in_so": False,
                     "emulate_precision_casts": True}


class InductorBackend:
    name = "inductor"
    file_suffix = ".pt2"
    # models/int8_kernels.py: int8 extern kernels on CPU, the float route on CUDA.
    quantization_schemes = frozenset({"w8a16", "w8a8", "w8a8_static"})
    ops = TorchOps
    # Graphs may compile in forked workers (compiler/parallel.py): nothing a
    # bucket's compile reads is changed by another's.
    parallel_compile = True

    def __init__(self, cfg):
        # Checked on the name: without torch_npu, torch.device("npu") itself fails.
        if supported_device_type(cfg.device) not in ("cpu", "cuda"):
            raise ValueError(
                f"the inductor backend compiles for cpu or cuda, not {cfg.device!r}; "
                "for an Ascend NPU use --backend ge (or --backend onnx for ATC)"
            )
        self.device = torch.device(cfg.device)
        self.dynamic_shapes = cfg.dynamic_shapes
        self.groups: dict[Bucket, ShapeGroup] = {}

    def version(self) -> str:
        return f"torch-{torch.__version__}"

    def check_available(self) -> None:
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but this torch build sees no CUDA GPU")

    def traits(self) -> BackendTraits:
        return BackendTraits(kv_in_place=True, num_blocks=None, shared_weights=True)

    def write_weights(self, model, out_dir: Path) -> tuple[str, dict[str, str]]:
        return write_safetensors(model, out_dir)

    def support_files(self, out_dir: Path) -> tuple[tuple[str, str], ...]:
        """Files the graphs need beside the weights, as (relative path, sha256):
        on CPU the compact_linear kernel library their code calls. Built here,
        in the parent process, before any compile worker forks."""
        if self.device.type != "cpu":
            return ()
        rel = compact_linear.copy_library(out_dir)
        return ((rel, sha256_file(out_dir / rel)),)

    def graph_groups(self, buckets: list[Bucket], model=None, quant: dict | None = None
                     ) -> list[tuple[Bucket, tuple[Bucket, ...]]]:
        """(the bucket a graph is named after, the buckets it serves): one each,
        or with --dynamic-shapes one per shape group."""
        self.groups.clear()
        if not self.dynamic_shapes:
            return [(b, (b,)) for b in buckets]
        out = []
        scheme = (quant or {}).get("scheme")
        if model is None:
            thresholds = (("<=", COMPACT_MAX_ROWS), ("<=", INT8PACK_MAX_ROWS),
                          (">=", FP32_MIN_ROWS))
        else:
            # Kernel thresholds, and any a module declares (the MoE path switch).
            thresholds = row_thresholds(model.dtype, scheme, self.device) + tuple(dict.fromkeys(
                t for m in model.modules() for t in getattr(m, "row_thresholds", ())))
        for group in group_buckets(buckets, thresholds):
            self.groups[group.graph_bucket] = group
            out.append((group.graph_bucket, group.buckets))
        return out

    def compile_bucket(self, model, bucket: Bucket, spec: KVCacheSpec, out_path: Path) -> None:
        group = self.groups.get(bucket)
        with float_kernels.inductor_capture():
            program = export_bucket(model, bucket, spec, self.device,
                                    group if group is not None and len(group.buckets) > 1
                                    else None)
        configs = dict(_INDUCTOR_CONFIGS)
        if self.device.type == "cpu":
            configs.update(compact_linear.c_shim_configs())
        if model.tp.enabled:
            # Inductor inlines 1-D constants of <= 8 elements into the code;
            # a rank's own small tensors (its vocabulary offset) must stay
            # weights bound at load, or every rank would run rank 0's.
            configs["always_keep_tensor_constants"] = True
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(out_path), inductor_configs=configs
        )
