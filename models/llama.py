"""Llama, Qwen2 and Mistral: the shared decoder as it is, with transformers' names."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec


def _llama(raw: dict[str, Any]) -> ModelConfig:
    return ModelConfig.from_transformers(raw, "LlamaForCausalLM")


def _qwen2(raw: dict[str, Any]) -> ModelConfig:
    # Qwen2 always has q/k/v biases and no o_proj bias.
    return ModelConfig.from_transformers(raw, "Qwen2ForCausalLM", qkv_bias=True, o_bias=False)


def _mistral(raw: dict[str, Any]) -> ModelConfig:
    config = ModelConfig.from_transformers(raw, "MistralForCausalLM")
    # Mistral has no layer_types: a sliding_window applies to every layer.
    window = config.hf_config.get("sliding_window")
    return replace(config, sliding_windows=(window or None,) * config.num_layers)


SPECS = [
    ModelSpec("LlamaForCausalLM", ("llama",), _llama, CausalLM),
    ModelSpec("Qwen2ForCausalLM", ("qwen2",), _qwen2, CausalLM),
    ModelSpec("MistralForCausalLM", ("mistral",), _mistral, CausalLM),
]
