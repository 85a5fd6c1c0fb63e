"""ModelConfig: what the decoder needs from a checkpoint's config (config.json-like)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aotllm.models.registry import resolve_architecture


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    hidden_act: str
    # Per layer: the sliding-window size, or None for full attention.
    sliding_windows: tuple[int | None, ...]
    # config.json as transformers normalises it (rope parameters included);
    # kept whole so the manifest records it and rope init can use it.
    hf_config: dict[str, Any]

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * h
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * per_layer + h + head

    def resolve_max_model_len(self, requested: int | None) -> int:
        """vLLM's rule: default to max_position_embeddings, never exceed it."""
        if requested is None:
            return self.max_position_embeddings
        if requested <= 0:
            raise ValueError(f"max_model_len must be positive, got {requested}")
        if requested > self.max_position_embeddings:
            raise ValueError(
                f"User-specified max_model_len ({requested}) is greater than the derived "
                f"max_model_len (max_position_embeddings={self.max_position_embeddings} "
                "in the model's config.json). Decrease max_model_len."
            )
        return requested

    def hf_config_object(self):
        """The transformers config object (for rope init and the tokenizer side)."""
        from transformers import AutoConfig

        d = dict(self.hf_config)
        return AutoConfig.for_model(d.pop("model_type"), **d)

    @classmethod
    def from_pretrained(cls, checkpoint: str | Path) -> "ModelConfig":
        """From a checkpoint directory's config.json or a GGUF file's metadata."""
        from aotllm.models.checkpoint import open_checkpoint

        return cls.from_hf_dict(open_checkpoint(checkpoint).raw_config())

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        architecture = resolve_architecture(raw)
        from transformers import AutoConfig

        d = dict(raw)
        hf = AutoConfig.for_model(d.pop("model_type"), **d)
        num_heads = hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({num_heads}) must be a multiple of "
                f"num_key_value_heads ({num_kv_heads})"
            )
        model_type = hf.model_type
        # Qwen2 always has q/k/v biases and no o_proj bias; Llama/Mistral use
        # `attention_bias` for all four projections.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(hf, "attention_bias", False))
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        if model_type == "mistral":
            layer_types = ["sliding_attention" if window else "full_attention"] * hf.num_hidden_layers
        windows = tuple(
            window if (t == "sliding_attention" and window) else None for t in layer_types
        )
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=hf.hidden_act,
            sliding_windows=windows,
            hf_config=hf.to_dict(),
        )
