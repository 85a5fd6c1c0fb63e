"""How a BF16/FP16 linear runs on a CPU: few-row calls inside compiled graphs,
and every call on a CPU without native BF16/FP16 matmuls.

Up to `COMPACT_MAX_ROWS` rows (every decode batch of the default plan, the
LM head of a prefill) a linear is bound by reading its weight once. A
oneDNN GEMM call per linear streams the small matrices of a decoder layer
slowly (measured on the 125M Llama's 49 linears at one row, 2-core Xeon
with AVX-512 BF16: 24.6 ms native, 15.5 ms as an Inductor reduction). In
graphs the Inductor backend traces (`inductor_capture`) such a linear calls
the compact kernel (compact_linear.py), which reads the weight in its
stored width at close to memory speed, on every CPU; other traces (ONNX
export, torchair, eager) keep the matmuls their runtimes have kernels for.

Without AVX512_BF16/AMX (for fp16: AVX512_FP16/AMX_FP16) oneDNN's half-
precision GEMM is compute bound at a fraction of FP32 speed, its time growing
linearly with the rows. Such calls compute in FP32 instead, over weights that
stay stored in their compact dtype: the weight is cast in chunks of output
rows, each chunk's FP32 copy small enough to stay in L2 (`chunk_rows`), and
the chunk's GEMM runs right after its cast. The weights file and the bytes
held in memory do not change.

Measured in AOTInductor graphs, one [4096, 768] bf16 linear, on the 2-core
Xeon of the README's figures restricted to AVX2 (ATEN_CPU_CAPABILITY=avx2
ONEDNN_MAX_CPU_ISA=AVX2), microseconds:

    rows               1     2     4     8    16    128
    native bf16      276   440   774  1427  2866  22484
    fp32, 512-row    384   831   461   592   855   2985
    fp32 weights     324   337   579   796   728   2511   (2x the memory)

So eagerly one row stays native (bandwidth bound: the compact read wins),
and from 4 rows on the chunked FP32 route is 1.7x (4 rows) to 7.5x (128)
faster; at 2 rows the two are close, and it stays native. Compiled graphs
take the compact kernel up to 8 rows and the chunked route past them.

Like `int8_kernels`, the choice is made from static facts (rows, dtype,
device, the CPU as `cpu_isa.detect` sees it at trace time), so each bucket
graph bakes in its own; the compiler records the choices in the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from aotllm.models import compact_linear, cpu_isa

# From this many rows up a non-native half-precision linear computes in FP32.
FP32_MIN_ROWS = 4
# Up to this many rows a compiled half-precision linear runs the compact kernel.
COMPACT_MAX_ROWS = compact_linear.MAX_ROWS


# At most this many chunks per linear: each chunk is a cast and a GEMM call
# in the graph, and the C++ compiler's time grows faster than the graph.
MAX_CHUNKS = 8


def chunk_rows(k: int, n: int) -> int:
    """Output rows cast per chunk of an [n, k] weight: a power of two whose
    FP32 copy takes at most half the L2, leaving room for the GEMM's input
    and output rows, unless that makes more than MAX_CHUNKS chunks.

    Measured on the ~125M Llama's decode batch-8 graph restricted to AVX2
    (2 MiB L2; step medians of alternated runs): 512 rows for every K (1.5 MiB
    at K=768, 4 MiB at the down projection's K=2048) 28.0-30.4 ms; 2048 rows
    40-42 ms; 128 rows 27.5-28.3 ms; 256 rows 24.6-28.0 ms; 256 rows at K=768
    with 64 at K=2048 24.2-25.6 ms, with 128 at K=2048 (this rule) 25.3-25.5 ms.
    More chunks mean more GEMM calls in the graph, and compile time grows with
    them: on a 512 KiB-L2 AMD Zen 1 the L2 share alone gave 32-64 rows, ~90
    GEMM calls a layer, and SmolLM2's prefill graph took 15 minutes to
    compile; the cap keeps a layer of it at 24 calls."""
    target = max(32, cpu_isa.l2_cache_bytes() // 2 // (4 * k))
    rows = 1 << (target.bit_length() - 1)
    while -(-n // rows) > MAX_CHUNKS:
        rows *= 2
    return rows


_inductor_capture = False


@contextlib.contextmanager
def inductor_capture() -> Iterator[None]:
    """Set by the Inductor backend around its export: the ops then take the
    reduction forms Inductor fuses (here and in ops.py). Other traces (ONNX
    export, torchair) keep the matmuls their runtimes have kernels for."""
    global _inductor_capture
    before, _inductor_capture = _inductor_capture, True
    try:
        yield
    finally:
        _inductor_capture = before


def in_inductor_capture() -> bool:
    return _inductor_capture and torch.compiler.is_compiling()


def float_linear_kernel(rows: int, dtype: torch.dtype, device: torch.device,
                        compiled: bool) -> str:
    """"native" (F.linear in the model dtype), "fp32_chunked" or "compact".
    `compiled`: the call is being traced for Inductor (`in_inductor_capture`)."""
    # `rows` is compared last: in a dynamic-shape trace it is symbolic, and a
    # comparison whose answer does not matter would still add a guard.
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        if compiled and rows <= COMPACT_MAX_ROWS:
            return "compact"
        if not cpu_isa.detect().native_for(dtype) and rows >= FP32_MIN_ROWS:
            return "fp32_chunked"
    return "native"


def realized(x: torch.Tensor) -> torch.Tensor:
    # An identity view that Inductor lowers by realising its input into a
    # buffer (as_strided needs real storage), so a reduction reads x once
    # instead of recomputing its producer for every output element.
    return x.as_strided(x.shape, x.stride())


def linear_compact(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias for a few rows, accumulated in FP32
    and rounded once to x's dtype, by the C++ kernel compiled graphs call
    (compact_linear.py). `weight` may be int8 (then `scale` is its
    per-output-channel scale).

    Before it, one row was written as a reduction Inductor fused,
    `(x.float().unsqueeze(-2) * w.float()).sum(-1)`: one accumulator per
    row, no prefetch, 10 GB/s of int8 weights where the kernel reads 24-25."""
    return torch.ops.aotllm.compact_linear(x, weight, scale, bias)


def linear_fp32_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ (weight * scale)^T + bias) computed in FP32, rounded once to x's dtype.

    `weight` may be float or int8 (then `scale` is its per-output-channel scale);
    the products of half-precision or int8 values are exact in FP32, so this is
    the arithmetic a native half-precision GEMM does (FP32 accumulation).
    """
    x32 = x.float()
    rows = chunk_rows(weight.shape[1], weight.shape[0])
    out = torch.cat([F.linear(x32, w.float()) for w in weight.split(rows)], dim=-1)
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
