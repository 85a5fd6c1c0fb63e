"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention with the routed
experts of models/moe.py; Qwen2-MoE adds a shared expert behind a sigmoid
gate. Checkpoint names as transformers writes them (mlp.gate,
mlp.experts.E.gate_proj/up_proj/down_proj, mlp.shared_expert.*,
mlp.shared_expert_gate): no renames.
"""

from __future__ import annotations

from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec


def _moe_fields(hf: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The config's MoE fields; layers in mlp_only_layers, or off the
    decoder_sparse_step grid, keep a dense MLP (as transformers builds them)."""
    step = hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or ())
    dense = tuple(i for i in range(num_layers) if i in only or (i + 1) % step)
    # transformers 5 writes Qwen3-MoE's num_experts (config.json's spelling) as num_local_experts.
    experts = hf.get("num_experts") or hf["num_local_experts"]
    return dict(num_experts=experts, num_experts_per_tok=hf["num_experts_per_tok"],
                moe_intermediate_size=hf["moe_intermediate_size"],
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)), dense_layers=dense)


def _qwen2_moe(raw: dict[str, Any]) -> ModelConfig:
    layers = raw["num_hidden_layers"]
    config = ModelConfig.from_transformers(raw, "Qwen2MoeForCausalLM", o_bias=False)
    from dataclasses import replace

    hf = config.hf_config
    return replace(config, qkv_bias=bool(hf.get("qkv_bias", True)),
                   shared_expert_intermediate_size=hf.get("shared_expert_intermediate_size") or 0,
                   **_moe_fields(hf, layers))


def _qwen3_moe(raw: dict[str, Any]) -> ModelConfig:
    config = ModelConfig.from_transformers(raw, "Qwen3MoeForCausalLM", qk_norm=True)
    from dataclasses import replace

    return replace(config, **_moe_fields(config.hf_config, config.num_layers))


SPECS = [
    ModelSpec("Qwen2MoeForCausalLM", ("qwen2_moe",), _qwen2_moe, CausalLM),
    ModelSpec("Qwen3MoeForCausalLM", ("qwen3_moe",), _qwen3_moe, CausalLM),
]
