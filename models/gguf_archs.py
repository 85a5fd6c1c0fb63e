"""The llama.cpp GGUF architectures aotllm reads, in Hugging Face terms: each
tensor's checkpoint name, the row layouts llama.cpp's converter
(convert_hf_to_gguf.py) changed, and the config where transformers' GGUF
reading gets it wrong.

The reader (models/gguf_checkpoint.py) turns a file into the tensors of the
family's own checkpoint, so the family's weight map loads a GGUF exactly as
it loads safetensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LLAMA_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_QWEN3_LAYER = {**_LLAMA_LAYER, "attn_q_norm": "self_attn.q_norm",
                "attn_k_norm": "self_attn.k_norm"}
_FALCON_GLOBAL = {"token_embd": "transformer.word_embeddings", "output_norm": "transformer.ln_f",
                  "output": "lm_head"}
_FALCON_LAYER = {
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
    "attn_norm": "input_layernorm",
}
# Falcon's new decoder architecture with a norm per branch: llama.cpp feeds
# attn_norm_2 to the attention and attn_norm to the MLP (gguf's name table
# says the same: ln_attn -> attn_norm_2, ln_mlp -> attn_norm).
_FALCON_TWO_NORMS = {"attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"}

# Derived tensors some converters write; the model computes them from its config.
_IGNORED = {"rope_freqs"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")

Meta = Callable[..., Any]  # (key, default=None) -> a scalar metadata value
Shapes = dict[str, tuple[int, ...]]  # the file's tensors: GGUF name -> torch shape


@dataclass(frozen=True)
class GGUFArch:
    name: str  # general.architecture
    global_names: dict[str, str]
    layer_names: dict[str, str]
    layer_prefix: str = "model.layers"
    # llama's converter permuted q/k rows into GGML's adjacent rotary pairs.
    permuted_qk: bool = False
    # Falcon's converter wrote query_key_value as [q; k; v] instead of per KV group.
    contiguous_qkv: bool = False
    # Names when the file has blk.N.attn_norm_2 (Falcon's two norms).
    norm_2_names: dict[str, str] = field(default_factory=dict)
    # The config.json the file stands for, where transformers' reading of the
    # metadata is not right; None: transformers' config.
    config: Callable[[Meta, "Shapes"], dict[str, Any]] | None = None

    def hf_name(self, gguf_name: str, tensor_names: "Shapes") -> str | None:
        """The family checkpoint's name of a tensor; None for derived ones."""
        if m := _LAYER_RE.fullmatch(gguf_name):
            layer, part, kind = m.groups()
            names = self.layer_names
            if self.norm_2_names and f"blk.{layer}.attn_norm_2.weight" in tensor_names:
                names = {**names, **self.norm_2_names}
            if part in names:
                return f"{self.layer_prefix}.{layer}.{names[part]}.{kind}"
        elif m := _GLOBAL_RE.fullmatch(gguf_name):
            part, kind = m.groups()
            if part in _IGNORED:
                return None
            if part in self.global_names:
                return f"{self.global_names[part]}.{kind}"
        raise ValueError(
            f"GGUF tensor {gguf_name!r} has no counterpart in aotllm's {self.name} model; "
            "the file holds a variant of the architecture aotllm does not read"
        )


def unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation (rows of a weight, or a bias).

    Its converter viewed each head's rows as [2, head_dim/2] (the two rotary
    halves) and transposed them to [head_dim/2, 2]; transposing back restores
    the Hugging Face row order.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def grouped_qkv(w: torch.Tensor, n_head: int, n_kv: int) -> torch.Tensor:
    """[q; k; v] rows (llama.cpp's Falcon layout) back to Falcon's own: per KV
    group, its n_head / n_kv query heads, then its key head, then its value head."""
    head_dim = w.shape[0] // (n_head + 2 * n_kv)
    q, k, v = w.split([n_head * head_dim, n_kv * head_dim, n_kv * head_dim])
    per_group = [t.reshape(n_kv, -1, head_dim, *w.shape[1:]) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(w.shape)


def _falcon_config(meta: Meta, tensor_names: Shapes) -> dict[str, Any]:
    """transformers maps Falcon's metadata to Llama's field names
    (num_key_value_heads, intermediate_size, rms_norm_eps), which FalconConfig
    does not read, and ties the head whether or not the file has one; so the
    config is built here, as llama.cpp's graph reads the file: parallel
    attention and MLP, one KV head and one norm meaning Falcon-7B's layout."""
    heads = meta("falcon.attention.head_count")
    kv = meta("falcon.attention.head_count_kv", 1)
    hidden = meta("falcon.embedding_length")
    two_norms = "blk.0.attn_norm_2.weight" in tensor_names
    vocab = meta("falcon.vocab_size") or tensor_names["token_embd.weight"][0]
    return {
        "architectures": ["FalconForCausalLM"],
        "model_type": "falcon",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": meta("falcon.block_count"),
        "num_attention_heads": heads,
        "num_kv_heads": kv,
        "multi_query": kv == 1,
        "new_decoder_architecture": kv > 1 or two_norms,
        "num_ln_in_parallel_attn": 2 if two_norms else 1,
        "parallel_attn": True,
        "ffn_hidden_size": meta("falcon.feed_forward_length", 4 * hidden),
        "layer_norm_epsilon": meta("falcon.attention.layer_norm_epsilon", 1e-5),
        "max_position_embeddings": meta("falcon.context_length", 2048),
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": meta("falcon.rope.freq_base", 10000.0)},
        "bias": "blk.0.attn_qkv.bias" in tensor_names,
        "alibi": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta("tokenizer.ggml.eos_token_id"),
    }


ARCHS: dict[str, GGUFArch] = {a.name: a for a in (
    GGUFArch("llama", _LLAMA_GLOBAL, _LLAMA_LAYER, permuted_qk=True),
    # Not a llama.cpp arch (Mistral files say "llama"); transformers reads it unpermuted.
    GGUFArch("mistral", _LLAMA_GLOBAL, _LLAMA_LAYER),
    # NEOX rotary in llama.cpp: written unpermuted.
    GGUFArch("qwen2", _LLAMA_GLOBAL, _LLAMA_LAYER),
    GGUFArch("qwen3", _LLAMA_GLOBAL, _QWEN3_LAYER),
    GGUFArch("falcon", _FALCON_GLOBAL, _FALCON_LAYER, layer_prefix="transformer.h",
             contiguous_qkv=True, norm_2_names=_FALCON_TWO_NORMS, config=_falcon_config),
)}
