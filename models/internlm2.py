"""InternLM2 (remote code, model_type "internlm2"), read from its config.json
and tensor names without running its code.

What differs from Llama: its names (wqkv, wo, w1/w3/w2, attention_norm,
ffn_norm, tok_embeddings, output), one `bias` flag for wqkv and wo, and the
grouped `wqkv` layout (per KV group: its q heads, then k, then v), which the
loader reorders into [q; k; v]. Its 'dynamic' rope scaling is computed per
row inside the graph (models/rope.py).
"""

from __future__ import annotations

from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec
from aotllm.models.weights import WeightMap, merge_grouped_qkv


def _internlm2(raw: dict[str, Any]) -> ModelConfig:
    """configuration_internlm2.py's fields (defaults as there)."""
    heads = raw["num_attention_heads"]
    bias = bool(raw.get("bias", True))
    return ModelConfig(
        architecture="InternLM2ForCausalLM",
        model_type="internlm2",
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw["hidden_size"] // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=False,
        hidden_act=raw.get("hidden_act", "silu"),
        sliding_windows=(None,) * raw["num_hidden_layers"],
        hf_config=dict(raw),
    ).validated()


class InternLM2ForCausalLM(CausalLM):
    renames = (
        (r"^model\.embed_tokens\.", "model.tok_embeddings."),
        (r"^lm_head\.", "output."),
        (r"\.self_attn\.o_proj\.", ".attention.wo."),
        (r"\.self_attn\.", ".attention."),
        (r"\.mlp\.gate_proj\.", ".feed_forward.w1."),
        (r"\.mlp\.up_proj\.", ".feed_forward.w3."),
        (r"\.mlp\.down_proj\.", ".feed_forward.w2."),
        (r"\.input_layernorm\.", ".attention_norm."),
        (r"\.post_attention_layernorm\.", ".ffn_norm."),
    )

    def regroup(self, weight_map: WeightMap) -> None:
        merge_grouped_qkv(weight_map, self.config, "wqkv")


SPECS = [ModelSpec("InternLM2ForCausalLM", ("internlm2",), _internlm2, InternLM2ForCausalLM,
                   remote_code=True)]
