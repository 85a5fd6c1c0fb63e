"""Quantized linear modules: drop-in replacements for `models.layers.Linear`.

Each keeps its tensors as buffers under msModelSlim's names (`weight` int8
[out, in], `weight_scale`, ...), so the artifact's weights file, the graphs'
constant names and a msModelSlim checkpoint all use one vocabulary, and
forwards to the ops layer, which owns the kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from aotllm.models.layers import Linear
from aotllm.quantize.primitives import quantize_weight


class _QuantLinear(nn.Module):
    scheme = ""

    def __init__(self, in_features: int, out_features: int, ops, bias: torch.Tensor | None):
        super().__init__()
        self.ops = ops
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, scheme={self.scheme}"


class W8A16Linear(_QuantLinear):
    """`weight_scale` is kept in the activations' dtype (as msModelSlim stores it):
    Inductor lowers `_weight_int8pack_mm` only when its scales are a stored
    tensor, not a cast computed in the graph (checked with torch 2.13.0)."""

    scheme = "w8a16"

    def __init__(self, in_features, out_features, ops, bias=None, group_size: int | None = None):
        super().__init__(in_features, out_features, ops, bias)
        shape = (out_features,) if group_size is None else (out_features, in_features // group_size)
        self.register_buffer("weight_scale", torch.ones(shape, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: Linear, group_size: int | None = None) -> "W8A16Linear":
        m = cls(linear.in_features, linear.out_features, linear.ops, linear.bias, group_size)
        m.weight, scale = quantize_weight(linear.weight, group_size)
        m.weight_scale = scale.to(linear.weight.dtype)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_w8a16(x, self.weight, self.weight_scale, self.bias)


class W8A8DynamicLinear(_QuantLinear):
    scheme = "w8a8"

    def __init__(self, in_features, out_features, ops, bias=None):
        super().__init__(in_features, out_features, ops, bias)
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: Linear) -> "W8A8DynamicLinear":
        m = cls(linear.in_features, linear.out_features, linear.ops, linear.bias)
        m.weight, m.weight_scale = quantize_weight(linear.weight)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_w8a8_dynamic(x, self.weight, self.weight_scale, self.bias)


class W8A8StaticLinear(_QuantLinear):
    """msModelSlim's static W8A8: one activation scale and offset per tensor.

    The original bias and the activation offset live in the int32
    `quant_bias`; `deq_scale` is input_scale * weight_scale per output channel.
    """

    scheme = "w8a8_static"

    def __init__(self, in_features, out_features, ops):
        super().__init__(in_features, out_features, ops, None)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32))
        self.register_buffer("input_offset", torch.zeros(1, dtype=torch.float32))
        self.register_buffer("quant_bias", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("deq_scale", torch.ones(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, linear: Linear, input_absmax: float) -> "W8A8StaticLinear":
        m = cls(linear.in_features, linear.out_features, linear.ops)
        m.weight, w_scale = quantize_weight(linear.weight)
        x_scale = max(float(input_absmax), 1e-8) / 127.0
        m.input_scale.fill_(x_scale)
        m.deq_scale = w_scale * x_scale
        if linear.bias is not None:
            m.quant_bias = torch.round(linear.bias.detach().float() / m.deq_scale).to(torch.int32)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear_w8a8_static(
            x, self.weight, self.input_scale, self.input_offset, self.quant_bias, self.deq_scale
        )


QUANT_LINEARS: dict[str, type[_QuantLinear]] = {
    c.scheme: c for c in (W8A16Linear, W8A8DynamicLinear, W8A8StaticLinear)
}
