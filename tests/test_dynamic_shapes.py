"""`--dynamic-shapes` (Inductor's default): AOTInductor graphs shared by a
shape group of buckets (compiler/shape_groups.py) give the tokens and logits
of static per-bucket graphs (`--no-dynamic-shapes`)."""

from __future__ import annotations

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.compiler.shape_groups import group_buckets
from aotllm.graphs.buckets import plan_buckets
from aotllm.graphs.manifest import Manifest


def test_groups_cover_the_plan_once_and_keep_static_what_must_be():
    plan = plan_buckets(8192, 16, 16)
    thresholds = (("<=", 16), (">=", 16))
    groups = group_buckets(plan.buckets, thresholds)
    served = [b for g in groups for b in g.buckets]
    assert sorted(served, key=lambda b: b.name) == sorted(plan.buckets, key=lambda b: b.name)
    assert len(groups) < len(plan.buckets) / 3
    for g in groups:
        phases = {b.phase for b in g.buckets}
        assert len(phases) == 1
        top = g.graph_bucket
        assert (top.batch, top.tokens, top.context_blocks) == (
            g.batch[1], g.tokens[1], g.context_blocks[1])
        if top.phase == "prefill" or g.batch[0] == 1:
            assert g.batch[0] == g.batch[1]  # prefill batch and decode batch 1 are static
        for op, n in thresholds:  # every bucket on one side of every kernel threshold
            for rows in ([b.batch * b.tokens for b in g.buckets], [b.batch for b in g.buckets]):
                sides = {r >= n if op == ">=" else r <= n for r in rows}
                assert len(sides) == 1, (g, op, n)
    # No kernel thresholds (a float32 model): one prefill graph per prefill batch size.
    prefill = [g for g in group_buckets(plan.buckets) if g.graph_bucket.phase == "prefill"]
    assert len(prefill) == len({b.batch for b in plan.prefill}) == 2


PARAMS = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
# 70 tokens: chunked over the 64-token prefill bucket; mixed lengths batch and pad.
PROMPTS = [{"prompt_token_ids": [5 + (i * 7) % 50 for i in range(n)]} for n in (3, 20, 45, 70)]


@pytest.mark.slow
def test_dynamic_shape_artifact_equals_static(artifacts, one_thread):
    # The static one's graphs compile side by side in 2 forked workers
    # (--compile-workers, compiler/parallel.py): that path is checked here too.
    static = artifacts.get("llama-gqa", "float32", dynamic_shapes=False, compile_workers=2)
    dynamic = artifacts.get("llama-gqa", "float32")  # the default
    manifest = Manifest.read(dynamic)
    files = {g.file for g in manifest.graphs}
    assert len(files) < len(manifest.graphs)  # graphs are shared
    assert len(files) <= 4  # prefill batch 1, prefill batch 4, decode batch 1, decode batch >= 2
    out_static = LLM(str(static), seed=0).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(str(dynamic), seed=0)
    out_dynamic = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out_dynamic] == [
        o.outputs[0].token_ids for o in out_static]
    # Every bucket's logits against the static graph of the same bucket, over
    # one random KV cache (so the context a bucket reads is not empty).
    graphs_static = LLM(str(static), seed=0).llm_engine.engine_core.runner.executor.graphs
    runner = llm.llm_engine.engine_core.runner
    g = torch.Generator().manual_seed(0)
    caches = [torch.randn(k.shape, generator=g) for k in runner.kv_caches]
    for bucket in manifest.bucket_plan().buckets:
        inputs = _bucket_inputs(bucket, caches)
        a = runner.executor.graphs[bucket]([*inputs, *[c.clone() for c in caches]])[0]
        b = graphs_static[bucket]([*inputs, *[c.clone() for c in caches]])[0]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def _bucket_inputs(bucket, kv_caches) -> list[torch.Tensor]:
    """Valid inputs of one bucket's shape: every row writes fresh slots past block 0."""
    b, t, c = bucket.batch, bucket.tokens, bucket.context_blocks
    bs = kv_caches[0].shape[2]
    num_blocks = kv_caches[0].shape[1]
    g = torch.Generator().manual_seed(b * 1000 + t * 10 + c)
    ids = torch.randint(5, 50, (b, t), generator=g)
    start = (c * bs - t) // 2
    positions = (start + torch.arange(t)).expand(b, t).contiguous()
    tables = 1 + (torch.arange(b * c) % (num_blocks - 1)).view(b, c)
    slots = torch.stack([tables[i, positions[i] // bs] * bs + positions[i] % bs
                         for i in range(b)]).reshape(-1)
    ctx = positions[:, -1] + 1
    return [ids, positions, slots, tables, ctx, torch.full((b,), t)]


@pytest.mark.parametrize("dtype, scheme, isa", [
    ("bfloat16", None, "native"), ("bfloat16", None, "avx2"), ("bfloat16", "w8a16", "native"),
    ("bfloat16", "w8a16", "avx2"), ("float32", "w8a8", "native"), ("float32", "w8a8", "avx2")])
def test_every_group_exports_without_a_guard(llama_dir, tiny_models, monkeypatch, dtype,
                                              scheme, isa, one_thread):
    """Each shape group traces with its dimensions dynamic over its whole range:
    no kernel choice (float, w8a16, w8a8; native or AVX2 CPU) and no MoE path
    switch guards a dimension. Export only; compiling is the slow test's job."""
    from aotllm.compiler.export import export_bucket
    from aotllm.compiler.shape_groups import row_thresholds
    from aotllm.graphs.kv_cache import KVCacheSpec
    from aotllm.models import cpu_isa, float_kernels
    from aotllm.models.checkpoint import open_checkpoint
    from aotllm.quantize.config import QuantConfig
    from aotllm.quantize.load import load_quantized
    from tests.conftest import COMPILE_PLAN

    if isa == "avx2":
        monkeypatch.setattr(cpu_isa, "detect", lambda: cpu_isa.CpuIsa(
            "AVX2", "AVX2", native_bf16=False, native_fp16=False, int8_dot=False))
    models = [llama_dir, tiny_models.get("mixtral-top2")] if scheme is None else [llama_dir]
    plan = plan_buckets(COMPILE_PLAN["max_model_len"], 8, COMPILE_PLAN["block_size"],
                        prefill_buckets=(16, 32, 64), context_buckets=(32, 64, 128))
    cpu = torch.device("cpu")
    for path in models:
        quant = QuantConfig(scheme) if scheme else None
        model, _ = load_quantized(path, dtype, cpu, quant, open_checkpoint(path).load_tokenizer)
        c = model.config
        spec = KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, plan.block_size, dtype)
        thresholds = row_thresholds(model.dtype, scheme, cpu) + tuple(dict.fromkeys(
            t for m in model.modules() for t in getattr(m, "row_thresholds", ())))
        for group in group_buckets(plan.buckets, thresholds):
            if len(group.buckets) > 1:
                with float_kernels.inductor_capture():  # as the Inductor backend traces
                    export_bucket(model, group.graph_bucket, spec, cpu, group)

