"""GLM: transformers' GlmForCausalLM / Glm4ForCausalLM, and the original
ChatGLM2 / ChatGLM3 / GLM-4 remote-code checkpoints (model_type "chatglm"),
read from config.json and their tensor names without running their code.

What differs from Llama: rotary over the first half of each head with
interleaved pairs (the loader reorders q/k rows into the ops layer's
rotate-half order, see weights.rotary_rows), q/k/v biases without an o_proj
bias, gate/up stored as one tensor, and for Glm4 a norm after attention and
after the MLP.
"""

from __future__ import annotations

from typing import Any

import torch

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec
from aotllm.models.weights import WeightMap, merge, reorder, rotary_rows


def _glm(raw: dict[str, Any], architecture: str, **family: Any) -> ModelConfig:
    config = ModelConfig.from_transformers(raw, architecture, **family)
    rope = config.hf_config.get("rope_parameters") or {}
    factor = rope.get("partial_rotary_factor", config.hf_config.get("partial_rotary_factor", 0.5))
    from dataclasses import replace

    return replace(config, rotary_dim=int(config.head_dim * factor), rotary_interleaved=True,
                   qkv_bias=bool(config.hf_config.get("attention_bias", True)), o_bias=False)


def _chatglm(raw: dict[str, Any]) -> ModelConfig:
    """ChatGLM's own config.json (configuration_chatglm.py's fields)."""
    unsupported = {
        "rmsnorm": (True, "LayerNorm"),
        "add_bias_linear": (False, "biases on the dense and MLP linears"),
        "apply_residual_connection_post_layernorm": (False, "post-norm residuals"),
        "post_layer_norm": (True, "no final norm"),
        "original_rope": (True, "the non-original rope"),
    }
    for key, (want, what) in unsupported.items():
        if bool(raw.get(key, want)) != want:
            raise ValueError(f"this ChatGLM checkpoint uses {what} ({key}={raw[key]!r}); "
                             "aotllm reads ChatGLM2/ChatGLM3/GLM-4 checkpoints, which do not")
    if raw.get("pre_seq_len"):
        raise ValueError("ChatGLM P-tuning prefixes (pre_seq_len) are not supported; "
                         "use the checkpoint without its prefix encoder")
    heads = raw["num_attention_heads"]
    head_dim = raw.get("kv_channels") or raw["hidden_size"] // heads
    kv_heads = raw.get("multi_query_group_num", 1) if raw.get("multi_query_attention") else heads
    max_len = raw.get("seq_length", 2048)
    return ModelConfig(
        architecture=raw["architectures"][0],
        model_type="chatglm",
        vocab_size=raw["padded_vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_layers=raw["num_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=raw.get("layernorm_epsilon", 1e-5),
        max_position_embeddings=max_len,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bool(raw.get("add_qkv_bias", False)),
        o_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        sliding_windows=(None,) * raw["num_layers"],
        hf_config=dict(raw),
        # The rotary embedding is built with dim kv_channels // 2 over a base
        # of 10000 * rope_ratio (GLM-4 and the 32k ChatGLM3 set rope_ratio).
        rotary_dim=head_dim // 2,
        rotary_interleaved=True,
        rope_override={"rope_type": "default",
                       "rope_theta": 10000.0 * float(raw.get("rope_ratio", 1.0))},
    ).validated()


class GlmForCausalLM(CausalLM):
    def _rotary(self, heads: int) -> torch.Tensor:
        c = self.config
        return rotary_rows(heads, c.head_dim, c.rotary_dim, c.rotary_interleaved)

    def regroup(self, weight_map: WeightMap) -> None:
        c = self.config
        for i in range(c.num_layers):
            attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
            for attr in ("weight", "bias"):
                reorder(weight_map, f"{attn}.q_proj.{attr}", self._rotary(c.num_heads))
                reorder(weight_map, f"{attn}.k_proj.{attr}", self._rotary(c.num_kv_heads))
            merge(weight_map, mlp, ("gate_proj", "up_proj"), "gate_up_proj")


class ChatGLMForConditionalGeneration(GlmForCausalLM):
    renames = (
        (r"^model\.embed_tokens\.", "transformer.embedding.word_embeddings."),
        (r"^model\.layers\.", "transformer.encoder.layers."),
        (r"^model\.norm\.", "transformer.encoder.final_layernorm."),
        (r"^lm_head\.", "transformer.output_layer."),
        (r"\.self_attn\.o_proj\.", ".self_attention.dense."),
        (r"\.self_attn\.", ".self_attention."),
        (r"\.mlp\.gate_up_proj\.", ".mlp.dense_h_to_4h."),
        (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h."),
    )

    def regroup(self, weight_map: WeightMap) -> None:
        c = self.config
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        # One query_key_value tensor, [q; k; v], with q and k rows reordered for rotary.
        rows = torch.cat([self._rotary(c.num_heads), q + self._rotary(c.num_kv_heads),
                          torch.arange(q + kv, q + 2 * kv, device="cpu")])
        for i in range(c.num_layers):
            prefix = f"model.layers.{i}"
            merge(weight_map, f"{prefix}.self_attn", ("q_proj", "k_proj", "v_proj"),
                  "query_key_value", rows)
            merge(weight_map, f"{prefix}.mlp", ("gate_proj", "up_proj"), "gate_up_proj")

    def ignored_checkpoint_tensors(self) -> frozenset[str]:
        # The rotary frequencies, which the model derives from its config.
        return super().ignored_checkpoint_tensors() | {"transformer.rotary_pos_emb.inv_freq"}


SPECS = [
    ModelSpec("GlmForCausalLM", ("glm",), lambda raw: _glm(raw, "GlmForCausalLM"),
              GlmForCausalLM),
    ModelSpec("Glm4ForCausalLM", ("glm4",),
              lambda raw: _glm(raw, "Glm4ForCausalLM", layer_kind="sandwich"), GlmForCausalLM),
    ModelSpec("ChatGLMForConditionalGeneration", ("chatglm",), _chatglm,
              ChatGLMForConditionalGeneration, remote_code=True),
    ModelSpec("ChatGLMModel", ("chatglm",), _chatglm, ChatGLMForConditionalGeneration,
              remote_code=True),
]
