"""Building blocks of the decoder families; every backend-specific part goes
through the ops object handed in at construction."""

from __future__ import annotations

import torch
from torch import nn


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
