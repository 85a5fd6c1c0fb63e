"""Quantized artifacts: compiled graphs vs the eager quantized model, the manifest
record, the weights file size, and the loaders' refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.cli import main
from aotllm.compiler.weights import write_safetensors
from aotllm.graphs.manifest import ArtifactError, Manifest
from aotllm.models import cpu_isa, int8_kernels
from aotllm.models.loader import load_model
from aotllm.quantize.apply import quantize_model
from aotllm.quantize.config import QuantConfig

pytestmark = pytest.mark.slow

# Four graphs: prefill 16 (w8a16 bf16 takes the int8pack kernel at <= 16
# rows) and 64 (dequantize-then-matmul), decode batch 1 (the one-row
# reduction) and 4 (int8pack).
PLAN = dict(prefill_buckets=(16, 64), decode_batch_sizes=(1, 4), context_buckets=(128,))
EAGER_KW = dict(enforce_eager=True, block_size=16, max_model_len=128, max_num_seqs=4)
LENGTHS = [3, 20, 70]  # 70 tokens: chunked prefill over both prefill buckets


def _prompts(vocab: int, seed: int = 5) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(5, vocab, (n,), generator=g).tolist()}
            for n in LENGTHS]


def _generate(llm: LLM, prompts: list[dict], logprobs: int | None = None):
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=logprobs)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8", "w8a8_static"])
def test_compiled_quantized_artifact_equals_eager_quantized_model(artifacts, llama_dir, scheme):
    path = artifacts.get("llama-gqa", "float32", quantization=scheme, **PLAN)
    manifest = Manifest.read(path)
    q = manifest.quantization
    assert q["scheme"] == scheme and q["quantized_linears"] == 8
    assert set(q["kernels"]) == {g.bucket.name for g in manifest.graphs}
    if scheme != "w8a16":
        # _int_mm where the CPU has VNNI/AMX, fp32 over the integer values
        # elsewhere; one decode row takes the compact kernel on every CPU.
        assert q["kernels"] == {g.bucket.name: int8_kernels.w8a8_kernel(
            g.bucket.batch * g.bucket.tokens, torch.device("cpu"), compiled=True)
            for g in manifest.graphs}
        assert q["kernels"]["decode_b1_t1_c8"] == "compact"
        assert q["calibration"]["source"] == "builtin" and q["smoothquant"]["alpha"] == 0.5
    compiled = LLM(str(path))
    eager = LLM(str(llama_dir), dtype="float32", quantization=scheme, **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size)
    got = [c.token_ids for c in _generate(compiled, prompts)]
    want = [c.token_ids for c in _generate(eager, prompts)]
    assert got == want
    # Quantization changed something: the float artifact's tokens differ somewhere
    # or, at the least, the weights file holds int8 tensors.
    from safetensors import safe_open

    with safe_open(str(path / "weights.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == torch.int8


def _top5(step: dict) -> set[int]:
    return {tok for tok, lp in step.items() if lp.rank is not None and lp.rank <= 5}


def test_bf16_w8a16_artifact_uses_its_kernels_and_agrees_with_eager(artifacts, llama_dir):
    path = artifacts.get("llama-gqa", "bfloat16", quantization="w8a16", **PLAN)
    kernels = Manifest.read(path).quantization["kernels"]
    assert kernels["decode_b1_t1_c8"] == "compact"
    assert kernels["decode_b4_t1_c8"] == "compact"
    assert kernels["prefill_b1_t16_c8"] == "weight_int8pack_mm"
    # Prefill: a bf16 GEMM over the cast weight, or fp32 chunks where this
    # CPU has no native bf16 GEMMs.
    native = cpu_isa.detect().native_bf16
    assert kernels["prefill_b1_t64_c8"] == ("dequant_matmul" if native else "dequant_matmul_fp32")
    compiled = LLM(str(path))
    eager = LLM(str(llama_dir), dtype="bfloat16", quantization="w8a16", **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size, seed=9)
    for c, e in zip(_generate(compiled, prompts, 5), _generate(eager, prompts, 5)):
        for step, (tc, te) in enumerate(zip(c.token_ids, e.token_ids)):
            if tc != te:  # bf16 rounding may flip a near-tie, only between likely tokens
                assert tc in _top5(e.logprobs[step]) and te in _top5(c.logprobs[step])
                break


def test_w8a16_weights_file_at_most_055_of_bf16(tiny_models, tmp_path):
    # A model whose linears dominate its size (small vocabulary).
    ckpt = tiny_models.get("llama", hidden_size=256, intermediate_size=1024,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    sizes = {}
    for scheme in (None, "w8a16"):
        model = load_model(ckpt, "bfloat16")
        if scheme:
            quantize_model(model, QuantConfig(scheme))
        out = tmp_path / str(scheme)
        out.mkdir()
        path = out / write_safetensors(model, out)[0]
        sizes[scheme] = path.stat().st_size
    ratio = sizes["w8a16"] / sizes[None]
    assert ratio <= 0.55, ratio


def test_runtime_refuses_a_scheme_it_has_no_kernels_for(artifacts, tmp_path):
    src = artifacts.get("llama-gqa", "float32", quantization="w8a8", **PLAN)
    dst = tmp_path / "future"
    shutil.copytree(src, dst)
    data = json.loads((dst / "manifest.json").read_text())
    data["quantization"]["scheme"] = "w4a4_mx"
    (dst / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="quantized as 'w4a4_mx'.*no kernels"):
        LLM(str(dst))


def test_quantization_mismatch_with_the_artifact(artifacts):
    path = artifacts.get("llama-gqa", "float32", quantization="w8a8", **PLAN)
    with pytest.raises(ValueError, match="compiled with quantization=w8a8"):
        LLM(str(path), quantization="w8a16")


@pytest.mark.usefixtures("restore_aotllm_logging")
def test_compile_cli_quantization_errors(llama_dir, tmp_path, capsys):
    out = str(tmp_path / "a")
    assert main(["compile", str(llama_dir), "-o", out, "--quantization", "w4a16"]) == 2
    assert "unknown quantization scheme 'w4a16'" in capsys.readouterr().err
    assert main(["compile", str(llama_dir), "-o", out, "--quantization", "w8a8",
                 "--calibration-data", str(tmp_path / "nope.txt")]) == 2
    assert "calibration data" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["compile", str(llama_dir), "-o", out, "--quantization", "w8a8",
                 "--calibration-data", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["compile", str(llama_dir), "-o", out, "--group-size", "64"]) == 2
    assert "without --quantization" in capsys.readouterr().err


def test_modelslim_checkpoint_compiles_like_the_same_scheme_quantized_by_aotllm(
        artifacts, llama_dir, tmp_path):
    from transformers import AutoTokenizer

    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.quantize.modelslim_writer import write_modelslim_checkpoint

    model = load_model(llama_dir, "float32")
    quantize_model(model, QuantConfig("w8a8"), AutoTokenizer.from_pretrained(str(llama_dir)))
    ckpt = write_modelslim_checkpoint(model, "w8a8", llama_dir, tmp_path / "modelslim")
    with pytest.raises(ValueError, match="pre-quantized msModelSlim checkpoint.*omit"):
        compile_artifact(CompileConfig(model=str(ckpt), output=str(tmp_path / "x"),
                                       quantization=QuantConfig("w8a16"), **PLAN))
    out = tmp_path / "artifact"
    compile_artifact(CompileConfig(model=str(ckpt), output=str(out), dtype="float32",
                                   max_model_len=128, max_num_seqs=4, block_size=16, **PLAN))
    q = Manifest.read(out).quantization
    assert q["source"] == "msmodelslim" and q["model_quant_type"] == "W8A8_DYNAMIC"
    assert q["scheme"] == "w8a8"
    ours = LLM(str(artifacts.get("llama-gqa", "float32", quantization="w8a8", **PLAN)))
    prompts = _prompts(ours.llm_engine.vocab_size, seed=3)
    got = [c.token_ids for c in _generate(LLM(str(out)), prompts)]
    assert got == [c.token_ids for c in _generate(ours, prompts)]
    # The eager path reads the same checkpoint.
    eager = LLM(str(ckpt), **EAGER_KW)
    assert [c.token_ids for c in _generate(eager, prompts)] == got
