"""Per-CPU kernel choice for float linears (models/cpu_isa.py, models/float_kernels.py)
and the runtime's check of a CPU artifact's record (runtime/cpu_check.py).

The AVX2 path (no native BF16) runs on any x86 machine by restricting the
ISA, in a subprocess: the restriction must be in the environment before
torch loads.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aotllm.models import cpu_isa, float_kernels, int8_kernels

REPO = Path(__file__).resolve().parents[1]
RESTRICTED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
NO_NATIVE = cpu_isa.CpuIsa("AVX2", "AVX2", native_bf16=False, native_fp16=False, int8_dot=False)
ALL_NATIVE = cpu_isa.CpuIsa("AVX512", None, native_bf16=True, native_fp16=True, int8_dot=True)
x86 = pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="needs an x86 CPU with AVX2")


def _run(code: str, env: dict[str, str]) -> dict:
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join([str(REPO.parent), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True,
                         text=True, timeout=900, cwd=REPO.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@x86
def test_restricting_the_isa_turns_native_bf16_off():
    got = _run("import json; from aotllm.models.cpu_isa import detect; "
               "print(json.dumps(detect().to_dict()))", RESTRICTED)
    assert got == {"capability": "AVX2", "onednn_max_isa": "AVX2", "native_bf16": False,
                   "native_fp16": False, "int8_dot": False}


def test_onednn_cap_admits_only_isas_up_to_it():
    assert cpu_isa._onednn_allows(None, "AVX512_CORE_BF16")
    assert cpu_isa._onednn_allows("ALL", "AVX512_CORE_AMX")
    assert cpu_isa._onednn_allows("AVX512_CORE_AMX", "AVX512_CORE_BF16")
    assert not cpu_isa._onednn_allows("AVX512_CORE", "AVX512_CORE_BF16")
    assert not cpu_isa._onednn_allows("AVX2", "AVX2_VNNI")


def test_kernel_choice_follows_rows_dtype_and_cpu(monkeypatch):
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    monkeypatch.setattr(cpu_isa, "detect", lambda: NO_NATIVE)
    choice = functools.partial(float_kernels.float_linear_kernel, compiled=True)
    eager = functools.partial(float_kernels.float_linear_kernel, compiled=False)
    w8a16 = functools.partial(int8_kernels.w8a16_kernel, compiled=True)
    assert choice(16, bf16, cpu) == "fp32_chunked"  # prefill-sized
    assert choice(16, torch.float16, cpu) == "fp32_chunked"
    assert choice(9, bf16, cpu) == "fp32_chunked"
    assert choice(8, bf16, cpu) == "compact"  # decode batches: bandwidth bound
    assert choice(4, bf16, cpu) == "compact"
    assert choice(1, bf16, cpu) == "compact"
    assert eager(4, bf16, cpu) == "fp32_chunked"  # the kernel is for compiled graphs
    assert eager(2, bf16, cpu) == "native"
    assert eager(1, bf16, cpu) == "native"
    assert choice(1, torch.float32, cpu) == "native"
    assert choice(128, torch.float32, cpu) == "native"
    assert choice(128, bf16, torch.device("meta")) == "native"  # not a CPU graph
    assert choice(1, bf16, torch.device("cuda")) == "native"
    assert w8a16(128, bf16, cpu, grouped=False) == "dequant_matmul_fp32"
    assert w8a16(16, bf16, cpu, grouped=False) == "weight_int8pack_mm"
    assert w8a16(8, bf16, cpu, grouped=False) == "compact"
    assert w8a16(1, bf16, cpu, grouped=False) == "compact"
    assert w8a16(1, bf16, cpu, grouped=True) == "dequant_matmul"  # grouped scales
    assert int8_kernels.w8a16_kernel(1, bf16, cpu, grouped=False, compiled=False) == (
        "weight_int8pack_mm")
    assert w8a16(17, bf16, cpu, grouped=False) == "dequant_matmul_fp32"
    assert w8a16(128, bf16, cpu, grouped=True) == "dequant_matmul"
    w8a8 = int8_kernels.w8a8_kernel
    # No VNNI: _int_mm is slow, the integer values go through fp32 kernels.
    assert [w8a8(r, cpu, compiled=True) for r in (1, 8, 9)] == ["compact", "compact",
                                                               "fp32_chunked"]
    assert w8a8(1, cpu, compiled=False) == "fp32_chunked"
    monkeypatch.setattr(cpu_isa, "detect", lambda: ALL_NATIVE)
    assert choice(128, bf16, cpu) == "native"
    assert choice(1, bf16, cpu) == "compact"
    assert w8a16(128, bf16, cpu, grouped=False) == "dequant_matmul"
    assert [w8a8(r, cpu, compiled=True) for r in (1, 2, 128)] == ["compact", "int_mm", "int_mm"]
    assert w8a8(1, cpu, compiled=False) == "int_mm"
    assert w8a8(1, torch.device("cuda"), compiled=True) == "dequant_matmul"


def test_chunk_rows_fit_a_share_of_the_l2(monkeypatch):
    monkeypatch.setattr(cpu_isa, "l2_cache_bytes", lambda: 2 << 20)  # Sapphire Rapids
    assert [float_kernels.chunk_rows(k, 2048) for k in (768, 2048, 576)] == [256, 256, 256]
    monkeypatch.setattr(cpu_isa, "l2_cache_bytes", lambda: 512 << 10)  # Zen 3
    assert [float_kernels.chunk_rows(k, 100) for k in (96, 768, 1 << 20)] == [512, 64, 32]
    # Never more than MAX_CHUNKS chunks: SmolLM2's gate/up and q/k/v on a 512 KiB L2.
    assert float_kernels.chunk_rows(576, 3072) == 512
    assert float_kernels.chunk_rows(576, 960) == 128
    assert float_kernels.MAX_CHUNKS == 8
    assert cpu_isa.l2_cache_bytes() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_chunked_linear_is_an_fp32_gemm_rounded_once(dtype, monkeypatch):
    monkeypatch.setattr(cpu_isa, "l2_cache_bytes", lambda: 512 << 10)  # 512 rows at K=96
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 96, generator=g).to(dtype)
    # 1100 output rows: two full chunks and a partial one.
    w = (torch.randn(1100, 96, generator=g) * 0.1).to(dtype)
    b = torch.randn(1100, generator=g).to(dtype)
    got = float_kernels.linear_fp32_chunked(x, w, b)
    ref = F.linear(x.float(), w.float(), b.float()).to(dtype)
    assert got.dtype == dtype and got.shape == (2, 40, 1100)
    # Same products, fp32 sums in another order: at most one rounding step apart.
    torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=1e-3)
    # int8 weights with per-channel scales (w8a16's fp32 dequant route).
    q = torch.randint(-127, 128, (1100, 96), generator=g, dtype=torch.int8)
    scale = torch.rand(1100, generator=g) / 100
    got = float_kernels.linear_fp32_chunked(x, q, b, scale)
    ref = (F.linear(x.float(), q.float() * scale[:, None]) + b.float()).to(dtype)
    torch.testing.assert_close(got, ref, rtol=2 ** -7, atol=1e-3)


_RESTRICTED_RUN = """
import json, sys
from aotllm import LLM, SamplingParams
from aotllm.compiler.config import CompileConfig
from aotllm.compiler.pipeline import compile_artifact
from aotllm.graphs.manifest import Manifest
from aotllm.models import float_kernels
float_kernels.chunk_rows = lambda k, n: 48  # several chunks even in the tiny model
model, out = sys.argv[1], sys.argv[2]
compile_artifact(CompileConfig(model=model, output=out, dtype="bfloat16", max_model_len=64,
                               max_num_seqs=1, block_size=16, prefill_buckets=(16, 32),
                               decode_batch_sizes=(1,), context_buckets=(64,)))
params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
prompts = [[5 + i for i in range(n)] for n in (3, 20, 45)]
def run(llm):
    return [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
compiled = run(LLM(out, seed=0))
eager = run(LLM(model, enforce_eager=True, dtype="bfloat16", block_size=16, max_model_len=64,
                seed=0))
print(json.dumps({"compiled": compiled, "eager": eager,
                  "cpu": Manifest.read(out).extra["cpu"]}))
"""


@x86
@pytest.mark.slow
def test_avx2_artifact_without_native_bf16(tiny_models, tmp_path, caplog, one_thread):
    """Compiled with the ISA restricted to AVX2: prefill linears compute in fp32
    (several chunks), decode is the one-row reduction; compiled == eager under
    the same restriction; the manifest says so; and on this (unrestricted)
    CPU the same artifact runs, gives the same tokens, and logs that it was
    tuned for another CPU."""
    from aotllm import LLM, SamplingParams

    model = tiny_models.get("llama-gqa")
    out = tmp_path / "avx2-bf16"
    code = "import sys; sys.argv[1:] = [" + repr(str(model)) + ", " + repr(str(out)) + "]\n"
    got = _run(code + _RESTRICTED_RUN, RESTRICTED)
    assert got["compiled"] == got["eager"]
    cpu = got["cpu"]
    assert cpu["isa"]["native_bf16"] is False and cpu["inductor_vec_isa"] == "avx2"
    assert cpu["linear_kernels"] == {
        "prefill_b1_t16_c4": "fp32_chunked", "prefill_b1_t32_c4": "fp32_chunked",
        "decode_b1_t1_c4": "compact"}

    # The "aotllm" logger does not propagate (logger.py): listen on it directly.
    log = logging.getLogger("aotllm.runtime.cpu_check")
    log.addHandler(caplog.handler)
    try:
        llm = LLM(str(out), seed=0)
    finally:
        log.removeHandler(caplog.handler)
    tuned_elsewhere = cpu_isa.CpuIsa.from_dict(cpu["isa"]) != cpu_isa.detect()
    assert tuned_elsewhere == ("was tuned for" in caplog.text)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5 + i for i in range(n)]} for n in (3, 20, 45)]
    here = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert here == got["compiled"]


@pytest.mark.slow
def test_artifact_for_missing_isa_is_refused(artifacts, monkeypatch):
    from aotllm import LLM
    from aotllm.graphs.manifest import ArtifactError, Manifest
    from aotllm.runtime import cpu_check

    artifact = artifacts.get("llama-gqa", "float32")
    vec = Manifest.read(artifact).extra["cpu"]["inductor_vec_isa"]
    if not any(name in cpu_check._HAS for name in vec.split()):
        pytest.skip(f"graphs built without a checked vector ISA ({vec!r})")
    # As if this CPU had none of the vector extensions the graphs were built for.
    monkeypatch.setattr(cpu_check, "_HAS", {name: (lambda: False) for name in cpu_check._HAS})
    with pytest.raises(ArtifactError, match="compiled for .* recompile it on this machine"):
        LLM(str(artifact))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_as_reductions_equals_the_matmul_route(dtype, monkeypatch):
    """Compiled CPU graphs run decode attention as reductions (ops.py): the
    same masked softmax over each row's blocks as the eager matmul route,
    grouped query heads included."""
    from aotllm.models.ops import TorchOps

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d, bs, blocks = 3, 6, 2, 16, 4, 12
    cache = torch.randn(2, blocks, bs, hkv, d, generator=g).to(dtype)
    q = torch.randn(b, 1, hq, d, generator=g).to(dtype)
    tables = torch.tensor([[3, 7, 1], [0, 2, 5], [11, 4, 9]])
    positions = torch.tensor([[9], [2], [11]])  # row 1 sees 3 tokens, row 2 all 12
    context_lens = positions.view(-1) + 1
    args = (q, cache, tables, positions, context_lens, torch.ones(b, dtype=torch.long), 0.25)
    want = TorchOps.paged_attention(*args)
    # Only a trace for Inductor takes the reductions (ONNX export keeps matmuls).
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not float_kernels.in_inductor_capture()
    with float_kernels.inductor_capture():
        assert float_kernels.in_inductor_capture()
        got = TorchOps.paged_attention(*args)
    assert not float_kernels.in_inductor_capture()
    assert got.shape == want.shape == (b, 1, hq, d) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    # Row 1 reads only its first three cached tokens: changing a later one
    # in its blocks changes nothing.
    cache[0, 0, 3] += 100
    with float_kernels.inductor_capture():
        assert torch.equal(TorchOps.paged_attention(*args)[1], got[1])


@pytest.mark.parametrize("scheme", [None, "w8a16"])
def test_inductor_backend_traces_batch_one_decode_without_matmuls(llama_dir, scheme,
                                                                  monkeypatch, tmp_path):
    """The Inductor backend's capture takes the compact kernel and reduction
    forms: a bf16 decode graph at batch 1 has no matmul left for Inductor to
    hand to a library (linears call compact_linear, attention is two
    reductions); past the kernel's 8 rows the linears are library GEMMs."""
    from types import SimpleNamespace

    from aotllm.compiler.inductor import InductorBackend
    from aotllm.graphs.buckets import Bucket
    from aotllm.graphs.kv_cache import KVCacheSpec
    from aotllm.models.checkpoint import open_checkpoint
    from aotllm.quantize.config import QuantConfig
    from aotllm.quantize.load import load_quantized

    cpu = torch.device("cpu")
    quant = QuantConfig(scheme) if scheme else None
    model, _ = load_quantized(llama_dir, "bfloat16", cpu, quant,
                              open_checkpoint(llama_dir).load_tokenizer)
    c = model.config
    spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, 16, "bfloat16")
    backend = InductorBackend(SimpleNamespace(device="cpu", dynamic_shapes=False))
    programs = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, **kw: programs.append(program))
    for batch in (1, 16):
        backend.compile_bucket(model, Bucket("decode", batch, 1, 4), spec, tmp_path / "g.pt2")
    targets = [{str(n.target) for n in p.graph.nodes if n.op == "call_function"}
               for p in programs]
    library = {"aten.mm.default", "aten.addmm.default", "aten.bmm.default",
               "aten.linear.default", "aten._weight_int8pack_mm.default"}
    assert not targets[0] & library, targets[0] & library
    assert "aotllm.compact_linear.default" in targets[0]
    assert targets[1] & library  # batch 16 keeps the library kernels
    assert "aotllm.compact_linear.default" not in targets[1]
