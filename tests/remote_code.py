"""Tiny remote-code checkpoints (InternLM2, ChatGLM) written from a
transformers checkpoint of the same network, which the parity tests then use
as the reference: transformers has no class for these layouts, and aotllm
never runs a checkpoint's own code.

The weights are rearranged exactly as the original modeling files read them
(InternLM2's grouped wqkv; ChatGLM's [q; k; v] query_key_value over GLM's
interleaved partial rotary), so the reference computes the same function.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                    "special_tokens_map.json", "chat_template.jinja")


def _copy_tokenizer(src: Path, out: Path, remote_class: str, module: str) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    # As the hub's files say it: a remote tokenizer class, and a tokenizer.json beside it.
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = remote_class
    config["auto_map"] = {"AutoTokenizer": [f"{module}.{remote_class}", None]}
    path.write_text(json.dumps(config, indent=2))


def _grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[q; k; v] rows -> per KV group: its q heads, then k, then v."""
    qg = q.reshape(kv_heads, -1, *q.shape[1:])
    kg = k.reshape(kv_heads, -1, *k.shape[1:])
    vg = v.reshape(kv_heads, -1, *v.shape[1:])
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *q.shape[1:])


def llama_to_internlm2(src: Path, out: Path) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(str(src / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = None
    if rope.get("rope_type", "default") != "default":
        scaling = {"type": rope["rope_type"], "factor": rope["factor"]}
    config = {
        "architectures": ["InternLM2ForCausalLM"],
        "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "bias": bool(cfg.get("attention_bias", False)),
        "rope_theta": rope.get("rope_theta", 10000.0),
        "rope_scaling": scaling,
        "torch_dtype": "float32",
        **{k: cfg[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id")},
    }
    kv = cfg["num_key_value_heads"]
    t: dict[str, torch.Tensor] = {"model.tok_embeddings.weight": w["model.embed_tokens.weight"],
                                  "model.norm.weight": w["model.norm.weight"]}
    if "lm_head.weight" in w and not cfg["tie_word_embeddings"]:
        t["output.weight"] = w["lm_head.weight"]
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"model.layers.{i}."
        for attr in ("weight", "bias"):
            if f"{a}self_attn.q_proj.{attr}" in w:
                t[f"{b}attention.wqkv.{attr}"] = _grouped(
                    *(w[f"{a}self_attn.{p}_proj.{attr}"] for p in "qkv"), kv)
            if f"{a}self_attn.o_proj.{attr}" in w:
                t[f"{b}attention.wo.{attr}"] = w[f"{a}self_attn.o_proj.{attr}"]
        for ours, theirs in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            t[f"{b}feed_forward.{theirs}.weight"] = w[f"{a}mlp.{ours}.weight"]
        t[f"{b}attention_norm.weight"] = w[f"{a}input_layernorm.weight"]
        t[f"{b}ffn_norm.weight"] = w[f"{a}post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(src, out, "InternLM2Tokenizer", "tokenization_internlm2")
    return out


def glm_to_chatglm(src: Path, out: Path) -> Path:
    cfg = json.loads((src / "config.json").read_text())
    w = load_file(str(src / "model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    rope = cfg.get("rope_parameters") or {}
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    assert rope.get("partial_rotary_factor", 0.5) == 0.5, "ChatGLM rotates half of each head"
    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": cfg["num_hidden_layers"],
        "padded_vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "ffn_hidden_size": cfg["intermediate_size"],
        "kv_channels": cfg["head_dim"],
        "num_attention_heads": heads,
        "seq_length": cfg["max_position_embeddings"],
        "layernorm_epsilon": cfg["rms_norm_eps"],
        "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": bool(cfg.get("attention_bias", True)),
        "multi_query_attention": kv != heads,
        "multi_query_group_num": kv,
        "rope_ratio": rope.get("rope_theta", 10000.0) / 10000.0,
        "original_rope": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "eos_token_id": cfg["eos_token_id"],
        "pad_token_id": cfg["pad_token_id"],
    }
    t: dict[str, torch.Tensor] = {
        "transformer.embedding.word_embeddings.weight": w["model.embed_tokens.weight"],
        "transformer.encoder.final_layernorm.weight": w["model.norm.weight"],
        "transformer.output_layer.weight": w["lm_head.weight"],
        # Saved by the original code although derived from the config.
        "transformer.rotary_pos_emb.inv_freq": torch.zeros(cfg["head_dim"] // 4),
    }
    for i in range(cfg["num_hidden_layers"]):
        a, b = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for attr in ("weight", "bias"):
            if f"{a}self_attn.q_proj.{attr}" in w:
                t[f"{b}self_attention.query_key_value.{attr}"] = torch.cat(
                    [w[f"{a}self_attn.{p}_proj.{attr}"] for p in "qkv"])
        t[f"{b}self_attention.dense.weight"] = w[f"{a}self_attn.o_proj.weight"]
        t[f"{b}mlp.dense_h_to_4h.weight"] = w[f"{a}mlp.gate_up_proj.weight"]
        t[f"{b}mlp.dense_4h_to_h.weight"] = w[f"{a}mlp.down_proj.weight"]
        t[f"{b}input_layernorm.weight"] = w[f"{a}input_layernorm.weight"]
        t[f"{b}post_attention_layernorm.weight"] = w[f"{a}post_attention_layernorm.weight"]
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(src, out, "ChatGLMTokenizer", "tokenization_chatglm")
    return out


# remote family -> (the transformers family that computes the same network, converter)
CONVERTERS = {"internlm2": ("llama", llama_to_internlm2), "chatglm": ("glm", glm_to_chatglm)}
