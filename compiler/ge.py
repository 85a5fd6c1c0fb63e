"""torchair GE backend (`--backend ge`): frozen, static-shape GE graphs for Ascend.

Per bucket the model (built with `NpuOps`) is captured by
`torch.compile(model, backend=torchair.get_npu_backend(compiler_config=cfg),
fullgraph=True, dynamic=False)`; torchair converts the FX graph to GE IR.
The artifact's graph file per bucket is torchair's export of that graph
(`.air`, for GE or ATC offline deployment), with the weights left as graph
inputs bound to the artifact's one weights file (`export_air`).

GE graphs are fully static, so the KV block count is fixed at compile time
(`CompileConfig.num_gpu_blocks_override`) and recorded in the backend traits,
hence in every bucket's reuse key: a changed KV size recompiles instead of
silently reusing graphs built for another cache size.

Verified on a CPU-only host (tests/test_ascend_ge.py, torch-npu 2.13.0's
torchair with its compiled modules replaced by test doubles): conversion to
GE IR, the ops and options handed to GE, frozen weights, the `.air` export
call, and numerics of the converted FX graph run eagerly. Not verified: GE
compilation, kernels and speed (need an Ascend host with CANN).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from aotllm.compiler.export import example_inputs
from aotllm.compiler.weights import write_safetensors
from aotllm.graphs.buckets import Bucket
from aotllm.graphs.devices import supported_device_type
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import BackendTraits
# Shared with runtime/ge_loader.py, which must not import compiler/.
from aotllm.models.npu_ops import GE_CACHE_DIR, NpuOps, freeze_buffers, prepare  # noqa: F401
from aotllm.models.npu_ops import ge_compiler_config as compiler_config
from aotllm.models.npu_ops import import_torchair_ops as _torchair

# torchair's options.json of each exported graph: the GE compile and execute
# options (global, session and graph scope) that offline deployment of the
# .air with GE or ATC needs; ge_options/<graph>/options.json.
GE_OPTIONS_DIR = "ge_options"
_GE_OPTIONS_README = """\
One directory per graph file in ../graphs/ (named after its stem), holding
torchair's options.json from exporting that graph: the GE compile and execute
options (global, session and graph scope) the graph was built with, for
loading the .air offline with GE or ATC. aotllm's own runtime does not read
these files. Written by aotllm compile --backend ge.
"""

NEEDS_ASCEND = (
    "--backend ge needs an Ascend host with torch_npu and CANN installed "
    "(pip install 'aotllm[ascend]' and source CANN's set_env.sh); on this host {why}. "
    "Use --backend inductor here, or --backend onnx and Ascend's ATC tool for offline models."
)


def import_torchair():
    """torch_npu first (it puts torchair on the path and registers npu:: ops),
    then torchair's own air:: attention op."""
    try:
        import torch_npu  # noqa: F401
    except Exception as e:  # ImportError, or OSError from missing CANN libraries
        raise ValueError(NEEDS_ASCEND.format(why=f"import torch_npu failed: {e}")) from None
    return _torchair()


def _trace_rank() -> int | None:
    """The rank a tensor-parallel model is traced as (compiler/parallel.py gives
    each worker a fake process group), None without a group."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def _export_options_file(out_dir: Path) -> Path:
    """Where torchair's export left the graph's options.json: beside the .air,
    or in rank_<r>/ under a process group (torchair's `_get_subpath`)."""
    rank = _trace_rank()
    return out_dir / ("options.json" if rank is None else f"rank_{rank}/options.json")


def ge_example_inputs(bucket: Bucket, spec: KVCacheSpec, dtype: torch.dtype,
                      device: torch.device, num_blocks: int) -> tuple:
    """`example_inputs` with the KV caches at the artifact's fixed block count."""
    args = list(example_inputs(bucket, spec, dtype, device))
    args[-1] = [torch.zeros(spec.layer_shape(num_blocks), dtype=dtype, device=device)
                for _ in range(spec.num_layers)]
    return tuple(args)


class GeBackend:
    name = "ge"
    file_suffix = ".air"
    quantization_schemes = frozenset({"w8a16", "w8a8", "w8a8_static"})
    ops = NpuOps

    def __init__(self, cfg):
        if supported_device_type(cfg.device) != "npu":
            raise ValueError(f"the ge backend compiles for an Ascend NPU (--device npu), "
                             f"not {cfg.device!r}")
        self.device = cfg.device
        self.num_blocks = cfg.num_gpu_blocks_override
        self.output = Path(cfg.output)
        self.dim_gears = cfg.ge_dim_gears
        # graph bucket -> the batch sizes its batch dimension is geared over
        # (set by graph_groups, read when that bucket compiles).
        self.gears: dict[Bucket, tuple[int, ...]] = {}

    def version(self) -> str:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"torch_npu-{version('torch_npu')}"
        except PackageNotFoundError:
            return "torch_npu-unknown"

    def check_available(self) -> None:
        # The host first: on a machine without torch_npu that is the one
        # thing to fix, whatever else the command line lacks.
        import_torchair()
        if self.num_blocks is None:
            raise ValueError(
                "--backend ge builds static graphs for a fixed KV cache: pass "
                "--num-gpu-blocks-override N (the serving host must allocate exactly N blocks)"
            )

    def check_model(self, config) -> None:
        """What NpuOps cannot build yet, refused before any work (traced, it
        would surface as a graph break deep inside torch.compile)."""
        windows = sorted({w for w in config.sliding_windows if w is not None})
        if windows:
            raise ValueError(
                f"--backend ge cannot compile {config.architecture} with sliding-window "
                f"attention (sliding_window {windows[0]}): NpuOps does not use "
                "FusedInferAttentionScore's band mode yet. Use --backend inductor or "
                "--backend onnx for this model"
            )

    def traits(self) -> BackendTraits:
        # The weights file is bound to each graph's frozen inputs at load time,
        # one copy for all buckets.
        return BackendTraits(kv_in_place=True, num_blocks=self.num_blocks, shared_weights=True)

    def graph_groups(self, buckets: list[Bucket], model=None, quant: dict | None = None
                     ) -> list[tuple[Bucket, tuple[Bucket, ...]]]:
        """(the bucket a graph is compiled for, the buckets that graph serves).

        Without dimension gears every bucket has its own graph. With them,
        the decode buckets of one context width share one graph, compiled at
        their largest batch with the batch dimension geared over their batch
        sizes. Batch 1 keeps a graph of its own: torch specializes size-1
        dimensions (0/1 specialization), so a graph traced with a dynamic
        batch guards it to >= 2 and a batch-1 call would recompile (measured
        off-device with torch 2.13). torchair takes 2 to 100 gears, so a
        context with fewer than two batch sizes >= 2 is not geared.
        """
        self.gears.clear()
        if not self.dim_gears:
            return [(b, (b,)) for b in buckets]
        groups: dict[int, list[Bucket]] = {}
        single = []
        for b in buckets:
            if b.phase == "decode" and b.batch >= 2:
                groups.setdefault(b.context_blocks, []).append(b)
            else:
                single.append(b)
        out = [(b, (b,)) for b in single]
        for members in groups.values():
            members.sort(key=lambda b: b.batch)
            if len(members) < 2:
                out.append((members[0], (members[0],)))
                continue
            top = members[-1]
            self.gears[top] = tuple(b.batch for b in members)
            out.append((top, tuple(members)))
        return out

    def example_inputs(self, bucket: Bucket, spec: KVCacheSpec, dtype: torch.dtype,
                       device: torch.device) -> tuple:
        """`ge_example_inputs`, with the batch dimension (dim 0 of each of the
        six step inputs; not the KV caches) geared when `bucket` is geared."""
        args = ge_example_inputs(bucket, spec, dtype, device, self.num_blocks)
        gears = self.gears.get(bucket)
        if gears:
            torchair = _torchair()
            for t in args[:6]:
                torchair.inference.set_dim_gears(t, {0: list(gears)})
        return args

    def write_weights(self, model, out_dir: Path) -> tuple[str, dict[str, str]]:
        # Weights are stored in the layout the graphs read (int8 as [in, out]).
        prepare(model)
        return write_safetensors(model, out_dir)

    def compiled(self, model, *, run_eagerly: bool = False):
        """The torch.compile'd model for one bucket's static shapes."""
        torchair = _torchair()
        prepare(model)
        cfg = compiler_config(torchair, run_eagerly=run_eagerly)
        return torch.compile(model, backend=torchair.get_npu_backend(compiler_config=cfg),
                             fullgraph=True, dynamic=False)

    def load_device(self) -> torch.device:
        """Where the pipeline loads the model for capture: the NPU itself.
        torchair freezes only inputs it sees on the device (CPU tensors
        become host inputs), and the cache needs a real compile. Valid once
        check_available has imported torch_npu (it adds the device type)."""
        return torch.device(self.device)

    def export_air(self, model, bucket: Bucket, spec: KVCacheSpec, out_dir: Path) -> Path:
        """The bucket's GE graph as `out_dir/<bucket>.air`, weights not inside.

        torchair.dynamo_export would bake every weight into each `.air` as a
        Const (or, past 1.8 GB, write raw weight files next to it): one copy
        per bucket. This is the same export (torchair's export mode, the
        same config dynamo_export sets) with no weight names given, so the
        weights stay graph inputs, named after the model's parameters in
        the graph's Data nodes, and bind to the artifact's one weights
        file. The capture runs on the device the model and inputs are on.
        """
        torchair = _torchair()
        from torchair._ge_concrete_graph.fx2ge_converter import ExportSuccess

        prepare(model)
        device = next(model.parameters()).device
        args = self.example_inputs(bucket, spec, model.dtype, device)
        cfg = compiler_config(torchair)
        cfg.export.export_mode = True
        cfg.export.export_path_dir = str(out_dir)
        cfg.export.export_name = bucket.name
        cfg.export.weight_name = {}  # no weight becomes a Const
        # RefData inputs for tensors written in place (the KV caches), as
        # dynamo_export sets.
        cfg.experimental_config.enable_ref_data = True
        torch._dynamo.reset()
        fn = torch.compile(model, backend=torchair.get_npu_backend(compiler_config=cfg),
                           fullgraph=True, dynamic=False)
        try:
            with torch.no_grad():
                fn(*args)
        except ExportSuccess:
            pass
        else:
            raise RuntimeError(f"torchair did not export the {bucket.name} graph")
        finally:
            torch._dynamo.reset()
        # Under a process group (tensor parallelism: the graphs hold HCCL ops)
        # torchair names rank r's graph <name><r>.air.
        rank = _trace_rank()
        return Path(out_dir) / f"{bucket.name}{'' if rank is None else rank}.air"

    def cache_dir(self, bucket: Bucket) -> Path:
        """Where torchair's compiled-graph cache of `bucket` lives in the artifact.

        torchair keys its cache by the module's repr and the compiler
        options only (`CompiledModel.get_cache_bin`), not by input shapes:
        with a changed KV-cache size it would load a graph built for the old
        one (vllm-ascend's most reported cache bug). The directory adds the
        bucket and the block count; torchair's own key goes below it."""
        return self.output / GE_CACHE_DIR / f"{bucket.name}-kv{self.num_blocks}"

    def cached(self, model, bucket: Bucket):
        """`torchair.inference.cache_compile` of model.forward into the
        bucket's cache dir (GE's own compile cache included); stale caches
        of this bucket for another block count are removed first."""
        import shutil

        torchair = _torchair()
        prepare(model)
        target = self.cache_dir(bucket)
        for old in target.parent.glob(f"{bucket.name}-kv*"):
            if old != target:
                shutil.rmtree(old)
        target.mkdir(parents=True, exist_ok=True)
        return torchair.inference.cache_compile(
            model.forward, config=compiler_config(torchair), dynamic=False,
            cache_dir=str(target), ge_cache=True)

    def warm_cache(self, model, bucket: Bucket, spec: KVCacheSpec) -> None:
        """Compiles the bucket through the cache once, so the artifact carries
        the compiled graph (on an NPU host; off-device it stops where GE
        compiles)."""
        device = next(model.parameters()).device
        args = self.example_inputs(bucket, spec, model.dtype, device)
        torch._dynamo.reset()
        try:
            with torch.no_grad():
                self.cached(model, bucket)(*args)
        finally:
            torch._dynamo.reset()

    def options_file(self, bucket: Bucket) -> Path:
        return self.output / GE_OPTIONS_DIR / bucket.name / "options.json"

    def compile_bucket(self, model, bucket: Bucket, spec: KVCacheSpec, out_path: Path) -> None:
        with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
            air = self.export_air(model, bucket, spec, Path(tmp))
            if not air.is_file():
                raise RuntimeError(f"torchair's export wrote no {air.name}")
            options = _export_options_file(Path(tmp))
            if not options.is_file():
                raise RuntimeError(f"torchair's export of {bucket.name} wrote no options.json")
            target = self.options_file(bucket)
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent.parent / "README.txt").write_text(_GE_OPTIONS_README)
            os.replace(options, target)
            os.replace(air, out_path)
        if _trace_rank() is not None:
            # Tensor parallel: torchair keys its cache by rank, and a cached
            # graph with HCCL ops rebuilds its process group on the NPU when
            # it loads. Each rank compiles its own cache at first load
            # (runtime/ge_loader.py); the artifact carries the .air graphs.
            return
        self.warm_cache(model, bucket, spec)
