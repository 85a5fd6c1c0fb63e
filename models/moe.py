"""Routed experts with static shapes (Mixtral's sparse MoE block; Qwen2-MoE's
adds a shared expert behind a sigmoid gate, Qwen3-MoE's is Mixtral's with
optional renormalisation of the top-k weights).

The expert matrices are stacked per layer ([E, 2I, H] gate/up, [E, H, I]
down). Each bucket graph is traced for a fixed number of tokens N, so the
path is chosen at trace time from N:

- N * top_k <= E (decode at small batch): gather the chosen experts' matrices
  by index and run them as batched matmuls. The graph reads top_k experts'
  weights per token, never all of them.
- otherwise (prefill, large batches): every expert runs on every token and
  the results are combined with routing weights that are zero for experts a
  token did not choose. Each expert's weights are read once per step.

Routing stays float (the router and the shared expert's gate are not
`Linear`s, so quantize/ leaves them alone), as do the experts. The shared
expert is a dense MLP of `Linear`s and quantizes like one.
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
        """Each expert's gate_proj, up_proj, down_proj (Qwen's names; Mixtral's
        file renames them to w1, w3, w2) into the stacks."""
        i = self.intermediate_size
        out = {}
        for e in range(self.num_experts):
            out[f"{prefix}.{e}.gate_proj.weight"] = Shard(f"{prefix}.gate_up", expert=e, start=0,
                                                          size=i)
            out[f"{prefix}.{e}.up_proj.weight"] = Shard(f"{prefix}.gate_up", expert=e, start=i,
                                                        size=i)
            out[f"{prefix}.{e}.down_proj.weight"] = Shard(f"{prefix}.down", expert=e)
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
        self.norm_topk_prob = config.norm_topk_prob
        self.full_intermediate = config.moe_intermediate_size or config.intermediate_size
        self.start, local = tp.even(self.full_intermediate, "moe_intermediate_size")
        self.gate = Router(config.hidden_size, config.num_experts, dtype)
        self.experts = Experts(config.num_experts, config.hidden_size, local, dtype)
        self.act = ACT2FN[config.hidden_act]
        if config.shared_expert_intermediate_size:
            from aotllm.models.decoder import MLP

            # Whole on every rank (not split): it is added after the experts'
            # all-reduce.
            self.shared_expert = MLP(config, ops, dtype,
                                     intermediate_size=config.shared_expert_intermediate_size)
            self.shared_expert_gate = Router(config.hidden_size, 1, dtype)  # one logit per token
        else:
            self.shared_expert = None
        # The row count at which forward changes path, for graphs whose row
        # count is dynamic (compiler/shape_groups.py keeps each on one side).
        self.row_thresholds = (("<=", self.num_experts // self.top_k),)

    def tp_splits(self, prefix: str) -> dict[str, Split]:
        full, a, n = self.full_intermediate, self.start, self.experts.intermediate_size
        return {f"{prefix}.experts.gate_up": Split(1, row_index([(0, a, n), (full, a, n)])),
                f"{prefix}.experts.down": Split(2, torch.arange(a, a + n, device="cpu"))}

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, H] -> (weights [N, k], expert ids [N, k]): softmax, top-k, renormalised
        where the family says so."""
        probs = torch.softmax(F.linear(x, self.gate.weight).float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
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
        if self.tp.enabled:
            out = self.ops.all_reduce(out)
        if self.shared_expert is not None:
            gate = torch.sigmoid(F.linear(x, self.shared_expert_gate.weight))
            out = out + gate * self.shared_expert(x)
        return out.view(shape)

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
        # [N, E], zero where not chosen, built from a one-hot of the ids rather
        # than scattered into zeros: an exporter folds a zeros tensor into an
        # [N, E] constant per graph (ONNX), where this keeps only arange(E).
        # Exactly scatter's values: each entry sums one weight and k - 1 zeros.
        experts = torch.arange(self.num_experts, device=x.device)
        combine = ((ids.unsqueeze(-1) == experts).to(x.dtype) * weights.unsqueeze(-1)).sum(dim=1)
        out = None  # not zeros_like(x): that folds into an [N, H] constant the same way
        for e in range(self.num_experts):
            h = F.linear(x, self.experts.gate_up[e])
            y = F.linear(self.act(h[:, :i]) * h[:, i:], self.experts.down[e])
            y = y * combine[:, e : e + 1]
            out = y if out is None else out + y
        return out
