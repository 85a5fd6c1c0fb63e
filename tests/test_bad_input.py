"""Bad input gives a clear error that names what is wrong, and leaves the engine usable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from aotllm import LLM, SamplingParams

MAX_LEN = 128
ENGINE_KWARGS = dict(enforce_eager=True, dtype="float32", block_size=4,
                     max_model_len=MAX_LEN, max_num_seqs=8, seed=0)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(str(llama_dir), **ENGINE_KWARGS)


def _assert_usable(llm: LLM) -> None:
    engine = llm.llm_engine
    assert not engine.has_unfinished_requests(), "a rejected request was left queued"
    assert engine.get_num_unfinished_requests() == 0
    out = llm.generate("Hello world", GREEDY, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 8
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks - 1, "KV blocks leaked"


def _gen(llm: LLM, prompts, params=GREEDY):
    return llm.generate(prompts, params, use_tqdm=False)


# -- prompts -------------------------------------------------------------------


@pytest.mark.parametrize("prompt", [
    {"prompt_token_ids": [5] * (MAX_LEN + 1)},
    "word " * 400,
], ids=["token-ids", "text"])
def test_prompt_longer_than_max_model_len(llm, prompt):
    with pytest.raises(ValueError, match=r"max_model_len") as e:
        _gen(llm, prompt)
    assert str(MAX_LEN) in str(e.value)
    _assert_usable(llm)


def test_prompt_of_exactly_max_model_len_is_accepted(llm):
    # vLLM's bound is inclusive; the one token it can still hold ends it.
    out = _gen(llm, {"prompt_token_ids": [5] * MAX_LEN})[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "length"
    _assert_usable(llm)


def test_empty_token_prompt(llm):
    with pytest.raises(ValueError, match="empty"):
        _gen(llm, {"prompt_token_ids": []})
    _assert_usable(llm)


def test_empty_text_prompt_is_bos_only(llm):
    # As in vLLM: "" is not empty once the tokenizer adds its BOS, so it runs.
    tok = llm.get_tokenizer()
    assert tok.encode("") == [tok.bos_token_id]
    out = _gen(llm, "")[0]
    assert out.prompt == "" and out.prompt_token_ids == [tok.bos_token_id]
    assert len(out.outputs[0].token_ids) == 8
    _assert_usable(llm)


@pytest.mark.parametrize("bad_id", [512, 10**6, -1])
def test_token_id_out_of_vocab(llm, bad_id):
    assert llm.llm_engine.vocab_size == 512
    with pytest.raises(ValueError, match="vocab") as e:
        _gen(llm, {"prompt_token_ids": [5, 6, bad_id, 7]})
    assert str(bad_id) in str(e.value)
    _assert_usable(llm)


def test_dict_prompt_without_a_prompt_key(llm):
    with pytest.raises(ValueError, match="prompt_token_ids"):
        _gen(llm, {"text": "Hello"})
    _assert_usable(llm)


def test_bare_list_of_ints_is_refused(llm):
    with pytest.raises(TypeError, match="prompt_token_ids"):
        _gen(llm, [5, 6, 7])
    _assert_usable(llm)


def test_only_the_third_prompt_is_bad(llm):
    prompts = ["Hello world", {"prompt_token_ids": [5, 6, 7]},
               {"prompt_token_ids": [5, 999_999]}, "Once upon a time"]
    with pytest.raises(ValueError, match="999999"):
        _gen(llm, prompts)
    # The two accepted before the bad one were withdrawn, and their blocks freed.
    _assert_usable(llm)
    # The good prompts alone still work.
    outs = _gen(llm, [p for i, p in enumerate(prompts) if i != 2])
    assert len(outs) == 3


# -- sampling params -------------------------------------------------------------


@pytest.mark.parametrize("n_params", [1 + 2, 1])
def test_mismatched_number_of_sampling_params(llm, n_params):
    with pytest.raises(ValueError, match="SamplingParams"):
        _gen(llm, ["a", "b"], [GREEDY] * n_params)
    _assert_usable(llm)


def test_sampling_params_of_the_wrong_type(llm):
    with pytest.raises(TypeError, match="SamplingParams"):
        _gen(llm, "Hello", [{"temperature": 0}])
    _assert_usable(llm)


@pytest.mark.parametrize("field, value", [
    ("temperature", -1.0),
    ("top_p", 0.0),
    ("max_tokens", 0),
    ("top_k", -2),
    ("n", 0),
])
def test_sampling_param_out_of_range(llm, field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    _assert_usable(llm)


# -- engine arguments ------------------------------------------------------------


def test_unknown_engine_argument(llama_dir):
    with pytest.raises(TypeError) as e:
        LLM(str(llama_dir), enforce_eager=True, max_modle_len=64)
    msg = str(e.value)
    assert "max_modle_len" in msg
    # It lists the supported arguments, so the typo is easy to fix.
    for name in ("max_model_len", "max_num_seqs", "enforce_eager", "dtype"):
        assert name in msg


def test_max_model_len_above_max_position_embeddings(llama_dir):
    limit = json.loads((llama_dir / "config.json").read_text())["max_position_embeddings"]
    with pytest.raises(ValueError, match="max_position_embeddings") as e:
        LLM(str(llama_dir), **{**ENGINE_KWARGS, "max_model_len": limit + 1})
    assert str(limit + 1) in str(e.value) and str(limit) in str(e.value)


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_model_dir_that_does_not_exist(tmp_path, enforce_eager):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="not a local directory") as e:
        LLM(str(missing), enforce_eager=enforce_eager)
    assert str(missing) in str(e.value)


# -- damaged checkpoints ---------------------------------------------------------


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "ckpt"))


def _load(path: Path) -> LLM:
    return LLM(str(path), **ENGINE_KWARGS)


def test_unknown_architecture(llama_dir, tmp_path):
    ckpt = _copy(llama_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="FooForCausalLM") as e:
        _load(ckpt)
    for supported in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        assert supported in str(e.value)


def test_missing_config_json(llama_dir, tmp_path):
    ckpt = _copy(llama_dir, tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(ckpt)


def test_missing_weight_file(llama_dir, tmp_path):
    ckpt = _copy(llama_dir, tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="safetensors"):
        _load(ckpt)


def test_truncated_weight_file(llama_dir, tmp_path):
    # An interrupted copy: the library's own error does not say which file.
    ckpt = _copy(llama_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises((ValueError, OSError), match="model.safetensors"):
        _load(ckpt)


@pytest.mark.parametrize("tensor", [
    "model.norm.weight",
    # A slice of a fused parameter (qkv_proj): the rest of it must not hide the gap.
    "model.layers.1.self_attn.k_proj.weight",
])
def test_missing_tensor(llama_dir, tmp_path, tensor):
    ckpt = _copy(llama_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    state = load_file(weights)
    del state[tensor]
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing") as e:
        _load(ckpt)
    assert tensor in str(e.value)


def test_tensor_shape_does_not_match_config(llama_dir, tmp_path):
    ckpt = _copy(llama_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = 96
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mlp\.(gate|up|down)_proj\.weight"):
        _load(ckpt)


def test_missing_tokenizer_files(llama_dir, tmp_path):
    ckpt = _copy(llama_dir, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ckpt / name).unlink()
    with pytest.raises(ValueError, match="tokenizer"):
        _load(ckpt)


@pytest.fixture(scope="module")
def sharded_dir(tiny_models) -> Path:
    # Same variant and seed as llama_dir: identical weights, in several files.
    path = tiny_models.get("llama-gqa", max_shard_size="100KB")
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 2
    return path


def test_sharded_checkpoint_with_a_missing_shard(sharded_dir, tmp_path):
    ckpt = _copy(sharded_dir, tmp_path)
    shard = sorted(ckpt.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        _load(ckpt)


def test_sharded_checkpoint_loads_like_the_single_file(sharded_dir, llm):
    sharded = _load(sharded_dir)
    prompts = ["Hello world", "Once upon a time"]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in _gen(llm, prompts, params)]
    assert [o.outputs[0].token_ids for o in _gen(sharded, prompts, params)] == want
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=20)
    assert (_gen(sharded, prompts, seeded)[0].outputs[0].token_ids
            == _gen(llm, prompts, seeded)[0].outputs[0].token_ids)
