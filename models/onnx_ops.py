"""The ops the ONNX backend builds the model with: TorchOps, reshaped for export.

Every primitive lowers to plain ai.onnx operators that both onnxruntime's CPU
provider and Ascend's ATC take (Gemm, ScatterND, Cast, Mul, Round, Clip,
ReduceMax: no MatMulInteger, DynamicQuantizeLinear or DequantizeLinear, which
ATC's ONNX parser does not list). Two shapes matter beyond "it exports":

- `write_kv` indexes the 5-D cache itself, so the exported ScatterND reads the
  graph input and its result *is* the graph output, with no Reshape between.
  onnxruntime then writes in place when the runtime binds the same buffer as
  input and output (measured: ScatterND skips its copy when the two alias).
- linears flatten to 2-D so they export as Gemm(transB=1) over the weight as
  stored: no Transpose of a weight for the exporter or onnxruntime to fold
  into a second, per-graph copy.

The int8 linears take the integers through a float matmul (the route
models/int8_kernels.py uses on CUDA): exact up to float32 accumulation, and
`_weight_int8pack_mm` / `_int_mm` have no ONNX translation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aotllm.models.int8_kernels import quantize_per_token
from aotllm.models.ops import TorchOps

_INT8_MIN, _INT8_MAX = -128, 127


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
          ) -> torch.Tensor:
    """x[..., K] @ weight[N, K]^T (+ bias) as one 2-D Gemm."""
    out = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class OnnxOps(TorchOps):
    name = "onnx"

    @staticmethod
    def write_kv(
        kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        two, _, bs, h, d = kv_cache.shape
        kv = torch.stack((k.reshape(-1, h, d), v.reshape(-1, h, d))).to(kv_cache.dtype)
        which = torch.arange(two, device=kv_cache.device).view(two, 1)
        block = (slot_mapping // bs).view(1, -1)
        offset = (slot_mapping % bs).view(1, -1)
        kv_cache.index_put_((which, block, offset), kv)

    @staticmethod
    def paged_attention(q, kv_cache, block_tables, positions, context_lens, query_lens,
                        scale, sliding_window=None):
        # TorchOps gathers with kv_cache[0][block_tables]; in ONNX kv_cache[0]
        # is a Gather that copies half the whole cache every layer and step
        # (measured: ~9 ms per step for 2 x 64 MiB caches). One Gather of just
        # the rows' blocks from the flattened cache (a Reshape, no copy) instead,
        # then TorchOps' attention over a cache made of those blocks alone.
        two, nb, bs, h, d = kv_cache.shape
        b, maxb = block_tables.shape
        rows = torch.stack((block_tables, block_tables + nb)).reshape(-1)
        context = kv_cache.reshape(two * nb, bs, h, d)[rows].view(two, b * maxb, bs, h, d)
        tables = torch.arange(b * maxb, device=block_tables.device).view(b, maxb)
        return TorchOps.paged_attention(q, context, tables, positions, context_lens,
                                        query_lens, scale, sliding_window)

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return _gemm(x, weight, bias)

    @staticmethod
    def linear_w8a16(x, qweight, scale, bias):
        if scale.dim() == 2:  # grouped: the scale varies along K, so scale the weight
            n, k = qweight.shape
            w = qweight.view(n, scale.shape[1], -1).to(x.dtype) * scale.to(x.dtype).unsqueeze(-1)
            out = _gemm(x, w.view(n, k))
        else:
            out = _gemm(x, qweight.to(x.dtype)) * scale.to(x.dtype)
        return out if bias is None else out + bias

    @staticmethod
    def linear_w8a8_dynamic(x, qweight, scale, bias):
        xq, xs = quantize_per_token(x.reshape(-1, x.shape[-1]))
        acc = F.linear(xq.float(), qweight.float())
        out = acc * xs * scale.float()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])

    @staticmethod
    def linear_w8a8_static(x, qweight, input_scale, input_offset, quant_bias, deq_scale):
        xf = x.reshape(-1, x.shape[-1]).float()
        xq = torch.round(xf / input_scale.float() + input_offset.float())
        xq = xq.clamp(_INT8_MIN, _INT8_MAX)
        acc = F.linear(xq, qweight.float()) + quant_bias.float()
        out = acc * deq_scale.float()
        return out.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])
