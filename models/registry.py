"""Which Hugging Face architectures aotllm can build."""

from __future__ import annotations

from typing import Any

# architecture name in config.json -> (model_type, decoder family)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}


def resolve_architecture(raw_config: dict[str, Any]) -> str:
    archs = raw_config.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            if raw_config.get("model_type") != SUPPORTED_ARCHITECTURES[arch]:
                raise ValueError(
                    f"config.json says architecture {arch} but model_type "
                    f"{raw_config.get('model_type')!r}; expected "
                    f"{SUPPORTED_ARCHITECTURES[arch]!r}. Fix the checkpoint's config.json."
                )
            return arch
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    named = ", ".join(archs) if archs else "none (the 'architectures' field is missing)"
    raise ValueError(
        f"unsupported model architecture: {named}. aotllm supports {supported}. "
        "Check the 'architectures' field of the checkpoint's config.json."
    )
