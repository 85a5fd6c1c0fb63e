"""Off-device harness for the GE backend's contract tests (test-only code).

torchair's FX -> GE-IR conversion is pure Python; only four compiled
extension modules tie it to CANN. This module makes that conversion run on a
CPU-only machine without installing torch-npu (which would break `import
torch` and `import transformers`, ../shared/ASCEND.md):

1. `unpacked_wheel()` fetches the torch-npu wheel once (`pip download`) into
   the aotllm cache dir and unpacks it there;
2. `install()` defines the `npu::` ops the GE backend uses from the wheel's
   codegen YAML (their C++ registrations live in libtorch_npu.so), with Meta
   kernels, a functionalization for the in-place scatter, and CPU reference
   kernels (`ascend_reference.py`) for `debug.run_eagerly`; then puts only
   `<wheel>/torch_npu/dynamo` on sys.path and test doubles for torchair's
   compiled modules into sys.modules, and imports torchair.

The doubles record what torchair hands to GE (`RECORD`): the serialized
`ModelDef` and options of every graph load, the graph-engine options, every
`.air` export and every CANN compatibility query. Anything that would need
CANN for real (compiling or running a GE graph) raises.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import signal
import subprocess
import sys
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

TORCH_NPU_VERSION = "2.13.0"
_WHEEL_GLOB = f"torch_npu-{TORCH_NPU_VERSION}-*.whl"
# The npu:: ops NpuOps emits (the functional scatter is what functionalization
# produces from the in-place one; torchair turns it back in place).
NPU_OPS = (
    "npu_scatter_nd_update_",
    "npu_scatter_nd_update",
    "npu_rms_norm",
    "npu_apply_rotary_pos_emb",
    "npu_weight_quant_batchmatmul",
    "npu_dynamic_quant",
    "npu_quant_matmul",
    "npu_quantize",
)


class HarnessUnavailable(RuntimeError):
    """The wheel could not be fetched or unpacked: the contract tests skip."""


def cache_dir() -> Path:
    return Path(os.environ.get("AOTLLM_CACHE_DIR", Path.home() / ".cache" / "aotllm"))


def unpacked_wheel() -> Path:
    """The unpacked torch-npu wheel (a directory holding `torch_npu/`)."""
    # The default cache dir, not a test's temporary AOTLLM_CACHE_DIR, also
    # counts: 44 MB is worth fetching once per machine.
    for root in dict.fromkeys((cache_dir(), Path.home() / ".cache" / "aotllm")):
        target = root / "ascend" / f"torch_npu-{TORCH_NPU_VERSION}"
        if (target / "torch_npu" / "dynamo" / "torchair" / "__init__.py").is_file():
            return target
    root = cache_dir()
    wheels = root / "wheels"
    found = sorted(wheels.glob(_WHEEL_GLOB))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"torch-npu=={TORCH_NPU_VERSION}", "-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        found = sorted(wheels.glob(_WHEEL_GLOB))
        if proc.returncode != 0 or not found:
            raise HarnessUnavailable(
                f"could not fetch torch-npu=={TORCH_NPU_VERSION}: {proc.stderr.strip()[-500:]}")
    target = root / "ascend" / f"torch_npu-{TORCH_NPU_VERSION}"
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(found[-1]) as z:
        # Only the Python side and the op YAML: the .so files are never loaded.
        names = [n for n in z.namelist()
                 if n.startswith("torch_npu/dynamo/") or n.endswith("by_codegen.yaml")]
        z.extractall(partial, members=names)
    os.replace(partial, target)
    return target


# --- doubles for torchair's compiled extension modules ----------------------


@dataclass
class Record:
    """What torchair handed to the (double of the) compiled GE layer."""

    loads: list[tuple[bytes, dict]] = field(default_factory=list)  # (ModelDef, options)
    engine_options: list[dict] = field(default_factory=list)
    exports: list[tuple[bytes, dict]] = field(default_factory=list)
    compat_queries: list[tuple] = field(default_factory=list)

    def clear(self) -> None:
        for v in (self.loads, self.engine_options, self.exports, self.compat_queries):
            v.clear()


RECORD = Record()


class NeedsCann(RuntimeError):
    pass


def _needs_cann(what: str):
    def f(*args, **kwargs):
        raise NeedsCann(f"{what} needs CANN (GE runtime); not available off-device")
    return f


class _TorchNpuGraphBase:
    """Double of _torchair.TorchNpuGraphBase: records the loaded graph."""

    def __init__(self, name: str = ""):
        self.name = name

    def load(self, serialized_graph: bytes, options: dict, *rest) -> None:
        RECORD.loads.append((serialized_graph, dict(options)))

    def set_hint_shape(self, *args) -> None:
        pass

    compile = _needs_cann("GE graph compile")
    auto_tune = _needs_cann("GE auto-tune")
    summary_compile = _needs_cann("GE compile summary")
    run = _needs_cann("running a GE graph")


def _check_cann_compat(optype, runtime_optional_inputs, runtime_optional_attrs) -> str:
    # "" means "this CANN knows the op with these optional inputs/attrs":
    # the double answers as a CANN new enough for all of them would.
    RECORD.compat_queries.append((optype, runtime_optional_inputs, runtime_optional_attrs))
    return ""


def _export(serialized_graph: bytes, options: dict) -> None:
    """Records the export and, as GE's exporter does, writes the graph to
    `export_path_dir/export_name` (here: the serialized ModelDef as given)."""
    RECORD.exports.append((serialized_graph, dict(options)))
    path = Path(options["export_path_dir"]) / options["export_name"]
    path.write_bytes(serialized_graph)


def _module(name: str, **attrs) -> types.ModuleType:
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _torchair_double() -> types.ModuleType:
    names = ("BOOL UINT8 INT8 INT16 UINT16 INT32 UINT32 INT64 UINT64 BF16 FLOAT16 "
             "FLOAT32 FLOAT64 COMPLEX64 COMPLEX128").split()
    return _module(
        "torchair.core._torchair",
        TorchDataType=enum.IntEnum("TorchDataType", names),
        TorchNpuGraphBase=_TorchNpuGraphBase,
        InitializeGraphEngine=lambda options: RECORD.engine_options.append(dict(options)),
        FinalizeGraphEngine=lambda: None,
        check_cann_compat=_check_cann_compat,
        export=_export,
        GetSocName=lambda: "Ascend910B1",  # the double's pretend SoC
        StupidRepeat=lambda word, times: word * times,
        SetDebugLogPath=lambda path: None,
        InitDeviceStdoutChannel=_needs_cann("device stdout channel"),
        get_registered_ir_def=_needs_cann("the CANN op registry"),
        as_torch_tensors=_needs_cann("GE tensors"),
        AclmdlSetDump=_needs_cann("ACL dump"),
        AclopStartDumpArgs=_needs_cann("ACL dump"),
        AclopStopDumpArgs=_needs_cann("ACL dump"),
    )


def _install_doubles() -> None:
    sys.modules["torchair.core._torchair"] = _torchair_double()
    sys.modules["torchair.core._npu_graph_executor"] = _module(
        "torchair.core._npu_graph_executor")
    sys.modules["torchair.core._npu_utils"] = _module(
        "torchair.core._npu_utils", NpuFormatCastViaCpu=_needs_cann("format cast"))
    sys.modules["torchair.core._abi_compat_ge_apis"] = _module(
        "torchair.core._abi_compat_ge_apis")


# --- a stand-in torch_npu, only while torchair converts or runs ------------

DOUBLE_CANN_VERSION = "8.3.RC1"
DOUBLE_DEVICE_NAME = "Ascend910B1"  # not arch35: QuantBatchMatmulV3, as on A2/A3


def _version_key(v: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", v)]


def _torch_npu_standin() -> dict[str, types.ModuleType]:
    """Some torchair converters and passes `import torch_npu` for dtype
    constants, the device name and the CANN version. This stand-in answers
    as an Atlas A2 host with CANN 8.3.RC1 would; everything else raises."""
    utils = _module(
        "torch_npu.npu.utils",
        get_cann_version=lambda module="CANN": DOUBLE_CANN_VERSION,
        _is_gte_cann_version=lambda v, module="CANN": (
            _version_key(DOUBLE_CANN_VERSION) >= _version_key(v)),
    )
    npu = _module(
        "torch_npu.npu",
        utils=utils,
        current_device=lambda: 0,
        get_device_name=lambda *a: DOUBLE_DEVICE_NAME,
        matmul=types.SimpleNamespace(allow_hf32=False),
        conv=types.SimpleNamespace(allow_hf32=True),
        _get_deterministic_level=lambda: 0,
    )
    # A cached graph with HCCL ops asks whether this CANN can name a process
    # group after the one in the cache (CANN 8.3 can).
    distributed = _module("torch_npu.distributed", _is_support_hccl_comm_name=lambda: True)
    # torch_npu's own dtype numbers (op_plugin's meta registrations list them).
    root = _module("torch_npu", npu=npu, distributed=distributed, int4=285, hifloat8=290, float8_e8m0fnu=293,
                   float4_e2m1fn_x2=296, float4_e1m2fn_x2=297)
    return {"torch_npu": root, "torch_npu.npu": npu, "torch_npu.npu.utils": utils,
            "torch_npu.distributed": distributed}


@contextlib.contextmanager
def torch_npu_standin():
    """Only around torchair calls: left in sys.modules, transformers would
    take it for a real torch_npu (it imports torch_npu whenever one is found)."""
    import torch

    mods = _torch_npu_standin()
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    # torch_npu adds Tensor.is_npu; no tensor here is on an NPU (so torchair
    # skips reading private NPU storage formats).
    added_is_npu = not hasattr(torch.Tensor, "is_npu")
    if added_is_npu:
        torch.Tensor.is_npu = property(lambda self: self.device.type == "npu")
    try:
        yield
    finally:
        if added_is_npu:
            del torch.Tensor.is_npu
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


# --- installing -------------------------------------------------------------

_INSTALLED: types.ModuleType | None = None


def install() -> types.ModuleType:
    """Everything above, once per process; returns the imported torchair."""
    global _INSTALLED
    if _INSTALLED is not None:
        return _INSTALLED
    root = unpacked_wheel()
    from tests import ascend_ops

    ascend_ops.define_npu_ops(root, NPU_OPS + ascend_ops.PATTERN_OPS)
    dynamo_dir = str(root / "torch_npu" / "dynamo")
    if dynamo_dir not in sys.path:
        sys.path.insert(0, dynamo_dir)
    _install_doubles()
    # torchair's core._backend installs SIGINT/SIGTERM handlers on import
    # (to finalize GE); keep pytest's own.
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        import torchair
        # defines air::npu_fused_infer_attention_score (torchair.ops imports it lazily)
        import torchair.ops._npu_fused_infer_attention_score  # noqa: F401
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    ascend_ops.register_air_reference()
    _INSTALLED = torchair
    return torchair
