"""Compiled artifact vs eager model: every bucket of the plan, tokens and logits."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.graphs.buckets import Bucket, plan_buckets
from aotllm.graphs.kv_cache import NULL_BLOCK
from aotllm.graphs.manifest import Manifest
from aotllm.models.loader import load_model
from aotllm.runtime.artifact import CompiledExecutor
from tests.conftest import COMPILE_PLAN

pytestmark = pytest.mark.slow

PLAN = plan_buckets(**COMPILE_PLAN)
BS = PLAN.block_size
EAGER_KW = dict(
    enforce_eager=True, block_size=BS, max_model_len=COMPILE_PLAN["max_model_len"],
    max_num_seqs=COMPILE_PLAN["max_num_seqs"],
)


@dataclass(frozen=True)
class Call:
    bucket: Bucket
    # Per row of the padded batch: how many of its tokens write to a live
    # block (padding writes to the null block), i.e. its real token count.
    real_tokens: tuple[int, ...]


@pytest.fixture
def calls(monkeypatch) -> list[Call]:
    """Records every compiled graph call made during the test."""
    seen: list[Call] = []
    original = CompiledExecutor.__call__

    def spy(self, phase, shape, *inputs):
        slots = inputs[2].view(shape.batch, shape.tokens)
        live = (slots // self.plan.block_size) != NULL_BLOCK
        seen.append(Call(Bucket(phase, shape.batch, shape.tokens, shape.context_blocks),
                         tuple(live.sum(dim=1).tolist())))
        return original(self, phase, shape, *inputs)

    monkeypatch.setattr(CompiledExecutor, "__call__", spy)
    return seen


@pytest.fixture(scope="module")
def checkpoint(tiny_models):
    return tiny_models.get("llama-gqa")


@pytest.fixture(scope="module")
def fp32_artifact(artifacts):
    return artifacts.get("llama-gqa", "float32")


@pytest.fixture(scope="module")
def compiled(fp32_artifact) -> LLM:
    return LLM(str(fp32_artifact))


@pytest.fixture(scope="module")
def eager(checkpoint) -> LLM:
    return LLM(str(checkpoint), dtype="float32", **EAGER_KW)


def _prompts(vocab: int, lengths: list[int], seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(5, vocab, (n,), generator=g).tolist()}
            for n in lengths]


def _greedy(llm: LLM, prompts: list[dict], max_tokens: int) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _smaller(values: list[int], than: int) -> int:
    return max((v for v in values if v < than), default=0)


def workload(bucket: Bucket) -> tuple[list[int], int, tuple[int, ...]]:
    """(prompt lengths, max_tokens, the real-token row pattern expected at `bucket`).

    Each workload needs `bucket` and no smaller one of its phase, with padding
    where the plan allows it: prompts shorter than T, and one row fewer than B.
    """
    if bucket.phase == "prefill" and bucket.batch > 1:
        # B prompts that fit T, admitted in one step: one batched call (the
        # same padded tokens as B one-row calls, in fewer calls).
        lengths = [bucket.tokens - bucket.batch + 1 + i for i in range(bucket.batch)]
        return lengths, 3, tuple(lengths)
    if bucket.phase == "prefill":
        shortest = _smaller([b.tokens for b in PLAN.prefill], bucket.tokens) + 1
        return [shortest, bucket.tokens], 3, (shortest,)
    n = bucket.batch
    if n - 1 > _smaller([b.batch for b in PLAN.decode], bucket.batch):
        n -= 1  # a batch that must be padded up to B
    floor = _smaller([b.context_blocks for b in PLAN.decode], bucket.context_blocks) * BS
    max_tokens = 8
    lengths = [floor + 2 + 4 * i for i in range(n)]
    # Decode contexts run from len+1 to len+max_tokens-1: above the smaller
    # context bucket, within this one.
    assert lengths[-1] + max_tokens - 1 <= bucket.context_blocks * BS
    return lengths, max_tokens, (1,) * n + (0,) * (bucket.batch - n)


def test_manifest_records_the_plan(fp32_artifact):
    assert Manifest.read(fp32_artifact).bucket_plan() == PLAN


@pytest.mark.parametrize("bucket", PLAN.buckets, ids=lambda b: b.name)
def test_greedy_tokens_match_eager_on_bucket(bucket, compiled, eager, calls):
    lengths, max_tokens, pattern = workload(bucket)
    prompts = _prompts(eager.llm_engine.vocab_size, lengths, seed=sum(lengths))
    got = _greedy(compiled, prompts, max_tokens)
    want = _greedy(eager, prompts, max_tokens)
    assert got == want, f"{bucket.name}: prompt lengths {lengths}"
    hits = {c.real_tokens for c in calls if c.bucket == bucket}
    assert pattern in hits, f"{bucket.name} not hit with rows {pattern}; calls: {calls}"


def test_prompt_longer_than_largest_prefill_bucket_is_chunked(compiled, eager, calls):
    chunk = PLAN.max_prefill_tokens
    prompts = _prompts(eager.llm_engine.vocab_size, [chunk + 36], seed=7)
    got = _greedy(compiled, prompts, 8)
    assert got == _greedy(eager, prompts, 8)
    largest = max(PLAN.prefill, key=lambda b: b.tokens)
    prefill = [c for c in calls if c.bucket.phase == "prefill"]
    assert prefill == [Call(largest, (chunk,)), Call(largest, (36,))]
    decode = {c.bucket.context_blocks for c in calls if c.bucket.phase == "decode"}
    assert decode == {PLAN.max_context_blocks}


def _paged_inputs(rows: list[tuple[list[int], int, list[int]]], bucket: Bucket) -> list:
    """Graph inputs for rows of (new token ids, start position, block ids), padded to `bucket`."""
    b, t, maxb = bucket.batch, bucket.tokens, bucket.context_blocks
    ids = torch.zeros(b, t, dtype=torch.long)
    pos = torch.zeros(b, t, dtype=torch.long)
    slots = torch.full((b, t), NULL_BLOCK * BS, dtype=torch.long)
    tables = torch.full((b, maxb), NULL_BLOCK, dtype=torch.long)
    ctx = torch.ones(b, dtype=torch.long)
    qlen = torch.ones(b, dtype=torch.long)
    for i, (toks, start, blocks) in enumerate(rows):
        n = len(toks)
        ids[i, :n] = torch.tensor(toks)
        p = torch.arange(start, start + n)
        pos[i, :n] = p
        slots[i, :n] = torch.tensor(blocks)[p // BS] * BS + p % BS
        tables[i, : len(blocks)] = torch.tensor(blocks)
        ctx[i], qlen[i] = start + n, n
    return [ids, pos, slots.view(-1), tables, ctx, qlen]


def _logit_cases(vocab: int) -> list[tuple[Bucket, list]]:
    g = torch.Generator().manual_seed(3)

    def toks(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    prefill = PLAN.prefill[0]
    decode = max(PLAN.decode, key=lambda b: b.cost)
    # A second prefill chunk (11 tokens after 20 cached ones), padded to T; a
    # decode batch with one padding row and contexts of 10, 40 and 64 tokens.
    return [
        (prefill, [(toks(11), 20, [3, 7])]),
        (decode, [(toks(1), 9, [1]), (toks(1), 39, [2, 4, 5]), (toks(1), 63, [6, 8, 9, 10])]),
    ]


def test_graph_logits_match_eager_model(compiled, checkpoint):
    check_graph_logits(compiled, checkpoint, torch.device("cpu"))


def check_graph_logits(compiled: LLM, checkpoint, device: torch.device) -> None:
    """Each case's graph logits within 1e-4 of the float32 eager model's on
    `device`, and the new K/V written to the same live slots."""
    executor = compiled.llm_engine.runner.executor
    model = load_model(checkpoint, "float32").to(device)
    spec = compiled.llm_engine.runner.kv_spec
    vocab = compiled.llm_engine.vocab_size
    for bucket, rows in _logit_cases(vocab):
        inputs = [t.to(device) for t in _paged_inputs(rows, bucket)]
        torch.manual_seed(0)
        kv = [torch.randn(spec.layer_shape(12), device=device) for _ in range(spec.num_layers)]
        kv_graph = [k.clone() for k in kv]
        kv_eager = [k.clone() for k in kv]
        got = executor.graphs[bucket]([*inputs, *kv_graph])[0]
        with torch.inference_mode():
            want = model(*inputs, kv_eager)
        n = len(rows)
        diff = (got[:n] - want[:n]).abs().max().item()
        assert diff < 1e-4, f"{bucket.name}: max abs logit difference {diff}"
        # The new K/V land in the same live slots on both sides.
        for a, e in zip(kv_graph, kv_eager):
            assert torch.allclose(a[:, NULL_BLOCK + 1 :], e[:, NULL_BLOCK + 1 :], atol=1e-5)
        assert not torch.equal(kv_graph[0], kv[0]), f"{bucket.name} wrote no K/V"


def _top5(step: dict) -> set[int]:
    return {tok for tok, lp in step.items() if lp.rank is not None and lp.rank <= 5}


def test_bf16_artifact_agrees_with_bf16_eager_within_top5(artifacts, checkpoint):
    compiled = LLM(str(artifacts.get("llama-gqa", "bfloat16")))
    eager = LLM(str(checkpoint), dtype="bfloat16", **EAGER_KW)
    prompts = _prompts(eager.llm_engine.vocab_size, [3, 16, 29, 70], seed=11)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=5)
    outs_c = compiled.generate(prompts, params, use_tqdm=False)
    outs_e = eager.generate(prompts, params, use_tqdm=False)
    for prompt, oc, oe in zip(prompts, outs_c, outs_e):
        c, e = oc.outputs[0], oe.outputs[0]
        assert len(c.token_ids) == len(e.token_ids) == 24
        n = len(prompt["prompt_token_ids"])
        for step, (tc, te) in enumerate(zip(c.token_ids, e.token_ids)):
            if tc == te:
                continue
            # Rounding may flip a near-tie, but only between likely tokens.
            assert tc in _top5(e.logprobs[step]), f"prompt {n}: step {step}"
            assert te in _top5(c.logprobs[step]), f"prompt {n}: step {step}"
            break  # the two continuations differ from here on


@pytest.mark.parametrize("num_blocks", [9, 33, 500])
def test_one_artifact_serves_any_kv_cache_size(fp32_artifact, eager, num_blocks):
    """num_blocks is chosen at load time; no graph fixes it. 9 blocks (8 usable,
    one max_model_len sequence) forces preemption for 4 concurrent requests."""
    llm = LLM(str(fp32_artifact), num_gpu_blocks_override=num_blocks)
    runner = llm.llm_engine.runner
    assert all(kv.shape[1] == num_blocks for kv in runner.kv_caches)
    prompts = _prompts(eager.llm_engine.vocab_size, [20, 35, 9, 50], seed=11)
    assert _greedy(llm, prompts, 24) == _greedy(eager, prompts, 24)


def test_graphs_run_in_inference_mode(compiled, monkeypatch):
    """An AOTInductor graph holds the GIL for its whole run. Tensors it makes
    outside inference mode (gloo's all-gather views among them) carry autograd
    metadata whose freeing takes the GIL, which deadlocked TP ranks when
    gloo's worker thread freed one during the next graph (CompiledExecutor).
    The graphs run in inference mode: what they return is an inference tensor."""
    seen: list[bool] = []
    original = CompiledExecutor.__call__

    def spy(self, phase, shape, *inputs):
        out = original(self, phase, shape, *inputs)
        seen.append(out.is_inference())
        return out

    monkeypatch.setattr(CompiledExecutor, "__call__", spy)
    _greedy(compiled, _prompts(compiled.llm_engine.vocab_size, [5, 20], 3), 3)
    assert seen and all(seen)
