"""Which Hugging Face architectures aotllm can build, and how: the model specs.

A spec is everything a family adds to the shared decoder: how to read its
config.json (`parse_config`) and its module class, which names its
checkpoint's tensors (`CausalLM.weight_map`). A new family is one file under
models/ with a `SPECS` list and one entry in `_FAMILY_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aotllm.models.config import ModelConfig
    from aotllm.models.decoder import CausalLM


@dataclass(frozen=True)
class ModelSpec:
    architecture: str  # as config.json's "architectures" names it
    model_types: tuple[str, ...]  # the model_type values that go with it
    parse_config: Callable[[dict[str, Any]], "ModelConfig"]
    model_class: type["CausalLM"]
    # No transformers class: config.json is read as written, never by running
    # the checkpoint's own code (trust_remote_code is accepted, never needed).
    remote_code: bool = False


# Family modules, imported when a checkpoint asks for one of their architectures.
_FAMILY_MODULES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "InternLM2ForCausalLM": "internlm2",
    "GlmForCausalLM": "glm",
    "Glm4ForCausalLM": "glm",
    "ChatGLMForConditionalGeneration": "glm",
    "ChatGLMModel": "glm",
    "FalconForCausalLM": "falcon",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen_moe",
    "Qwen3MoeForCausalLM": "qwen_moe",
}
SUPPORTED = tuple(sorted(_FAMILY_MODULES))


def _spec(architecture: str) -> ModelSpec:
    module = importlib.import_module(f"aotllm.models.{_FAMILY_MODULES[architecture]}")
    return next(s for s in module.SPECS if s.architecture == architecture)


def model_spec(raw_config: dict[str, Any]) -> ModelSpec:
    """The spec of the first architecture config.json names that aotllm supports."""
    archs = raw_config.get("architectures") or []
    for arch in archs:
        if arch in _FAMILY_MODULES:
            spec = _spec(arch)
            if raw_config.get("model_type") not in spec.model_types:
                raise ValueError(
                    f"config.json says architecture {arch} but model_type "
                    f"{raw_config.get('model_type')!r}; expected "
                    f"{' or '.join(map(repr, spec.model_types))}. Fix the checkpoint's config.json."
                )
            return spec
    named = ", ".join(archs) if archs else "none (the 'architectures' field is missing)"
    raise ValueError(
        f"unsupported model architecture: {named}. aotllm supports {', '.join(SUPPORTED)}. "
        "Check the 'architectures' field of the checkpoint's config.json."
    )


def resolve_architecture(raw_config: dict[str, Any]) -> str:
    return model_spec(raw_config).architecture


def architecture_for_model_type(model_type: str) -> str | None:
    """The architecture a bare model_type implies (GGUF files name no HF class)."""
    for arch in SUPPORTED:
        if model_type in _spec(arch).model_types:
            return arch
    return None


def build_model(config: "ModelConfig", dtype, ops, tp=None) -> "CausalLM":
    """The family's module for a parsed config (weights still unloaded); with
    `tp` (models/parallel.py) one tensor-parallel rank's part of it."""
    cls = _spec(config.architecture).model_class
    return cls(config, dtype, ops=ops) if tp is None else cls(config, dtype, ops=ops, tp=tp)
