"""msModelSlim checkpoints: aotllm-quantized model -> writer -> loader gives the same model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from aotllm.models.layers import Linear
from aotllm.models.loader import load_model
from aotllm.quantize.apply import quantize_model
from aotllm.quantize.config import QuantConfig
from aotllm.quantize.linear import QUANT_LINEARS, W8A8DynamicLinear
from aotllm.quantize.modelslim import (
    DESCRIPTION_FILE, BiasedRMSNorm, decode_deq_scale, encode_deq_scale, is_modelslim_checkpoint,
    load_modelslim_model, read_description,
)
from aotllm.quantize.modelslim_writer import write_modelslim_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"
DECODE_STEPS = 3
BLOCK = 16
QTYPE = {"w8a16": "W8A16", "w8a8": "W8A8_DYNAMIC", "w8a8_static": "W8A8"}


@torch.inference_mode()
def _logits(model, ids: list[int], decode: list[int]) -> torch.Tensor:
    """Prefill `ids`, then decode `decode` one token at a time, through the graph
    signature; [1 + len(decode), vocab] logits."""
    c = model.config
    nblocks = math.ceil((len(ids) + len(decode)) / BLOCK)
    blocks = torch.arange(1, nblocks + 1).view(1, -1)  # block 0 is the null block
    kv = [torch.zeros(2, nblocks + 1, BLOCK, c.num_kv_heads, c.head_dim, dtype=model.dtype)
          for _ in range(c.num_layers)]

    def step(tokens: list[int], start: int) -> torch.Tensor:
        pos = torch.arange(start, start + len(tokens))
        slots = blocks[0][pos // BLOCK] * BLOCK + pos % BLOCK
        return model(torch.tensor([tokens]), pos.view(1, -1), slots, blocks,
                     torch.tensor([start + len(tokens)]), torch.tensor([len(tokens)]), kv)

    out = [step(ids, 0)]
    for i, tok in enumerate(decode):
        out.append(step([tok], len(ids) + i))
    return torch.cat(out)


def _quantized(src: Path, scheme: str, dtype: str = "float32", group_size: int | None = None):
    model = load_model(src, dtype=dtype)
    cfg = QuantConfig(scheme, group_size=group_size, calibration_tokens=512)
    record = quantize_model(model, cfg, AutoTokenizer.from_pretrained(src))
    return model, record


class Written:
    """One written msModelSlim checkpoint per (variant, scheme), shared by the tests."""

    def __init__(self, root: Path, tiny_models):
        self.root, self.tiny_models, self._done = root, tiny_models, {}

    def get(self, variant: str, scheme: str) -> Path:
        if (variant, scheme) not in self._done:
            src = self.tiny_models.get(variant)
            model, _ = _quantized(src, scheme)
            out = self.root / f"{variant}-{scheme}"
            self._done[variant, scheme] = write_modelslim_checkpoint(model, scheme, src, out)
        return self._done[variant, scheme]


@pytest.fixture(scope="module")
def written(tmp_path_factory, tiny_models) -> Written:
    return Written(tmp_path_factory.mktemp("modelslim"), tiny_models)


@pytest.mark.parametrize("variant,scheme,dtype,group_size", [
    ("llama-gqa", "w8a16", "float32", None),
    ("qwen2-tied", "w8a16", "float32", None),
    ("llama-gqa", "w8a16", "float32", 32),
    ("llama-gqa", "w8a8", "float32", None),
    ("qwen2-tied", "w8a8", "float32", None),
    ("llama-gqa", "w8a8_static", "float32", None),
    ("qwen2-tied", "w8a8_static", "float32", None),
    ("qwen2-tied", "w8a8_static", "float16", None),  # deq_scale stored as int64 bits
])
def test_roundtrip_matches_aotllm_quantized(tiny_models, tmp_path, variant, scheme, dtype, group_size):
    src = tiny_models.get(variant)
    ref, ref_record = _quantized(src, scheme, dtype, group_size)
    out = write_modelslim_checkpoint(ref, scheme, src, tmp_path / "ckpt")
    assert is_modelslim_checkpoint(out) and not is_modelslim_checkpoint(src)

    desc = read_description(out)
    assert (desc.model_quant_type, desc.scheme) == (QTYPE[scheme], scheme)
    assert "model.embed_tokens.weight" in desc.float_tensors
    assert desc.tensor_types["model.layers.0.self_attn.k_proj.weight"] == QTYPE[scheme]
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in desc.tensor_types)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        scale = f.get_slice("model.layers.0.mlp.up_proj.weight_scale").get_shape()
        assert scale == [128, 1 if group_size is None else 64 // group_size]
        if scheme == "w8a8_static":
            deq = f.get_slice("model.layers.0.mlp.up_proj.deq_scale").get_dtype()
            assert deq == ("I64" if dtype == "float16" else "F32")

    model, record = load_modelslim_model(out)  # dtype "auto": the writer records it
    assert model.dtype == getattr(torch, dtype)
    cls = QUANT_LINEARS[scheme]
    for layer in model.model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                    layer.mlp.gate_up_proj, layer.mlp.down_proj):
            assert type(lin) is cls
    assert type(model.lm_head) is Linear
    assert set(ref_record) <= set(record)
    assert record["source"] == "msmodelslim" and record["model_quant_type"] == QTYPE[scheme]
    assert record["scheme"] == scheme and record["group_size"] == group_size
    assert record["quantized_linears"] == ref_record["quantized_linears"]
    assert record["float_modules"] == ref_record["float_modules"]

    ids = AutoTokenizer.from_pretrained(out).encode(PROMPT)  # tokenizer files came along
    first = _logits(ref, ids, [])
    decode = [int(first[0].argmax())] * DECODE_STEPS
    expected = _logits(ref, ids, decode)
    got = _logits(model, ids, decode)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_deq_scale_int64_bits_roundtrip():
    x = torch.randn(37) * 1e-3
    assert torch.equal(decode_deq_scale(encode_deq_scale(x)), x)
    # Zero-extended bits (another writer's spelling of the same float32) decode alike.
    zero_ext = encode_deq_scale(x) & 0xFFFFFFFF
    assert torch.equal(decode_deq_scale(zero_ext), x)
    assert torch.equal(decode_deq_scale(x.double()), x)


def _edit(src: Path, dst: Path, tensors=None, description=None) -> Path:
    """A copy of checkpoint `src` with its tensors and/or description changed in place."""
    shutil.copytree(src, dst)
    if tensors is not None:
        path = next(dst.glob("*.safetensors"))
        t = load_file(str(path))
        tensors(t)
        save_file(t, str(path))
    if description is not None:
        d = json.loads((dst / DESCRIPTION_FILE).read_text())
        description(d)
        (dst / DESCRIPTION_FILE).write_text(json.dumps(d))
    return dst


def test_unknown_model_quant_type(written, tmp_path):
    bad = _edit(written.get("llama-gqa", "w8a8"), tmp_path / "c",
                description=lambda d: d.update(model_quant_type="W4A8_DYNAMIC"))
    with pytest.raises(ValueError, match=r"model_quant_type 'W4A8_DYNAMIC'.*W8A16, W8A8_DYNAMIC, W8A8"):
        read_description(bad)
    with pytest.raises(ValueError, match="W4A8_DYNAMIC"):
        load_modelslim_model(bad)


def test_no_description(tiny_models):
    assert not is_modelslim_checkpoint(tiny_models.get("llama-gqa"))
    with pytest.raises(FileNotFoundError, match=DESCRIPTION_FILE):
        read_description(tiny_models.get("llama-gqa"))


def test_description_names_missing_tensor(written, tmp_path):
    name = "model.layers.1.self_attn.q_proj.smooth_factor"
    bad = _edit(written.get("llama-gqa", "w8a8_static"), tmp_path / "c",
                description=lambda d: d.update({name: "W8A8"}))
    with pytest.raises(ValueError, match=rf"missing from the safetensors files: {name}"):
        load_modelslim_model(bad)


def test_tensor_not_in_description(written, tmp_path):
    name = "model.layers.0.mlp.down_proj.weight_scale"
    bad = _edit(written.get("llama-gqa", "w8a16"), tmp_path / "c", description=lambda d: d.pop(name))
    with pytest.raises(ValueError, match=rf"{name} are not in {DESCRIPTION_FILE}"):
        load_modelslim_model(bad)


def test_w8a16_nonzero_weight_offset(written, tmp_path):
    name = "model.layers.1.self_attn.v_proj.weight_offset"
    bad = _edit(written.get("qwen2-tied", "w8a16"), tmp_path / "c",
                tensors=lambda t: t[name].fill_(3.0))
    with pytest.raises(ValueError, match=rf"{name} has non-zero zero points: asymmetric"):
        load_modelslim_model(bad)


def test_static_qkv_input_scale_mismatch(written, tmp_path):
    name = "model.layers.0.self_attn.k_proj.input_scale"
    bad = _edit(written.get("qwen2-tied", "w8a8_static"), tmp_path / "c",
                tensors=lambda t: t[name].mul_(2))
    with pytest.raises(ValueError, match=r"input_scale differs across .*q_proj, .*k_proj, .*v_proj"):
        load_modelslim_model(bad)


def test_fused_shards_need_one_type(written, tmp_path):
    bad = _edit(written.get("llama-gqa", "w8a16"), tmp_path / "c", description=lambda d: d.update(
        {"model.layers.0.mlp.up_proj.weight": "FLOAT"}))
    with pytest.raises(ValueError, match="gate_proj, .*up_proj have different types"):
        load_modelslim_model(bad)


def test_unsupported_linear_type(written, tmp_path):
    def retype(d):
        for p in ("gate_proj", "up_proj"):
            d[f"model.layers.0.mlp.{p}.weight"] = "W4A8_DYNAMIC"
    bad = _edit(written.get("llama-gqa", "w8a8"), tmp_path / "c", description=retype)
    with pytest.raises(ValueError, match="typed 'W4A8_DYNAMIC'"):
        load_modelslim_model(bad)


def test_anti_outlier_biases(written, tmp_path):
    """Anti-outlier smoothing adds a norm bias (added to the norm's output) and a
    float bias on linears that had none (llama: no attention bias)."""
    g = torch.Generator().manual_seed(0)
    extra = {f"model.layers.0.self_attn.{p}.bias": torch.randn(n, generator=g)
             for p, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32))}
    extra["model.layers.0.input_layernorm.bias"] = torch.randn(64, generator=g)
    bad = _edit(written.get("llama-gqa", "w8a8"), tmp_path / "c", tensors=lambda t: t.update(extra),
                description=lambda d: d.update(dict.fromkeys(extra, "FLOAT")))
    model, _ = load_modelslim_model(bad)
    layer = model.model.layers[0]
    norm = layer.input_layernorm
    assert type(norm) is BiasedRMSNorm and type(model.model.layers[1].input_layernorm) is not BiasedRMSNorm
    assert torch.equal(norm.bias, extra["model.layers.0.input_layernorm.bias"])
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(norm(x), model.model.norm.ops.rms_norm(x, norm.weight, norm.eps) + norm.bias)
    qkv = layer.self_attn.qkv_proj
    assert type(qkv) is W8A8DynamicLinear
    assert torch.equal(qkv.bias, torch.cat([extra[f"model.layers.0.self_attn.{p}.bias"]
                                            for p in ("q_proj", "k_proj", "v_proj")]))


def test_static_float_bias_is_folded(written, tmp_path):
    """Static W8A8 carries the float bias inside quant_bias (vllm-ascend ignores
    `bias` there): a `bias` tensor beside it changes nothing."""
    src = written.get("qwen2-tied", "w8a8_static")
    names = [f"model.layers.0.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    assert not any(n in read_description(src).tensor_types for n in names)  # writer folded them
    noisy = _edit(src, tmp_path / "c",
                  tensors=lambda t: t.update({n: torch.full((64 if "q_" in n else 32,), 5.0) for n in names}),
                  description=lambda d: d.update(dict.fromkeys(names, "FLOAT")))
    ids = AutoTokenizer.from_pretrained(src).encode(PROMPT)
    a, _ = load_modelslim_model(src)
    b, _ = load_modelslim_model(noisy)
    assert torch.equal(_logits(a, ids, []), _logits(b, ids, []))
