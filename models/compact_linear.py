"""`aotllm::compact_linear`: a linear over compact weights for a few rows, as
a small C++ kernel that compiled CPU graphs call directly.

    y = (x @ weight^T) * scale + bias, in FP32, rounded once to x's dtype

`weight` stays in its stored width (int8, bf16 or fp16) and is widened in
registers (csrc/compact_linear.cpp). Decode reads every weight once per
step, so its linears are bound by how fast the weights stream in. Inductor's
own reduction (how these graphs wrote one row before) keeps one accumulator per row
and issues no prefetches; measured on the 2-core Xeon of the README (2
threads, 200 MB of int8 weights, K=576), GB/s of weights read:

    Inductor reduction (the decode graphs before this kernel)   10.0-10.2
    this loop, 8 rows per block, no prefetch                   13.5-14.0
    4 rows per block, L2 prefetch 16 KiB ahead                 24.2-25.5
    plain read of the same bytes, no arithmetic                31-35

so the kernel takes 4 rows per block (fewer streams for the prefetcher to
follow; more rows measured slower) and prefetches 16 KiB ahead into L2
(8-32 KiB all measured within noise; into L1 it was 18 GB/s).

How the graphs reach it: the op is a torch custom op (its Python body is the
reference arithmetic, used eagerly and by tests), and AOTInductor is told
the op's C function (`c_shim_configs`), so the generated code calls it with
no dispatcher in between. The C++ is compiled once per machine into the
cache (`build_library`); the compiler copies the library into the artifact
(`kernels/`), and the runtime loads it before the graphs (`load_library`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "compact_linear.cpp"
LIBRARY_NAME = "libaotllm_compact_linear.so"
# Rows up to which a compiled CPU linear uses this kernel: every decode batch
# of the default plan. Measured on the 12 layers' linears of the ~125M Llama
# (2-core Xeon, AOTInductor graphs, ms): 8 rows bf16 16.0 against oneDNN's
# native AMX 18.3, and 16.2 against 27.4 for the FP32-chunked route
# restricted to AVX2; 4 rows bf16 11.4 against native 17.4. Past 8 rows the
# weights are read again for the next 8, and GEMMs catch up.
MAX_ROWS = 8
ISA_NAMES = {0: "plain C++", 1: "AVX2", 2: "AVX-512"}

_C_SHIM = ("AOTITorchError aoti_torch_cpu_compact_linear(AtenTensorHandle, AtenTensorHandle, "
           "AtenTensorHandle*, AtenTensorHandle*, AtenTensorHandle*)")


@torch.library.custom_op("aotllm::compact_linear", mutates_args=())
def compact_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                   bias: torch.Tensor | None) -> torch.Tensor:
    out = F.linear(x.float(), weight.float())
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@compact_linear.register_fake
def _(x, weight, scale, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def c_shim_configs() -> dict:
    """Inductor configs that make AOTInductor call the kernel's C function."""
    return {"aot_inductor.custom_ops_to_c_shims":
            {torch.ops.aotllm.compact_linear.default: [_C_SHIM]}}


def _build_dir() -> Path:
    # Beside Inductor's own build cache: rebuilt in seconds if it is wiped,
    # and the compiled artifacts' cache (AOTLLM_CACHE_DIR) holds artifacts only.
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "aotllm_kernels"


def _compiler() -> str:
    from torch._inductor.cpp_builder import get_cpp_compiler

    return get_cpp_compiler()


def build_library() -> Path:
    """The kernel library for this source, torch and compiler, built once
    (a few seconds) and reused."""
    torch_dir = Path(torch.__file__).parent
    compiler = _compiler()
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                         + compiler.encode()).hexdigest()[:16]
    target = _build_dir() / key / LIBRARY_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # -O3 and the generic x86-64 baseline: the vector code carries its own
    # target attributes and is chosen when the library loads.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / LIBRARY_NAME
        cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
               f"-I{torch_dir / 'include'}", str(SOURCE), "-o", str(built),
               f"-L{torch_dir / 'lib'}", "-ltorch_cpu", f"-Wl,-rpath,{torch_dir / 'lib'}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"building the compact_linear kernel failed ({' '.join(cmd)}):\n"
                               f"{result.stderr[-4000:]}")
        os.replace(built, target)  # atomic: a concurrent build sees one or the other
    logger.info("Built the compact_linear CPU kernel into %s", target)
    return target


def copy_library(out_dir: Path) -> str:
    """Put the kernel library into an artifact; returns its relative path."""
    rel = f"kernels/{LIBRARY_NAME}"
    (out_dir / "kernels").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(build_library(), out_dir / rel)
    return rel


_loaded: dict[str, ctypes.CDLL] = {}


def load_library(path: Path) -> ctypes.CDLL:
    """Load the kernel library so compiled graphs find its C function.
    RTLD_GLOBAL: the graphs' code resolves `aoti_torch_cpu_compact_linear`
    among the libraries already loaded. One copy per process: the first
    loaded serves every artifact (the same source gives the same code)."""
    if _loaded:
        return next(iter(_loaded.values()))
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    lib.aotllm_compact_linear_isa.restype = ctypes.c_int
    lib.aotllm_compact_linear_set_isa.restype = ctypes.c_int
    lib.aotllm_compact_linear_set_isa.argtypes = [ctypes.c_int]
    _loaded[str(path)] = lib
    logger.info("Loaded the compact_linear CPU kernel (%s code) from %s",
                ISA_NAMES.get(lib.aotllm_compact_linear_isa(), "?"), path)
    return lib
