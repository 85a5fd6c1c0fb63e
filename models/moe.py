"""Routed experts with static shapes (Mixtral's sparse MoE block).

The expert matrices are stacked per layer ([E, 2I, H] gate/up, [E, H, I]
down). Each bucket graph is traced for a fixed number of tokens N, so the
path is chosen at trace time from N:

- N * top_k <= E (decode at small batch): gather the chosen experts' matrices
  by index and run them as batched matmuls. The graph reads top_k experts'
  weights per token, never all of them.
- otherwise (prefill, large batches): every expert runs on every token and
  the results are combined with routing weights that are zero for experts a
  token did not choose. Each expert's weights are read once per step.

Routing stays float (the router is not a `Linear`, so quantize/ leaves it
alone), as do the experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from aotllm.models.config import ModelConfig
from aotllm.models.layers import _empty
from aotllm.models.parallel import Split, TensorParallel, row_index
from aotllm.models.weights import Shard


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, dtype: torch.dtype):
        super().__init__()
        self.weight = _empty(num_experts, hidden_size, dtype=dtype)


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype):
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up = _empty(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype)
        self.down = _empty(num_experts, hidden_size, intermediate_size, dtype=dtype)

    def weight_shards(self, prefix: str) -> dict[str, Shard]:
        """Mixtral's per-expert w1 (gate), w3 (up), w2 (down) into the stacks."""
        i = self.intermediate_size
        out = {}
        for e in range(self.num_experts):
            out[f"{prefix}.{e}.w1.weight"] = Shard(f"{prefix}.gate_up", expert=e, start=0, size=i)
            out[f"{prefix}.{e}.w3.weight"] = Shard(f"{prefix}.gate_up", expert=e, start=i, size=i)
            out[f"{prefix}.{e}.w2.weight"] = Shard(f"{prefix}.down", expert=e)
        return out


class SparseMoE(nn.Module):
    """Under tensor parallelism every rank routes alike (the router is whole)
    and holds its slice of each expert's intermediate dimension (vLLM's TP
    for experts); the partial outputs are summed by one all-reduce."""

    def __init__(self, config: ModelConfig, ops, dtype: torch.dtype,
                 tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.ops = ops
        self.tp = tp
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.full_intermediate = config.intermediate_size
        self.start, local = tp.even(config.intermediate_size, "intermediate_size")
        self.gate = Router(config.hidden_size, config.num_experts, dtype)
        self.experts = Experts(config.num_experts, config.hidden_size, local, dtype)
        self.act = ACT2FN[config.hidden_act]
        # The row count at which forward changes path, for graphs whose row
        # count is dynamic (compiler/shape_groups.py keeps each on one side).
        self.row_thresholds = (("<=", self.num_experts // self.top_k),)

    def tp_splits(self, prefix: str) -> dict[str, Split]:
        full, a, n = self.full_intermediate, self.start, self.experts.intermediate_size
        return {f"{prefix}.experts.gate_up": Split(1, row_index([(0, a, n), (full, a, n)])),
                f"{prefix}.experts.down": Split(2, torch.arange(a, a + n, device="cpu"))}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H] -> (weights [N, k], expert ids [N, k]): softmax, top-k, renormalised."""
        probs = torch.softmax(F.linear(x, self.gate.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x)
        if x.shape[0] <= self.num_experts // self.top_k:
            out = self._gathered(x, weights, ids)
        else:
            out = self._all_experts(x, weights, ids)
        out = out.view(shape)
        return self.ops.all_reduce(out) if self.tp.enabled else out

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        i = self.experts.intermediate_size
        gate_up = self.experts.gate_up[ids]  # [N, k, 2I, H]: only the chosen experts
        h = torch.matmul(gate_up, x[:, None, :, None]).squeeze(-1)  # [N, k, 2I]
        a = self.act(h[..., :i]) * h[..., i:]
        down = self.experts.down[ids]  # [N, k, H, I]
        y = torch.matmul(down, a.unsqueeze(-1)).squeeze(-1)  # [N, k, H]
        return (y * weights.unsqueeze(-1)).sum(dim=1)

    def _all_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        i = self.experts.intermediate_size
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, ids, weights)  # [N, E], zero where not chosen
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            h = F.linear(x, self.experts.gate_up[e])
            y = F.linear(self.act(h[:, :i]) * h[:, i:], self.experts.down[e])
            out = out + y * combine[:, e : e + 1]
        return out
