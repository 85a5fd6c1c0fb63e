"""Tests for scripts/build_tiny_model.py, the offline stand-in for hub checkpoints."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

BUILDER_PATH = Path(__file__).parents[1] / "scripts" / "build_tiny_model.py"


def _load_builder() -> ModuleType:
    # scripts/ is not a package, so import the file directly.
    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILDER_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


btm = _load_builder()


def _weights(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return btm.build_tiny_model(tmp_path_factory.mktemp("llama"), family="llama")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_family_loads_back_with_consistent_token_ids(family: str, tmp_path: Path) -> None:
    out = btm.build_tiny_model(tmp_path / family, family=family)
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)

    assert model.config.model_type == family
    assert (out / "model.safetensors").is_file()
    assert model.config.vocab_size == len(tok) == 512
    assert model.config.max_position_embeddings == tok.model_max_length == 512
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
    )
    ids = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert len(set(ids)) == 3
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == ids
    gen = model.generation_config
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == ids

    # transformers 5 rebuilds some families' tokenizers on load (qwen2 ->
    # Qwen2Tokenizer); a runtime reading tokenizer.json directly must agree.
    raw = Tokenizer.from_file(str(out / "tokenizer.json"))
    text = "It's 2024: cafe\u0301 héllo  wörld 你好 🙂\n\n  <|im_start|>user\nHi 123<|im_end|>"
    assert tok(text).input_ids == raw.encode(text).ids
    assert raw.get_vocab_size() == len(tok)

    input_ids = tok("The tide comes in twice a day.", return_tensors="pt").input_ids
    assert input_ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(input_ids).logits
    assert logits.shape == (1, input_ids.shape[1], 512)
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_multibyte_text(llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama_dir)
    # The second string is absent from the corpus: byte-level BPE must still cope.
    for text in ["héllo wörld 你好 🙂", "ʕ•ᴥ•ʔ ⛵ Ω\ttabs\n\nnewlines  spaces"]:
        ids = tok(text).input_ids
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    # Multi-byte characters seen in the corpus got merges, so they are not all raw bytes.
    assert len(tok("你好 🙂", add_special_tokens=False).input_ids) < len("你好 🙂".encode())


def test_chat_template_renders_chatml(llama_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(llama_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
    ]
    body = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == "<|begin_of_text|>" + body
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|begin_of_text|>" + body + "<|im_start|>assistant\n"

    # Tokenizing through the template gives exactly one bos, matching the
    # rendered text encoded without automatic special tokens.
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    by_template = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(by_template, dict) or hasattr(by_template, "input_ids"):
        by_template = by_template["input_ids"]
    assert by_template == tok(rendered, add_special_tokens=False).input_ids
    assert by_template.count(tok.bos_token_id) == 1
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert by_template.count(im_start) == 3 and by_template.count(im_end) == 2


def test_sharded_save_writes_index_and_same_weights(llama_dir: Path, tmp_path: Path) -> None:
    out = btm.build_tiny_model(tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((out / shard).is_file() for shard in shards)
    assert not (out / "model.safetensors").exists()

    sharded, single = _weights(out), _weights(llama_dir)
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 512


def test_rebuild_without_sharding_removes_stale_shards(tmp_path: Path) -> None:
    btm.build_tiny_model(tmp_path, max_shard_size="200KB")
    btm.build_tiny_model(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_overrides_land_in_loaded_model(tmp_path: Path) -> None:
    rope_scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    out = btm.build_tiny_model(
        tmp_path,
        head_dim=32,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_scaling=rope_scaling,
        rope_theta=500000.0,
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    cfg = model.config
    assert (cfg.head_dim, cfg.num_key_value_heads) == (32, 1)
    assert cfg.tie_word_embeddings and cfg.attention_bias
    assert cfg.rope_parameters == {**rope_scaling, "rope_theta": 500000.0}

    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == cfg.num_attention_heads * 32
    assert attn.k_proj.out_features == attn.v_proj.out_features == 32
    assert attn.q_proj.bias is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "lm_head.weight" not in _weights(out)


def test_same_seed_same_weights_and_different_seed_differs(llama_dir: Path, tmp_path: Path) -> None:
    again = _weights(btm.build_tiny_model(tmp_path / "again", seed=0))
    other = _weights(btm.build_tiny_model(tmp_path / "other", seed=1))
    first = _weights(llama_dir)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_bfloat16_is_rounded_float32(llama_dir: Path, tmp_path: Path) -> None:
    out = btm.build_tiny_model(tmp_path, dtype="bfloat16")
    bf16, fp32 = _weights(out), _weights(llama_dir)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert all(torch.equal(bf16[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_logits_have_no_greedy_near_ties(llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    text = "The keeper climbed the stair, found the red switch, and the lamp turned again. " * 3
    with torch.no_grad():
        logits = model(tok(text, return_tensors="pt").input_ids).logits[0]
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert (gaps > 1e-3).float().mean() >= 0.95


def test_tokenizer_training_is_fast_and_deterministic() -> None:
    train = btm._train_tokenizer_json.__wrapped__  # bypass the cache
    start = time.perf_counter()
    first = train(512)
    assert time.perf_counter() - start < 2.0
    assert train(512) == first
    # "125m" trains to whatever the corpus allows; it must fit its 32000-row embedding.
    big = btm._make_tokenizer(btm.PRESETS["125m"]["tokenizer_vocab_size"], "llama")
    assert 1000 < len(big) <= btm.PRESETS["125m"]["config"]["vocab_size"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "gpt2"}, "llama"),
        ({"preset": "7b"}, "tiny"),
        ({"dtype": "int8"}, "bfloat16"),
        ({"family": "mistral", "attention_bias": True}, "attention_bias"),
        ({"hiden_size": 32}, "hiden_size"),
        ({"vocab_size": 100}, "smaller than the tokenizer"),
        ({"eos_token_id": 7}, "eos_token_id"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        btm.build_tiny_model(tmp_path, **kwargs)


def test_cli_parses_json_overrides_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    btm.main([
        str(tmp_path), "--family", "qwen2", "--dtype", "bfloat16",
        "--set", "num_key_value_heads=1", "--set", "tie_word_embeddings=true",
        "--set", 'rope_scaling={"rope_type": "linear", "factor": 2.0}',
    ])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["dtype"] == "bfloat16"
    assert cfg["num_key_value_heads"] == 1 and cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_type"] == "linear"
    n_params = AutoModelForCausalLM.from_pretrained(tmp_path).num_parameters()
    assert f"{n_params:,} parameters" in capsys.readouterr().out
