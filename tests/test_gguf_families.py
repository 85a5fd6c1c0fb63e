"""GGUF input beyond the llama-style archs: Qwen3 and Falcon files written the
way llama.cpp's converter writes them (gguf's own tensor-name table; Falcon's
query_key_value rearranged to [q; k; v]; 2-D weights F32 or F16, the rest
F32), read through the production loader and compared with transformers
running the checkpoint the file was written from.

The reference is that checkpoint rather than transformers reading the file:
transformers 5.24 builds Qwen3 from GGUF without its head_dim (a 128 default)
and Falcon with Llama's field names, so it cannot load these files.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from aotllm.models.loader import load_model
from tests.test_gguf import _add_tokenizer, assert_chunked_logits_match
from tests.test_parity import BLOCK

pytestmark = pytest.mark.usefixtures("one_thread")


def _contiguous_qkv(w: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """llama.cpp's FalconModel.modify_tensors: per-KV-group rows -> [q; k; v]."""
    head_dim = w.shape[0] // (n_head + 2 * n_kv)
    qkv = w.reshape(n_kv, n_head // n_kv + 2, head_dim, *w.shape[1:])
    q = qkv[:, :-2].reshape(n_head * head_dim, *w.shape[1:])
    k = qkv[:, -2].reshape(n_kv * head_dim, *w.shape[1:])
    v = qkv[:, -1].reshape(n_kv * head_dim, *w.shape[1:])
    return np.concatenate([q, k, v])


def _kv_heads(cfg: dict) -> int:
    """The KV heads a Falcon config means (what llama.cpp's file must say)."""
    if cfg["new_decoder_architecture"]:
        return cfg["num_kv_heads"]
    return 1 if cfg["multi_query"] else cfg["num_attention_heads"]


def write_family_gguf(ckpt: Path, out: Path, arch: str, f16: bool = False) -> Path:
    cfg = json.loads((ckpt / "config.json").read_text())
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    if arch == "falcon":
        n_kv = _kv_heads(cfg)
        w.add_feed_forward_length(cfg["ffn_hidden_size"])
        w.add_layer_norm_eps(cfg["layer_norm_epsilon"])
    else:
        n_kv = cfg["num_key_value_heads"]
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    w.add_head_count_kv(n_kv)
    _add_tokenizer(w, ckpt, cfg["vocab_size"], add_bos=True)  # as the tiny tokenizer does
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for hf_name, t in load_file(ckpt / "model.safetensors").items():
        data = t.float().numpy()
        if "query_key_value" in hf_name:
            data = _contiguous_qkv(data, n_head, n_kv)
        if f16 and data.ndim == 2:
            data = data.astype(np.float16)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight", ".bias")), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# case -> (variant, GGUF arch, 2-D weights in F16)
CASES = {
    "qwen3-gqa-f32": ("qwen3-gqa", "qwen3", False),
    "qwen3-gqa-f16": ("qwen3-gqa", "qwen3", True),
    "qwen3-mqa-bias-tied-f32": ("qwen3-mqa-bias-tied", "qwen3", False),
    "falcon-mqa-f32": ("falcon-mqa", "falcon", False),  # Falcon-7B: one KV head, one norm
    "falcon-mqa-f16": ("falcon-mqa", "falcon", True),
    "falcon-newarch-bias-tied-f32": ("falcon-newarch-bias-tied", "falcon", False),
}


def _reference(ckpt: Path, f16: bool):
    """transformers' model of the checkpoint, its matrices rounded through
    float16 as an F16 file stores them."""
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    if f16:
        with torch.no_grad():
            for p in hf.parameters():
                if p.dim() == 2:
                    p.copy_(p.half().float())
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_on_the_source_checkpoint(case, tiny_models, tmp_path):
    variant, arch, f16 = CASES[case]
    ckpt = tiny_models.get(variant)
    path = write_family_gguf(ckpt, tmp_path / f"{case}.gguf", arch, f16)
    model = load_model(path, "float32")
    hf = _reference(ckpt, f16)
    c = model.config
    assert (c.architecture, c.tie_word_embeddings) == (hf.config.architectures[0],
                                                       hf.config.tie_word_embeddings)
    assert (c.num_kv_heads, c.head_dim) == (load_model(ckpt, "float32").config.num_kv_heads,
                                            hf.config.head_dim)
    assert_chunked_logits_match(model, hf, case)


@pytest.mark.parametrize("variant, arch", [("qwen3-mqa-bias-tied", "qwen3"),
                                           ("falcon-newarch-bias-tied", "falcon")])
def test_f32_file_gives_the_original_weights(variant, arch, tiny_models, tmp_path):
    # Independent of transformers: names, norms and Falcon's qkv rows land exactly.
    path = write_family_gguf(tiny_models.get(variant), tmp_path / "f32.gguf", arch)
    from_gguf = dict(load_model(path, "float32").named_parameters())
    original = dict(load_model(tiny_models.get(variant), "float32").named_parameters())
    assert sorted(from_gguf) == sorted(original)
    for name, p in original.items():
        assert torch.equal(from_gguf[name], p), name


@pytest.mark.parametrize("variant, arch", [("qwen3-gqa", "qwen3"),
                                           ("falcon-newarch-bias-tied", "falcon")])
def test_eager_llm_on_the_file_generates_like_the_checkpoint(variant, arch, tiny_models, tmp_path):
    # End to end: config, tokenizer (bos included) and weights from the file alone.
    from aotllm import LLM, SamplingParams

    path = write_family_gguf(tiny_models.get(variant), tmp_path / "m.gguf", arch)
    engine = dict(dtype="float32", block_size=BLOCK, max_model_len=64, max_num_seqs=2,
                  enforce_eager=True)
    prompts = ["Once upon a time", {"prompt_token_ids": [5, 9, 200, 17, 33]}]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    got, want = ([o.outputs[0].token_ids for o in LLM(str(p), **engine).generate(
        prompts, greedy, use_tqdm=False)] for p in (path, tiny_models.get(variant)))
    assert got == want


def test_a_tensor_the_architecture_does_not_have_is_named(tmp_path):
    from aotllm.models.gguf_checkpoint import GGUFCheckpoint

    w = gguf.GGUFWriter(str(tmp_path / "moe.gguf"), "qwen3")
    w.add_head_count(4)
    w.add_tensor("blk.0.ffn_gate_exps.weight", np.zeros((2, 8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_exps.weight'.*qwen3"):
        list(GGUFCheckpoint(tmp_path / "moe.gguf").tensors())
