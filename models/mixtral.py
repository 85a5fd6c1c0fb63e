"""Mixtral: the Llama attention with a sparse MoE block (models/moe.py) in
place of the MLP; checkpoint names as on the hub (block_sparse_moe.gate,
block_sparse_moe.experts.E.w1/w2/w3)."""

from __future__ import annotations

from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec


def _mixtral(raw: dict[str, Any]) -> ModelConfig:
    config = ModelConfig.from_transformers(raw, "MixtralForCausalLM")
    from dataclasses import replace

    hf = config.hf_config
    window = hf.get("sliding_window")
    return replace(config, num_experts=hf["num_local_experts"],
                   num_experts_per_tok=hf["num_experts_per_tok"],
                   sliding_windows=(window or None,) * config.num_layers)


class MixtralForCausalLM(CausalLM):
    renames = (
        (r"\.mlp\.", ".block_sparse_moe."),
        (r"(\.experts\.\d+)\.gate_proj\.", r"\1.w1."),
        (r"(\.experts\.\d+)\.up_proj\.", r"\1.w3."),
        (r"(\.experts\.\d+)\.down_proj\.", r"\1.w2."),
    )


SPECS = [ModelSpec("MixtralForCausalLM", ("mixtral",), _mixtral, MixtralForCausalLM)]
