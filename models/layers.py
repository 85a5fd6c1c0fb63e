"""Building blocks of the decoder families; every backend-specific part goes
through the ops object handed in at construction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from aotllm.models.weights import Shard


def _empty(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    # Parameters start uninitialised: the loader fills every one of them, and
    # skipping random init keeps model construction instant for large models.
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _empty(out_features, in_features, dtype=dtype)
        self.bias = _empty(out_features, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.eps = eps
        self.weight = _empty(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(num_embeddings, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight)


class MergedLinear(Linear):
    """Several checkpoint projections stored as one matrix, one matmul (q/k/v
    as `qkv_proj`, gate/up as `gate_up_proj`, as vLLM does). It knows its
    shards by name, so the loader puts each checkpoint tensor in its rows."""

    def __init__(self, in_features: int, shards: tuple[tuple[str, int], ...], bias: bool,
                 ops, dtype: torch.dtype):
        super().__init__(in_features, sum(rows for _, rows in shards), bias, ops, dtype)
        self.shards = shards  # (checkpoint projection name, rows), in row order

    def weight_shards(self, prefix: str) -> dict[str, "Shard"]:
        from aotllm.models.weights import Shard

        parent = prefix.rpartition(".")[0]
        out = {}
        for attr, p in self.named_parameters(recurse=False):
            start = 0
            for piece, rows in self.shards:
                out[f"{parent}.{piece}.{attr}"] = Shard(f"{prefix}.{attr}", start=start, size=rows)
                start += rows
        return out


class LayerNorm(nn.Module):
    """LayerNorm with bias (Falcon). Plain torch on every backend: the ops layer
    has no layer_norm, and every graph format has a converter for it."""

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = _empty(hidden_size, dtype=dtype)
        self.bias = _empty(hidden_size, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
