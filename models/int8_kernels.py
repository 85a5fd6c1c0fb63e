"""INT8 linear kernels: the one home of the private torch ops they use.

`torch._weight_int8pack_mm(x[M,K], w[N,K] int8, scales[N])` and
`torch._int_mm(a[M,K] int8, b[K,N] int8) -> int32` were checked against torch
2.13.0 (CPU build): both export through `torch.export` and run inside
AOTInductor graphs as extern kernels. Which kernel a linear uses is decided
from static facts (rows M, dtype, device), so every bucket graph bakes in the
choice for its own shapes; `w8a16_kernel` / `w8a8_kernel` say which, and the
compiler records it per bucket in the manifest.

Measured on the 2-core development machine (Xeon with AVX-512 BF16 and AMX,
weights [4096, 768], AOTInductor graphs, microseconds):

    M     bf16 F.linear  int8pack (w8a16)  dequant+matmul  int_mm+dyn quant (w8a8)
    1          385            157              715              250
    8          340            512              716              273
    128        669           6686             1149              904

So w8a16 uses `_weight_int8pack_mm` for decode-sized M and dequantize-then-
matmul (bf16 GEMM over int8 weights cast in the graph) for prefill; w8a8
uses `_int_mm` where the CPU has VNNI or AMX (`w8a8_kernel` for the rest).
`../shared/CPU-KERNELS.md` has the AVX2-only picture: the same w8a16
crossover, so one rule serves both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aotllm.models import cpu_isa, float_kernels

# Above this many rows `_weight_int8pack_mm` loses to dequantize-then-matmul
# (measured crossover between M=8 and M=32 on AVX-512 and AVX2 machines).
INT8PACK_MAX_ROWS = 16
_INT8_MIN, _INT8_MAX = -128, 127


def w8a16_kernel(rows: int, dtype: torch.dtype, device: torch.device, grouped: bool,
                 compiled: bool) -> str:
    """The kernel a w8a16 linear of `rows` rows uses; recorded in the manifest.
    `compiled`: the call is being traced for Inductor (`in_inductor_capture`)."""
    if (not grouped and float_kernels.float_linear_kernel(rows, dtype, device, compiled)
            == "compact"):
        # The compact kernel reads int8 weights as it reads bf16 ones
        # (compact_linear.py): at one row 2.5x the bandwidth of Inductor's
        # reduction, itself faster than _weight_int8pack_mm (8.5 against
        # 14.8 ms for the 125M Llama's 49 linears); at 8 rows on par with it.
        return "compact"
    if (device.type == "cpu" and not grouped and dtype == torch.bfloat16
            and rows <= INT8PACK_MAX_ROWS):
        # fp32 activations make this kernel 10-30x slower (CPU-KERNELS.md).
        return "weight_int8pack_mm"
    if (not grouped and float_kernels.float_linear_kernel(rows, dtype, device, compiled)
            == "fp32_chunked"):
        # Dequantize-then-matmul would be a half-precision GEMM this CPU
        # runs slowly: dequantize to fp32 in cache-sized chunks instead.
        return "dequant_matmul_fp32"
    return "dequant_matmul"


def w8a8_kernel(rows: int, device: torch.device, compiled: bool) -> str:
    """The kernel that multiplies a w8a8 linear's int8 activations by its int8
    weights. Every route but `int_mm` computes in fp32 over the integer
    values: exact while a sum stays within 2^24 (127 * 127 * K, so any K up
    to 1040, and larger K unless the products pile up to one sign)."""
    if device.type != "cpu":
        # torch's CUDA _int_mm needs M > 16 and multiples of 8: a bucket of one
        # decode row fails there, so CUDA takes the float route.
        return "dequant_matmul"
    int8_dot = cpu_isa.detect().int8_dot
    # `rows` is compared last (see float_kernels.float_linear_kernel).
    if compiled and (not int8_dot or rows == 1) and rows <= float_kernels.COMPACT_MAX_ROWS:
        # The weight read is the cost: one row through the compact kernel
        # (w8a16 through it decoded the 125M Llama at 1.7x the tokens/s of
        # w8a8 through `_int_mm`, batch 1, 2-core Xeon with VNNI), and every
        # decode batch where `_int_mm` has no VNNI (on AMD Zen 1 it decoded
        # SmolLM2 at 15 tokens/s, batch 1).
        return "compact"
    if not int8_dot:
        # `_int_mm` has no fast path without VNNI/AMX (CPU-KERNELS.md): the
        # integer values through fp32 GEMMs, the weight cast in chunks.
        return "fp32_chunked"
    return "int_mm"


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def linear_w8a16(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    grouped = scale.dim() == 2
    kernel = w8a16_kernel(_rows(x), x.dtype, x.device, grouped,
                          float_kernels.in_inductor_capture())
    if kernel == "compact":
        return float_kernels.linear_compact(x, qweight, bias, scale)
    if kernel == "weight_int8pack_mm":
        out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), qweight, scale.to(x.dtype))
        out = out.view(*x.shape[:-1], qweight.shape[0])
    elif kernel == "dequant_matmul_fp32":
        return float_kernels.linear_fp32_chunked(x, qweight, bias, scale)
    elif grouped:
        n, k = qweight.shape
        w = qweight.view(n, scale.shape[1], -1).to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)
        out = F.linear(x, w.view(n, k))
    else:
        # Scale the [M, N] output rather than the [N, K] weight: less work at
        # small M, and exact either way for per-output-channel scales.
        out = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
    return out if bias is None else out + bias


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a 2-D float tensor: (q int8 [M,K], scale f32 [M,1])."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(xf / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def _int8_matmul(a: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """a[M,K] int8 @ qweight[N,K]^T as exact int32 (`_int_mm`) or its fp32 value."""
    kernel = w8a8_kernel(a.shape[0], a.device, float_kernels.in_inductor_capture())
    if kernel == "int_mm":
        return torch._int_mm(a, qweight.t())
    if kernel == "compact":
        return float_kernels.linear_compact(a.float(), qweight, None)
    if kernel == "fp32_chunked":
        return float_kernels.linear_fp32_chunked(a.float(), qweight, None)
    return F.linear(a.float(), qweight.float())


def linear_w8a8_dynamic(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    xq, xs = quantize_per_token(x.reshape(-1, x.shape[-1]))
    out = _int8_matmul(xq, qweight).float() * xs * scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


def linear_w8a8_static(x: torch.Tensor, qweight: torch.Tensor, input_scale: torch.Tensor,
                       input_offset: torch.Tensor, quant_bias: torch.Tensor,
                       deq_scale: torch.Tensor) -> torch.Tensor:
    xf = x.reshape(-1, x.shape[-1]).float()
    xq = torch.round(xf / input_scale.float() + input_offset.float())
    xq = xq.clamp(_INT8_MIN, _INT8_MAX).to(torch.int8)
    acc = _int8_matmul(xq, qweight)
    out = (acc + quant_bias).float() * deq_scale.float()
    return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])
