"""Falcon: attention and MLP in parallel from one LayerNorm (or one per branch
in the new decoder architecture), LayerNorms with bias, a GELU MLP without a
gate, rotary, and a fused `query_key_value` whose layout (per KV group: its q
heads, then k, then v) covers multi-query, the new decoder architecture's
groups and plain multi-head alike. ALiBi variants are refused.
"""

from __future__ import annotations

from typing import Any

from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.registry import ModelSpec
from aotllm.models.weights import WeightMap, merge_grouped_qkv


def _falcon(raw: dict[str, Any]) -> ModelConfig:
    from transformers import AutoConfig

    d = dict(raw)
    hf = AutoConfig.for_model(d.pop("model_type"), **d)
    if hf.alibi:
        raise ValueError("Falcon checkpoints with ALiBi positions (alibi: true, e.g. "
                         "falcon-rw) are not supported: aotllm's attention is rotary-only. "
                         "Use a rotary Falcon (falcon-7b/40b/180b, Falcon 2)")
    new_arch = bool(hf.new_decoder_architecture)
    if new_arch and not hf.parallel_attn:
        raise ValueError("Falcon's new_decoder_architecture without parallel_attn is not supported")
    heads = hf.num_attention_heads
    if new_arch:
        kv_heads = hf.num_kv_heads
    else:  # multi-query: one K/V head; otherwise one per q head
        kv_heads = 1 if hf.multi_query else heads
    norms = (hf.num_ln_in_parallel_attn or 2) if new_arch else 1
    return ModelConfig.from_transformers(
        raw, "FalconForCausalLM",
        intermediate_size=hf.ffn_hidden_size or 4 * hf.hidden_size,
        num_kv_heads=kv_heads,
        head_dim=hf.hidden_size // heads,
        rms_norm_eps=hf.layer_norm_epsilon,
        qkv_bias=bool(hf.bias), o_bias=bool(hf.bias), mlp_bias=bool(hf.bias),
        hidden_act=hf.activation,
        norm="layer",
        gated_mlp=False,
        layer_kind="parallel" if hf.parallel_attn else "sequential",
        parallel_norms=norms,
        sliding_windows=(None,) * hf.num_hidden_layers,
    )


class FalconForCausalLM(CausalLM):
    @property
    def renames(self) -> tuple[tuple[str, str], ...]:
        two_norms = self.config.layer_kind == "parallel" and self.config.parallel_norms == 2
        return (
            (r"^model\.embed_tokens\.", "transformer.word_embeddings."),
            (r"^model\.layers\.", "transformer.h."),
            (r"^model\.norm\.", "transformer.ln_f."),
            (r"\.self_attn\.o_proj\.", ".self_attention.dense."),
            (r"\.self_attn\.", ".self_attention."),
            (r"\.mlp\.up_proj\.", ".mlp.dense_h_to_4h."),
            (r"\.mlp\.down_proj\.", ".mlp.dense_4h_to_h."),
        ) + ((
            (r"\.input_layernorm\.", ".ln_attn."),
            (r"\.post_attention_layernorm\.", ".ln_mlp."),
        ) if two_norms else ())

    def regroup(self, weight_map: WeightMap) -> None:
        merge_grouped_qkv(weight_map, self.config, "query_key_value")


SPECS = [ModelSpec("FalconForCausalLM", ("falcon",), _falcon, FalconForCausalLM)]
