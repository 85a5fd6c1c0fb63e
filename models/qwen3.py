"""Qwen3: the Llama decoder plus a per-head RMSNorm on q and k before rotary."""

from __future__ import annotations

from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec


def _qwen3(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_transformers(raw, "Qwen3ForCausalLM", qk_norm=True)


# transformers' names, q_norm / k_norm under self_attn included: no renames.
SPECS = [ModelSpec("Qwen3ForCausalLM", ("qwen3",), _qwen3, CausalLM)]
