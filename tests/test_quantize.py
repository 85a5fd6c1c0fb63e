"""Quantization primitives, kernels, SmoothQuant folding and the module swap."""

from __future__ import annotations

import pytest
import torch

from aotllm.models import cpu_isa, int8_kernels
from aotllm.models.layers import Linear
from aotllm.models.loader import load_model
from aotllm.models.ops import TorchOps
from aotllm.quantize.apply import quantize_model, smooth, target_linears
from aotllm.quantize.calibrate import collect_input_absmax, read_calibration_text, run_sequence
from aotllm.quantize.config import QuantConfig, resolve_scheme
from aotllm.quantize.linear import W8A8DynamicLinear, W8A8StaticLinear, W8A16Linear
from aotllm.quantize.primitives import dequantize_weight, quantize_weight, smoothquant_scales


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama_dir))


# -- primitives ---------------------------------------------------------------

@pytest.mark.parametrize("group_size", [None, 16])
def test_weight_round_trip_error_within_half_a_step(group_size):
    torch.manual_seed(0)
    w = torch.randn(24, 64) * torch.logspace(-3, 1, 24).unsqueeze(1)  # channels of every size
    q, scale = quantize_weight(w, group_size)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.shape == ((24,) if group_size is None else (24, 64 // group_size))
    assert int(q.abs().max()) <= 127
    err = (dequantize_weight(q, scale) - w).abs()
    step = scale if group_size is None else scale.repeat_interleave(group_size, dim=1)
    bound = (step if step.dim() == 2 else step.unsqueeze(1)) / 2 + 1e-7
    assert bool((err <= bound).all())
    # Each channel's (group's) largest weight maps to +-127 exactly.
    assert int(q.abs().amax(1).min()) == 127


def test_zero_and_constant_channels():
    w = torch.zeros(3, 8)
    w[1] = 0.25
    w[2, 3] = -2.0
    q, scale = quantize_weight(w)
    assert torch.isfinite(scale).all()
    assert torch.equal(dequantize_weight(q, scale), w)  # exactly representable
    assert scale[0] == 1.0 and torch.equal(q[0], torch.zeros(8, dtype=torch.int8))


def test_group_size_must_divide_input():
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(torch.randn(4, 24), 16)


def test_per_token_quantization():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [100.0, 1.0, -50.0]])
    q, s = int8_kernels.quantize_per_token(x)
    assert q.dtype == torch.int8 and s.shape == (3, 1)
    assert q[0].tolist() == [64, -127, 32] and q[1].tolist() == [0, 0, 0]
    assert ((q.float() * s - x).abs() <= s / 2 + 1e-6).all()


def test_smoothquant_scales_balance_ranges():
    act = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([0.01, 1.0, 0.25])
    s = smoothquant_scales(act, w, 0.5)
    # alpha 0.5: both sides end with the same range, sqrt(act * w).
    assert torch.allclose(act / s, w * s)
    assert torch.allclose(smoothquant_scales(act, w, 1.0), act / 1.0)


# -- kernels --------------------------------------------------------------------

def _int8_case(m: int, k: int = 64, n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g)
    q, scale = quantize_weight(w)
    return x, q, scale


@pytest.mark.parametrize("m", [1, 8, 40])
def test_w8a16_kernels_match_the_dequantized_weights(m):
    x, q, scale = _int8_case(m)
    bias = torch.randn(q.shape[0])
    ref = x @ dequantize_weight(q, scale).T + bias
    got32 = int8_kernels.linear_w8a16(x, q, scale, bias)
    assert torch.allclose(got32, ref, atol=1e-5)
    got16 = int8_kernels.linear_w8a16(x.bfloat16(), q, scale, bias.bfloat16())
    kernel = int8_kernels.w8a16_kernel(m, torch.bfloat16, x.device, grouped=False,
                                       compiled=False)
    # Past 16 rows a bf16 GEMM over the cast weight, or fp32 chunks where this
    # CPU has no native bf16 GEMMs.
    wide = "dequant_matmul" if cpu_isa.detect().native_bf16 else "dequant_matmul_fp32"
    assert kernel == ("weight_int8pack_mm" if m <= 16 else wide)
    assert (got16.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_w8a16_grouped_kernel():
    x, _, _ = _int8_case(4)
    w = torch.randn(48, 64) * 0.05
    q, scale = quantize_weight(w, 16)
    got = int8_kernels.linear_w8a16(x, q, scale, None)
    assert torch.allclose(got, x @ dequantize_weight(q, scale).T, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 33])
def test_w8a8_dynamic_is_integer_arithmetic(m):
    x, q, scale = _int8_case(m)
    xq, xs = int8_kernels.quantize_per_token(x)
    # The exact integer product, rescaled: what the int8 kernel must compute.
    acc = (xq.double() @ q.double().T)
    ref = (acc * xs.double() * scale.double()).float()
    got = int8_kernels.linear_w8a8_dynamic(x, q, scale, None)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    # ... and close to the float product.
    assert (got - x @ (q.float() * scale[:, None]).T).abs().max() < 0.02


def test_w8a8_static_matches_its_definition():
    x, q, wscale = _int8_case(5)
    in_scale, in_offset = torch.tensor([0.02]), torch.tensor([3.0])
    deq = wscale * in_scale
    qbias = torch.randint(-1000, 1000, (q.shape[0],), dtype=torch.int32)
    got = int8_kernels.linear_w8a8_static(x, q, in_scale, in_offset, qbias, deq)
    xq = torch.round(x / in_scale + in_offset).clamp(-128, 127)
    ref = ((xq.double() @ q.double().T) + qbias.double()) * deq.double()
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)


# -- config ---------------------------------------------------------------------

def test_scheme_names_and_errors():
    assert resolve_scheme("W8A8_DYNAMIC") == "w8a8"
    assert resolve_scheme(None) is None and resolve_scheme("none") is None
    with pytest.raises(ValueError, match="unknown quantization scheme 'w4a16'.*w8a16"):
        QuantConfig("w4a16")
    with pytest.raises(ValueError, match="group_size applies to w8a16 only"):
        QuantConfig("w8a8", group_size=64)
    with pytest.raises(ValueError, match="smoothquant_alpha"):
        QuantConfig("w8a8", smoothquant_alpha=1.5)


def test_calibration_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration data .* not found"):
        read_calibration_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        read_calibration_text(str(empty))
    assert len(read_calibration_text(None).text) > 1000  # the built-in set ships


# -- model level ----------------------------------------------------------------

def _ids(tokenizer) -> list[int]:
    return tokenizer.encode("The lighthouse keeper climbed the stairs at dawn to check the lamp.")


def test_smoothquant_folding_leaves_the_float_model_unchanged(llama_dir, tokenizer):
    model = load_model(llama_dir, "float32")
    ids = _ids(tokenizer)
    before = run_sequence(model, ids)
    names = target_linears(model, QuantConfig("w8a8"))
    stats = collect_input_absmax(model, tokenizer.encode(read_calibration_text(None).text), names)
    layer = model.model.layers[0]
    norm_before = layer.input_layernorm.weight.clone()
    gate_up_before = layer.mlp.gate_up_proj.weight.clone()
    assert smooth(model, stats, 0.5) == 3 * model.config.num_layers
    assert not torch.equal(layer.input_layernorm.weight, norm_before)
    # down_proj's smoothing divides up's rows, gate's rows are untouched ...
    i = model.config.intermediate_size
    after = layer.mlp.gate_up_proj.weight
    assert not torch.equal(after[i:], gate_up_before[i:] * 1)
    # ... (gate's columns carry post_attention_layernorm's scale, as up's do)
    ratio = after[:i] / gate_up_before[:i]
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio), rtol=1e-4)
    assert torch.allclose(run_sequence(model, ids), before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme,cls", [("w8a16", W8A16Linear), ("w8a8", W8A8DynamicLinear),
                                        ("w8a8_static", W8A8StaticLinear)])
def test_module_swap(llama_dir, tokenizer, scheme, cls):
    model = load_model(llama_dir, "float32")
    ids = _ids(tokenizer)
    ref = run_sequence(model, ids)
    record = quantize_model(model, QuantConfig(scheme), tokenizer)
    swapped = [n for n, m in model.named_modules() if isinstance(m, cls)]
    assert len(swapped) == record["quantized_linears"] == 4 * model.config.num_layers
    # The LM head stays in the model dtype by default.
    assert isinstance(model.lm_head, Linear) and "lm_head" in record["float_modules"]
    got = run_sequence(model, ids)
    assert int(got.argmax()) == int(ref.argmax())
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
    if scheme == "w8a16":
        assert record["calibration"] is None
    else:
        assert record["calibration"]["source"] == "builtin"
        assert record["calibration"]["num_tokens"] > 500
        assert record["smoothquant"] == {"alpha": 0.5, "groups_folded": 3 * model.config.num_layers}


def test_exclusions_and_lm_head(llama_dir):
    model = load_model(llama_dir, "float32")
    cfg = QuantConfig("w8a16", exclude=("model.layers.0.*",), quantize_lm_head=True)
    record = quantize_model(model, cfg)
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, W8A16Linear)
    assert isinstance(model.lm_head, W8A16Linear)
    assert "model.layers.0.self_attn.qkv_proj" in record["float_modules"]


def test_ops_protocol_is_complete():
    from aotllm.models.ops import Ops

    wanted = {n for n in dir(Ops) if not n.startswith("_")}
    assert wanted <= set(dir(TorchOps))
    assert {"linear_w8a16", "linear_w8a8_dynamic", "linear_w8a8_static"} <= wanted
