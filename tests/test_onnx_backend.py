"""`--backend onnx`: ONNX graphs with shared external weights, run on onnxruntime
through the same runtime, against the eager path."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from aotllm import LLM  # noqa: E402
from aotllm.graphs.buckets import Bucket, plan_buckets  # noqa: E402
from aotllm.graphs.kv_cache import NULL_BLOCK  # noqa: E402
from aotllm.graphs.manifest import Manifest  # noqa: E402
from aotllm.models.loader import load_model  # noqa: E402
from tests.conftest import COMPILE_PLAN  # noqa: E402
from tests.test_compiled import (  # noqa: E402,F401  (calls: a fixture)
    EAGER_KW, PLAN, Call, _greedy, _logit_cases, _paged_inputs, _prompts, calls, workload,
)

pytestmark = pytest.mark.slow

# The quantized and Qwen2 artifacts use a smaller plan: one prefill size, two
# decode batch sizes, one context size.
SMALL = dict(prefill_buckets=(16,), decode_batch_sizes=(1, 4), context_buckets=(128,))
SMALL_PLAN = plan_buckets(**{**COMPILE_PLAN, **SMALL})


@pytest.fixture(scope="module")
def checkpoint(tiny_models):
    return tiny_models.get("llama-gqa")


@pytest.fixture(scope="module")
def art(artifacts):
    return artifacts.get("llama-gqa", "float32", backend="onnx")


@pytest.fixture(scope="module")
def compiled(art) -> LLM:
    return LLM(str(art))


@pytest.fixture(scope="module")
def eager(checkpoint) -> LLM:
    return LLM(str(checkpoint), dtype="float32", **EAGER_KW)


def _graph_files(art):
    return sorted((art / "graphs").glob("*.onnx"))


def test_manifest_and_files(art):
    manifest = Manifest.read(art)
    assert manifest.backend == "onnx" and manifest.bucket_plan() == PLAN
    assert manifest.backend_traits.kv_in_place is False
    assert manifest.backend_traits.num_blocks is None
    assert manifest.weights_file == "graphs/weights.safetensors"
    assert [art / g.file for g in sorted(manifest.graphs, key=lambda g: g.file)] == \
        _graph_files(art)
    # Nothing else (scratch copies, checker probes) is left next to the graphs.
    assert sorted(p.name for p in (art / "graphs").iterdir()) == \
        sorted([p.name for p in _graph_files(art)] + ["weights.safetensors"])


def test_onnx_checker_passes_on_every_graph(art):
    for path in _graph_files(art):
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
        names = [i.name for i in model.graph.input]
        assert names[:6] == ["input_ids", "positions", "slot_mapping", "block_tables",
                             "context_lens", "query_lens"]
        kv = model.graph.input[6].type.tensor_type.shape.dim
        assert kv[1].dim_param == "num_blocks", path.name


def test_one_copy_of_the_weights(art, checkpoint):
    """Every weight initializer of every graph points into the one weights file;
    the graph files hold structure only."""
    weights = art / "graphs" / "weights.safetensors"
    model = load_model(checkpoint, "float32")
    unique = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    param_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    size = weights.stat().st_size
    assert param_bytes <= size < param_bytes + 16384, (size, param_bytes)
    graph_bytes = [p.stat().st_size for p in _graph_files(art)]
    assert sum(graph_bytes) < size, graph_bytes
    for path in _graph_files(art):
        proto = onnx.load(str(path), load_external_data=False)
        external = [i for i in proto.graph.initializer
                    if i.data_location == onnx.TensorProto.EXTERNAL]
        inline = [i.name for i in proto.graph.initializer
                  if i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) > 4096]
        assert not inline, f"{path.name} embeds {inline}"
        assert len(external) >= 4 * 2, path.name  # the linears of both layers at least
        for init in external:
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == "weights.safetensors"
            assert int(info["offset"]) + int(info["length"]) <= size


@pytest.mark.parametrize("bucket", PLAN.buckets, ids=lambda b: b.name)
def test_greedy_tokens_match_eager_on_bucket(bucket, compiled, eager, calls):
    lengths, max_tokens, pattern = workload(bucket)
    prompts = _prompts(eager.llm_engine.vocab_size, lengths, seed=sum(lengths))
    assert _greedy(compiled, prompts, max_tokens) == _greedy(eager, prompts, max_tokens)
    hits = {c.real_tokens for c in calls if c.bucket == bucket}
    assert pattern in hits, f"{bucket.name} not hit with rows {pattern}; calls: {calls}"


def test_long_prompt_is_chunked(compiled, eager, calls):
    chunk = PLAN.max_prefill_tokens
    prompts = _prompts(eager.llm_engine.vocab_size, [chunk + 36], seed=7)
    assert _greedy(compiled, prompts, 8) == _greedy(eager, prompts, 8)
    largest = max(PLAN.prefill, key=lambda b: b.tokens)
    assert [c for c in calls if c.bucket.phase == "prefill"] == \
        [Call(largest, (chunk,)), Call(largest, (36,))]


def test_logits_match_eager_and_kv_is_written_in_place(compiled, checkpoint):
    executor = compiled.llm_engine.runner.executor
    model = load_model(checkpoint, "float32")
    spec = compiled.llm_engine.runner.kv_spec
    for bucket, rows in _logit_cases(compiled.llm_engine.vocab_size):
        inputs = _paged_inputs(rows, bucket)
        torch.manual_seed(0)
        kv = [torch.randn(spec.layer_shape(12)) for _ in range(spec.num_layers)]
        kv_graph = [k.clone() for k in kv]
        kv_eager = [k.clone() for k in kv]
        ptrs = [k.data_ptr() for k in kv_graph]
        got = executor.graphs[bucket]([*inputs, *kv_graph])[0]
        with torch.inference_mode():
            want = model(*inputs, kv_eager)
        n = len(rows)
        diff = (got[:n] - want[:n]).abs().max().item()
        assert diff < 1e-4, f"{bucket.name}: max abs logit difference {diff}"
        # The runtime's own tensors hold the new K/V: same storage, eager's values.
        assert [k.data_ptr() for k in kv_graph] == ptrs
        for a, e in zip(kv_graph, kv_eager):
            assert torch.allclose(a[:, NULL_BLOCK + 1:], e[:, NULL_BLOCK + 1:], atol=1e-5)
        assert not torch.equal(kv_graph[0], kv[0]), f"{bucket.name} wrote no K/V"


def test_kv_cache_is_not_copied_per_step(compiled):
    """A decode step on a 1 GiB cache costs what it costs on a tiny one: were
    onnxruntime copying the cache input to a separate output buffer (ScatterND's
    copy-then-scatter), the big cache would add ~100 ms per step here."""
    graph = compiled.llm_engine.runner.executor.graphs[min(PLAN.decode, key=lambda b: b.cost)]
    spec = compiled.llm_engine.runner.kv_spec
    inputs = _paged_inputs([([7], 5, [1])], Bucket("decode", 1, 1, PLAN.decode[0].context_blocks))

    def step_ms(num_blocks: int) -> float:
        kv = [torch.zeros(spec.layer_shape(num_blocks)) for _ in range(spec.num_layers)]
        graph([*inputs, *kv])
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            graph([*inputs, *kv])
            times.append((time.perf_counter() - t0) * 1e3)
        assert kv[0][0, 1, 5].abs().sum() > 0  # the step wrote its K into block 1
        return statistics.median(times)

    per_layer_bytes = spec.layer_shape(1)[0] * 16 * 2 * 16 * 4  # [2, 1, 16, 2, 16] fp32
    big = (512 << 20) // per_layer_bytes  # 512 MiB per layer
    small_ms, big_ms = step_ms(16), step_ms(big)
    assert big_ms < small_ms + 20, (small_ms, big_ms)


def test_qwen2_tied_matches_eager(artifacts, tiny_models):
    ckpt = tiny_models.get("qwen2-tied")
    art = artifacts.get("qwen2-tied", "float32", backend="onnx", **SMALL)
    manifest = Manifest.read(art)
    # Tied embeddings: stored once, the other name an alias.
    assert manifest.extra["weight_aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    eager = LLM(str(ckpt), dtype="float32", **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size, [5, 16, 30, 40, 9], seed=3)
    assert _greedy(LLM(str(art)), prompts, 12) == _greedy(eager, prompts, 12)


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8", "w8a8_static"])
def test_quantized_artifact_matches_eager(artifacts, checkpoint, scheme):
    art = artifacts.get("llama-gqa", "float32", quantization=scheme, backend="onnx", **SMALL)
    assert Manifest.read(art).quantization["scheme"] == scheme
    for path in _graph_files(art):
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path), load_external_data=False)
        int8 = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
        assert len(int8) >= 8, f"{path.name}: the int8 weights are not the graph's inputs"
    compiled = LLM(str(art))
    eager = LLM(str(checkpoint), dtype="float32", quantization=scheme, **EAGER_KW)
    # Prompts across the plan's buckets: short and full prefill, one and four rows.
    prompts = _prompts(eager.llm_engine.vocab_size, [3, 16, 20, 33, 41], seed=5)
    assert _greedy(compiled, prompts, 10) == _greedy(eager, prompts, 10)
    # Logits of one decode batch straight through the graph, against eager's.
    executor = compiled.llm_engine.runner.executor
    runner = eager.llm_engine.runner
    bucket = max(SMALL_PLAN.decode, key=lambda b: b.cost)
    rows = [([11], 9, [1]), ([12], 39, [2, 4, 5])]
    inputs = _paged_inputs(rows, bucket)
    spec = compiled.llm_engine.runner.kv_spec
    torch.manual_seed(1)
    kv = [torch.randn(spec.layer_shape(8)) for _ in range(spec.num_layers)]
    got = executor.graphs[bucket]([*inputs, *[k.clone() for k in kv]])[0][:2]
    with torch.inference_mode():
        want = runner.executor.model(*inputs, [k.clone() for k in kv])[:2]
    assert (got - want).abs().max().item() < 1e-3


def test_float16_artifact_matches_float16_eager(artifacts, checkpoint):
    art = artifacts.get("llama-gqa", "float16", backend="onnx", **SMALL)
    compiled = LLM(str(art))
    eager = LLM(str(checkpoint), dtype="float16", **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size, [3, 16, 20, 33], seed=13)
    assert _greedy(compiled, prompts, 8) == _greedy(eager, prompts, 8)


def test_fixed_kv_block_count_for_atc(artifacts, checkpoint):
    """--num-gpu-blocks-override fixes num_blocks in every graph (ATC needs
    static shapes); the runtime then sizes its cache to exactly that."""
    art = artifacts.get("llama-gqa", "float32", backend="onnx", num_gpu_blocks_override=24,
                        prefill_buckets=(16,), decode_batch_sizes=(4,), context_buckets=(128,))
    assert Manifest.read(art).backend_traits.num_blocks == 24
    for path in _graph_files(art):
        proto = onnx.load(str(path), load_external_data=False)
        for value in [*proto.graph.input, *proto.graph.output]:
            dims = value.type.tensor_type.shape.dim
            assert all(d.HasField("dim_value") for d in dims), f"{path.name}: {value.name}"
        assert proto.graph.input[6].type.tensor_type.shape.dim[1].dim_value == 24
    llm = LLM(str(art))
    assert all(kv.shape[1] == 24 for kv in llm.llm_engine.runner.kv_caches)
    eager = LLM(str(checkpoint), dtype="float32", **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size, [4, 14, 25], seed=9)
    assert _greedy(llm, prompts, 10) == _greedy(eager, prompts, 10)
    with pytest.raises(ValueError, match="exactly 24 KV blocks"):
        LLM(str(art), num_gpu_blocks_override=40)


def test_unsupported_dtype_and_device_fail_early(tiny_models, tmp_path):
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact

    ckpt = str(tiny_models.get("llama-gqa"))
    with pytest.raises(ValueError, match="float32 or float16, not bfloat16"):
        compile_artifact(CompileConfig(model=ckpt, output=str(tmp_path / "a"),
                                       dtype="bfloat16", backend="onnx"))
    with pytest.raises(ValueError, match="--device cpu"):
        compile_artifact(CompileConfig(model=ckpt, output=str(tmp_path / "b"),
                                       device="cuda", backend="onnx"))
    assert not (tmp_path / "a" / "graphs").exists()


def test_sessions_share_one_copy_of_the_weights(tiny_models, tmp_path):
    """Resident memory: loading every bucket's session adds far less than one
    more copy of the weights (onnxruntime's per-session pre-packing, on by
    default, added about one copy per session)."""
    import psutil

    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.runtime.onnx_loader import OnnxLoader

    ckpt = tiny_models.get("llama", hidden_size=1024, intermediate_size=4096,
                           num_attention_heads=8, num_key_value_heads=4)
    art = tmp_path / "wide"
    compile_artifact(CompileConfig(
        model=str(ckpt), output=str(art), dtype="float32", backend="onnx",
        **{**COMPILE_PLAN, "prefill_buckets": (16,), "decode_batch_sizes": (4,),
           "context_buckets": (128,)}))
    manifest = Manifest.read(art)
    loader = OnnxLoader()
    weights = loader.read_weights(art, manifest, torch.device("cpu"))
    weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    assert weight_bytes > 64 << 20
    before = psutil.Process().memory_info().rss
    graphs = [loader.load_graph(art / e.file, e.bucket, torch.device("cpu"), weights, manifest)
              for e in manifest.graphs]
    added = psutil.Process().memory_info().rss - before
    assert len(graphs) == 2
    assert added < 0.3 * weight_bytes, (added >> 20, weight_bytes >> 20)


def test_missing_onnx_packages_are_clear_errors(art, tiny_models, tmp_path, monkeypatch):
    import sys

    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact
    from aotllm.graphs.manifest import ArtifactError

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails
    with pytest.raises(ArtifactError, match=r"pip install 'aotllm\[onnx\]'"):
        LLM(str(art))
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ValueError, match=r"needs onnxscript: pip install 'aotllm\[onnx\]'"):
        compile_artifact(CompileConfig(model=str(tiny_models.get("llama-gqa")),
                                       output=str(tmp_path / "a"), backend="onnx"))


def test_each_graph_file_runs_on_its_own(art, compiled):
    """A graph file is a standard ONNX model: plain onnxruntime, reading the
    external weights itself, gives the loader's logits and updated caches."""
    executor = compiled.llm_engine.runner.executor
    spec = compiled.llm_engine.runner.kv_spec
    bucket, rows = _logit_cases(compiled.llm_engine.vocab_size)[1]
    inputs = _paged_inputs(rows, bucket)
    torch.manual_seed(2)
    kv = [torch.randn(spec.layer_shape(12)) for _ in range(spec.num_layers)]
    session = ort.InferenceSession(str(art / Manifest.read(art).graph_for(bucket).file),
                                   providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), [*inputs, *kv])}
    logits, *new_kv = session.run(None, feeds)
    kv_bound = [k.clone() for k in kv]
    want = executor.graphs[bucket]([*inputs, *kv_bound])[0]
    assert torch.allclose(torch.from_numpy(logits), want, atol=1e-5)
    for a, b in zip(new_kv, kv_bound):
        assert torch.equal(torch.from_numpy(a), b)


# One 1-layer config per family beyond Llama: the parts ONNX export could trip
# on are a family's own (Qwen3's q/k norms, Glm4's sandwich norms and partial
# rotary, InternLM2's dynamic rope, Falcon's LayerNorm with bias and parallel
# branches, the MoE router, expert gather at decode and all-experts prefill,
# Qwen2-MoE's gated shared expert).
ONNX_FAMILY_VARIANTS = ["qwen3-gqa", "glm4-mqa-tied", "internlm2-mqa-dynamic",
                        "falcon-newarch-bias-tied", "qwen2-moe-shared"]


@pytest.mark.parametrize("variant", ONNX_FAMILY_VARIANTS)
def test_family_artifact_matches_eager(variant, artifacts, tiny_models, one_thread):
    from tests.test_families import FAMILY_PLAN, ONE_LAYER, check_family_artifact

    art = artifacts.get(variant, "float32", backend="onnx", model_kwargs=ONE_LAYER,
                        **FAMILY_PLAN)
    assert Manifest.read(art).backend == "onnx"
    check_family_artifact(art, variant, tiny_models)
