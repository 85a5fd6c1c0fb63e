"""ModelConfig: what the decoder needs from a checkpoint's config (config.json-like)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
    # config.json as transformers normalises it (rope parameters included),
    # or as the checkpoint wrote it for a family transformers has no class
    # for; kept whole so the manifest records it and rope init can use it.
    hf_config: dict[str, Any]
    # What differs per family; the defaults are Llama's.
    norm: str = "rms"  # "rms" | "layer" (LayerNorm with bias: Falcon)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    # Rotary dims per head (GLM rotates half of each head), 0 = head_dim; the
    # interleaved layout pairs dims (2i, 2i+1) instead of (i, i + dim / 2).
    rotary_dim: int = 0
    rotary_interleaved: bool = False
    # "sequential" (Llama), "parallel" (Falcon: attention and MLP read the
    # same input), "sandwich" (Glm4: a norm after attention and after MLP).
    layer_kind: str = "sequential"
    # Falcon with new_decoder_architecture: separate input norms for attention and MLP.
    parallel_norms: int = 1
    gated_mlp: bool = True  # act(gate) * up; False: act(up) (Falcon's GELU MLP)
    # Mixture of experts (Mixtral): experts per layer, experts per token.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    # Qwen's MoE families: each expert's width (0: intermediate_size), whether
    # the top-k routing weights are renormalised to sum to 1 (Mixtral: always),
    # a shared expert of this width behind a sigmoid gate (0: none), and the
    # layers that keep a dense MLP of intermediate_size.
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    dense_layers: tuple[int, ...] = ()
    # Rope parameters for a family whose config.json spells them its own way
    # (ChatGLM's rope_ratio); None: read from hf_config.
    rope_override: dict[str, Any] | None = None

    @property
    def num_params(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn += self.num_heads * self.head_dim * h
        dense = (3 if self.gated_mlp else 2) * h * i
        moe = 3 * h * (self.moe_intermediate_size or i) * self.num_experts + h * self.num_experts
        if self.shared_expert_intermediate_size:
            moe += 3 * h * self.shared_expert_intermediate_size + h
        n_moe = self.num_layers - len(self.dense_layers) if self.num_experts else 0
        mlp = n_moe * moe + (self.num_layers - n_moe) * dense
        head = 0 if self.tie_word_embeddings else v * h
        return v * h + self.num_layers * (attn + 2 * h) + mlp + h + head

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """rope_type, rope_theta and the scaling fields, in either config layout."""
        if self.rope_override is not None:
            return dict(self.rope_override)
        params = dict(self.hf_config.get("rope_parameters") or {})
        if not params:  # transformers 4.x layout
            params = dict(self.hf_config.get("rope_scaling") or {})
            params.setdefault("rope_theta", self.hf_config.get("rope_theta", 10000.0))
        params.setdefault("rope_type", params.pop("type", "default"))
        return params

    @property
    def derived_max_model_len(self) -> int:
        """vLLM's rule: max_position_embeddings, times the factor of 'dynamic'
        rope scaling, which exists to run past it."""
        rope = self.rope_parameters
        if rope["rope_type"] == "dynamic":
            return int(self.max_position_embeddings * float(rope.get("factor", 1.0)))
        return self.max_position_embeddings

    def resolve_max_model_len(self, requested: int | None) -> int:
        """vLLM's rule: default to the derived max_model_len, never exceed it."""
        limit = self.derived_max_model_len
        if requested is None:
            return limit
        if requested <= 0:
            raise ValueError(f"max_model_len must be positive, got {requested}")
        if requested > limit:
            raise ValueError(
                f"User-specified max_model_len ({requested}) is greater than the derived "
                f"max_model_len ({limit}, from max_position_embeddings="
                f"{self.max_position_embeddings} in the model's config.json). "
                "Decrease max_model_len."
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
        """The config of the family config.json's architecture names (models/registry.py)."""
        from aotllm.models.registry import model_spec

        return model_spec(raw).parse_config(raw)

    @classmethod
    def from_transformers(cls, raw: dict[str, Any], architecture: str,
                          **family: Any) -> "ModelConfig":
        """The common fields of a family transformers ships a config class for;
        `family` sets (or overrides) what differs per family."""
        from transformers import AutoConfig

        d = dict(raw)
        hf = AutoConfig.for_model(d.pop("model_type"), **d)
        num_heads = hf.num_attention_heads
        num_kv_heads = getattr(hf, "num_key_value_heads", None) or num_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        layer_types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
        window = getattr(hf, "sliding_window", None)
        windows = tuple(
            window if (t == "sliding_attention" and window) else None for t in layer_types
        )
        bias = bool(getattr(hf, "attention_bias", False))
        fields: dict[str, Any] = dict(
            architecture=architecture,
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=getattr(hf, "intermediate_size", 0),
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            hidden_act=getattr(hf, "hidden_act", "silu"),
            sliding_windows=windows,
            hf_config=hf.to_dict(),
        )
        fields.update(family)
        return cls(**fields).validated()

    def validated(self) -> "ModelConfig":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        return self
