"""Building blocks of the decoder families; every backend-specific part goes
through the ops object handed in at construction."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from aotllm.models.parallel import TensorParallel
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
    """Token embedding; vocab-parallel under tensor parallelism: this rank holds
    rows [vocab_start, vocab_start + rows) and the ranks' lookups are summed
    (a token's row is on exactly one rank, the others add zeros)."""

    def __init__(self, num_embeddings: int, dim: int, dtype: torch.dtype, ops=None,
                 tp: "TensorParallel | None" = None):
        super().__init__()
        self.ops = ops
        self.tp = tp
        if tp is not None and tp.enabled:
            start, rows = tp.vocab(num_embeddings)
            self.weight = _empty(rows, dim, dtype=dtype)
            # A tensor, not a Python int: the rank's offset is data bound at
            # load time, so every rank runs the same compiled graph.
            self.register_buffer("vocab_start", torch.tensor([start]), persistent=False)
        else:
            self.weight = _empty(num_embeddings, dim, dtype=dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None or not self.tp.enabled:
            return torch.nn.functional.embedding(ids, self.weight)
        local = ids - self.vocab_start
        here = (local >= 0) & (local < self.weight.shape[0])
        rows = torch.nn.functional.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return self.ops.all_reduce(rows * here.unsqueeze(-1).to(rows.dtype))


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
