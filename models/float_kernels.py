"""How a BF16/FP16 linear runs on a CPU: one-row calls inside compiled graphs,
and every call on a CPU without native BF16/FP16 matmuls.

One row (decode at batch 1, the LM head of a one-sequence prefill) is a
matrix-vector product, bound by reading the weight once. A oneDNN GEMM call
per linear streams the small matrices of a decoder layer slowly; written as a
reduction, `(x.float().unsqueeze(-2) * w.float()).sum(-1)`, Inductor emits a
vectorised loop over the weight's rows that converts and accumulates in FP32
as it streams them (measured on the 125M Llama's 49 linears, 2-core Xeon with
AVX-512 BF16: 24.6 ms native, 15.5 ms as a reduction). Two conditions:
- only in graphs the Inductor backend traces (`inductor_capture`): eagerly
  the same expression materialises an [N, K] FP32 product, and ONNX
  Runtime or GE would too;
- its input is realised first (`realized`): otherwise Inductor inlines the
  producer (the norm, the rotary embedding) into the reduction and recomputes
  it for every output element (measured 35 ms instead of 25 for one graph,
  and 25 times slower for a dynamic-shape one).

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

So one row stays compact (bandwidth bound: the compact read wins; in
compiled graphs it is the GEMV above), and from 4 rows on the chunked FP32
route is 1.7x (4 rows) to 7.5x (128) faster; at 2 rows the two are close,
and it stays native.

Like `int8_kernels`, the choice is made from static facts (rows, dtype,
device, the CPU as `cpu_isa.detect` sees it at trace time), so each bucket
graph bakes in its own; the compiler records the choices in the manifest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from aotllm.models import cpu_isa

# From this many rows up a non-native half-precision linear computes in FP32.
FP32_MIN_ROWS = 4
# Up to this many rows a compiled half-precision linear is a reduction (GEMV).
GEMV_MAX_ROWS = 1


def chunk_rows(k: int) -> int:
    """Output rows cast per chunk: a power of two whose FP32 copy takes at
    most half the L2, leaving room for the GEMM's input and output rows.

    Measured on the ~125M Llama's decode batch-8 graph restricted to AVX2
    (2 MiB L2; step medians of alternated runs): 512 rows for every K (1.5 MiB
    at K=768, 4 MiB at the down projection's K=2048) 28.0-30.4 ms; 2048 rows
    40-42 ms; 128 rows 27.5-28.3 ms; 256 rows 24.6-28.0 ms; 256 rows at K=768
    with 64 at K=2048 24.2-25.6 ms, with 128 at K=2048 (this rule) 25.3-25.5 ms.
    More chunks mean more GEMM calls in the graph, and compile time grows with
    them: this rule's 128 rows at K=2048 keep half the calls of 64."""
    target = max(32, cpu_isa.l2_cache_bytes() // 2 // (4 * k))
    return 1 << (target.bit_length() - 1)


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
    """"native" (F.linear in the model dtype), "fp32_chunked" or "gemv".
    `compiled`: the call is being traced for Inductor (`in_inductor_capture`)."""
    # `rows` is compared last: in a dynamic-shape trace it is symbolic, and a
    # comparison whose answer does not matter would still add a guard.
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        if not cpu_isa.detect().native_for(dtype) and rows >= FP32_MIN_ROWS:
            return "fp32_chunked"
        if compiled and rows <= GEMV_MAX_ROWS:
            return "gemv"
    return "native"


def realized(x: torch.Tensor) -> torch.Tensor:
    # An identity view that Inductor lowers by realising its input into a
    # buffer (as_strided needs real storage), so the reduction reads x.
    return x.as_strided(x.shape, x.stride())


def linear_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (weight * scale)^T + bias for one row, accumulated in FP32 and
    rounded once to x's dtype, as a reduction Inductor fuses (see above).
    `weight` may be int8 (then `scale` is its per-output-channel scale).

    x is realised in FP32 (its producer writes the FP32 copy of its rounded
    values): realised in x's dtype, Inductor converted it again for every
    output row, inside the loop that streams the weight. Measured on the
    ~125M Llama's batch-1 decode graph: 20.4 -> 13.1 ms per step restricted
    to AVX2, 10.6-11.7 -> 9.8-10.2 ms (bf16) and 9.9-11.3 -> 8.8-9.0 ms
    (w8a16) with AVX-512."""
    out = (realized(x.float()).unsqueeze(-2) * weight.float()).sum(-1)
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def linear_fp32_chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        scale: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x @ (weight * scale)^T + bias) computed in FP32, rounded once to x's dtype.

    `weight` may be float or int8 (then `scale` is its per-output-channel scale);
    the products of half-precision or int8 values are exact in FP32, so this is
    the arithmetic a native half-precision GEMM does (FP32 accumulation).
    """
    x32 = x.float()
    rows = chunk_rows(weight.shape[1])
    out = torch.cat([F.linear(x32, w.float()) for w in weight.split(rows)], dim=-1)
    if scale is not None:
        out = out * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
