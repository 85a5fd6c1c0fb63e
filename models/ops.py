"""The ops layer: the primitives whose implementation differs per backend.

Models call these through an object satisfying the `Ops` protocol, chosen when
the model is built (that is, at trace time); model code never branches on the
backend. `TorchOps` is the plain-torch implementation used by the eager path,
Inductor/AOTInductor and ONNX export. An Ascend implementation provides the
same methods with torch_npu ops (see the README's table).

Shapes (B rows, T tokens per row, KV layout from graphs.kv_cache):
  q            [B, T, num_heads, head_dim]
  k, v         [B, T, num_kv_heads, head_dim]
  kv_cache     [2, num_blocks, block_size, num_kv_heads, head_dim]
  slot_mapping [B*T]  flat slot per token; padding tokens point into block 0
  block_tables [B, MAXB]
  positions    [B, T]  absolute position of each token
  context_lens [B]     tokens in the cache for the row once this step's are written
  query_lens   [B]     valid tokens of the row in this step (the rest is padding)

Quantized linears (quantize/ swaps them in; the tensors' layout is theirs):
  x            [..., in] in the model dtype
  qweight      [out, in] int8
  scale        [out] float32 per output channel, or [out, in // group] (w8a16 grouped)
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from aotllm.models import float_kernels, int8_kernels


class Ops(Protocol):
    """What a backend provides; models are written against this and nothing else."""

    name: str

    def write_kv(self, kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None: ...

    def paged_attention(self, q: torch.Tensor, kv_cache: torch.Tensor,
                        block_tables: torch.Tensor, positions: torch.Tensor,
                        context_lens: torch.Tensor, query_lens: torch.Tensor, scale: float,
                        sliding_window: int | None = None) -> torch.Tensor:
        """Attention of each row's T queries over its cached context (this step's
        K/V already written). Lengths come as tensors, never Python ints, so one
        graph serves every length of its bucket (the NPU kernels take
        `actual_seq_lengths` / `actual_seq_lengths_kv` the same way)."""
        ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def rotary(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor: ...

    def linear_w8a16(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ (qweight * scale)^T + bias, activations in the model dtype."""
        ...

    def linear_w8a8_dynamic(self, x: torch.Tensor, qweight: torch.Tensor,
                            scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Per-token symmetric int8 activations, int8 x int8 -> int32 matmul, rescale."""
        ...

    def linear_w8a8_static(self, x: torch.Tensor, qweight: torch.Tensor,
                           input_scale: torch.Tensor, input_offset: torch.Tensor,
                           quant_bias: torch.Tensor, deq_scale: torch.Tensor) -> torch.Tensor:
        """msModelSlim's static W8A8: x_q = clamp(round(x / input_scale + input_offset)),
        y = (x_q @ qweight^T + quant_bias) * deq_scale."""
        ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the tensor-parallel group (models/parallel.py)."""
        ...

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """The ranks' tensors concatenated along `dim`, in rank order."""
        ...


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Functional collectives, so the sum is an op inside each bucket's graph:
    torch.export keeps `_c10d_functional.all_reduce` + `wait_tensor`,
    AOTInductor compiles them (checked with torch 2.13 over gloo) and
    torchair converts them to HCCL. Models call this only when the group has
    more than one rank, so a TP=1 graph has no collective at all."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def all_gather(x: torch.Tensor, dim: int) -> torch.Tensor:
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    # A non-negative dim: all_gather_tensor mis-shapes a negative one (torch 2.13).
    return funcol.all_gather_tensor(x.contiguous(), dim % x.dim(), dist.group.WORLD)


class TorchOps:
    """Plain torch; the int8 kernels come from `int8_kernels` (checked on CPU)."""

    name = "torch"

    @staticmethod
    def write_kv(
        kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        two, nb, bs, h, d = kv_cache.shape
        flat = kv_cache.view(two, nb * bs, h, d)
        kv = torch.stack((k.reshape(-1, h, d), v.reshape(-1, h, d))).to(kv_cache.dtype)
        # One index_put_ over both halves: Inductor re-inplaces it into a write
        # of just these slots. index_copy_ (or two index_put_ on the halves)
        # gets functionalised into a copy of the whole cache per layer.
        which = torch.arange(two, device=kv_cache.device).view(two, 1)
        flat.index_put_((which, slot_mapping.view(1, -1)), kv)

    @staticmethod
    def paged_attention(
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        block_tables: torch.Tensor,
        positions: torch.Tensor,
        context_lens: torch.Tensor,
        query_lens: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        # query_lens is not needed here: the mask from positions and
        # context_lens already covers every valid query, and padding queries'
        # outputs are never read.
        b, t, hq, d = q.shape
        _, _, bs, hkv, _ = kv_cache.shape
        maxb = block_tables.shape[1]
        s = maxb * bs
        # Gather each row's blocks into a contiguous [B, S, Hkv, D] context.
        k = kv_cache[0][block_tables].reshape(b, s, hkv, d).transpose(1, 2).to(q.dtype)
        v = kv_cache[1][block_tables].reshape(b, s, hkv, d).transpose(1, 2).to(q.dtype)
        kpos = torch.arange(s, device=q.device)
        qpos = positions.unsqueeze(-1)  # [B, T, 1]
        mask = (kpos <= qpos) & (kpos < context_lens.view(b, 1, 1))
        if sliding_window is not None:
            mask = mask & (kpos > qpos - sliding_window)
        if t > 1:
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2), k, v, attn_mask=mask.unsqueeze(1), scale=scale,
                enable_gqa=hq != hkv,
            )
            return out.transpose(1, 2)
        # Decode (one query per row): plain batched matmuls over the grouped
        # heads. The CPU flash-attention kernel costs ~1 ms per call here, far
        # more than this tiny amount of math; Inductor fuses the softmax.
        g = hq // hkv
        qg = q.view(b, hkv, g, d)  # head h reads kv head h // g
        if q.device.type == "cpu" and float_kernels.in_inductor_capture():
            return _decode_attention_reductions(qg, k, v, mask, scale).view(b, 1, hq, d)
        # Contiguous [B, Hkv, S, D]: the gather then copies whole head_dim rows
        # and the matmul reads K through a transposed view instead of Inductor
        # materialising K^T element by element.
        k = k.contiguous()
        v = v.contiguous()
        scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G, S]
        scores = scores.masked_fill(~mask.view(b, 1, 1, s), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        return torch.matmul(probs, v).view(b, 1, hq, d)

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # Same order as transformers' LlamaRMSNorm: normalise in fp32, cast, scale.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(dtype)

    @staticmethod
    def rotary(
        q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-interleaved (rotate-half) rotary embedding; cos/sin are [B, T, head_dim]."""
        cos = cos.unsqueeze(2)
        sin = sin.unsqueeze(2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # bf16/fp16 on CPU (float_kernels.py), decided at trace time: up to 8
        # rows in a compiled graph run the compact kernel; prefill-sized calls
        # on a CPU without native half-precision matmuls compute in fp32.
        kernel = float_kernels.float_linear_kernel(_rows(x), x.dtype, x.device,
                                                   float_kernels.in_inductor_capture())
        if kernel == "fp32_chunked":
            return float_kernels.linear_fp32_chunked(x, weight, bias)
        if kernel == "compact":
            return float_kernels.linear_compact(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def linear_w8a16(x, qweight, scale, bias):
        return int8_kernels.linear_w8a16(x, qweight, scale, bias)

    @staticmethod
    def linear_w8a8_dynamic(x, qweight, scale, bias):
        return int8_kernels.linear_w8a8_dynamic(x, qweight, scale, bias)

    @staticmethod
    def linear_w8a8_static(x, qweight, input_scale, input_offset, quant_bias, deq_scale):
        return int8_kernels.linear_w8a8_static(
            x, qweight, input_scale, input_offset, quant_bias, deq_scale
        )

    all_reduce = staticmethod(all_reduce)
    all_gather = staticmethod(all_gather)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _decode_attention_reductions(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Decode attention written as reductions, for Inductor CPU graphs: Inductor
    fuses the block gather into them, where two batched matmuls per layer are
    library calls of ~75 us each, a tenth of a 125M model's batch-1 step.
    The same roundings as the matmul route (scores and output rounded to the
    model dtype), FP32 accumulation. qg [B, Hkv, G, D]; k, v [B, Hkv, S, D]
    (gathered views); mask [B, 1, S]."""
    b, s = qg.shape[0], k.shape[2]
    qg = float_kernels.realized(qg)  # the rotary output, computed once
    scores = (qg.float().unsqueeze(-2) * k.float().unsqueeze(2)).sum(-1)  # [B, Hkv, G, S]
    scores = scores.to(qg.dtype).float() * scale
    scores = scores.masked_fill(~mask.view(b, 1, 1, s), float("-inf"))
    probs = float_kernels.realized(torch.softmax(scores, dim=-1).to(qg.dtype))
    out = (probs.float().unsqueeze(-1) * v.float().unsqueeze(2)).sum(-2)  # [B, Hkv, G, D]
    return out.to(qg.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

