"""Context-sized and batched prefill buckets on a compiled artifact, against
the plan they replace (B=1, full-width block tables: the same artifact's
graphs, run through a plan with only those) and against the eager model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.graphs.buckets import Bucket, BucketPlan, group_rows, plan_buckets
from aotllm.models.loader import load_model
from aotllm.runtime.artifact import CompiledExecutor
from tests.test_compiled import _paged_inputs  # block size 16, as BS here

pytestmark = pytest.mark.slow

BS = 16
# Prefill (1,16) at 32 and 128 tokens of context, (1,64) at 128, (4,16) at 32;
# decode batch 4 at 32 and 128: six graphs.
SIZED_PLAN = dict(max_model_len=128, max_num_seqs=4, block_size=BS, prefill_buckets=(16, 64),
                  decode_batch_sizes=(4,), context_buckets=(32, 128),
                  prefill_batch_sizes=(1, 4))
PLAN = plan_buckets(**SIZED_PLAN)
NARROW, WIDE, WIDE64, BATCHED = (Bucket("prefill", 1, 16, 2), Bucket("prefill", 1, 16, 8),
                                 Bucket("prefill", 1, 64, 8), Bucket("prefill", 4, 16, 2))
# Today's plan: one row per call, every block table max_model_len wide.
OLD_PLAN = dataclasses.replace(PLAN, prefill=(WIDE, WIDE64))
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_the_plan_has_sized_and_batched_prefill():
    assert set(PLAN.prefill) == {NARROW, WIDE, WIDE64, BATCHED}


@pytest.fixture(scope="module")
def artifact(artifacts):
    return artifacts.get("llama-gqa", "float32", **SIZED_PLAN)


@pytest.fixture
def calls(monkeypatch) -> list[tuple[Bucket, tuple[int, ...]]]:
    """(bucket, positions of each row's first token) of every graph call."""
    seen = []
    original = CompiledExecutor.__call__

    def spy(self, phase, shape, *inputs):
        starts = tuple(inputs[1][:, 0].tolist())
        seen.append((Bucket(phase, shape.batch, shape.tokens, shape.context_blocks), starts))
        return original(self, phase, shape, *inputs)

    monkeypatch.setattr(CompiledExecutor, "__call__", spy)
    return seen


def _llm(path, plan: BucketPlan | None = None, **kw) -> LLM:
    llm = LLM(str(path), **kw)
    if plan is not None:
        llm.llm_engine.runner.executor.plan = plan
    return llm


def _prompts(vocab: int, lengths: list[int], seed: int, prefix: list[int] = ()) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [list(prefix) + torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def test_greedy_tokens_match_todays_plan_and_eager(artifact, tiny_models, calls):
    """A burst of short prompts (batched), a long one (chunked: the second
    chunk starts at 64), and prompts that hit a cached prefix (start 16 and
    32): the same tokens as the full-width one-row plan and as eager."""
    new = _llm(artifact, enable_prefix_caching=True)
    old = _llm(artifact, OLD_PLAN, enable_prefix_caching=True)
    eager = LLM(str(tiny_models.get("llama-gqa")), enforce_eager=True, dtype="float32",
                block_size=BS, max_model_len=128, max_num_seqs=4)
    vocab = eager.llm_engine.vocab_size
    shared = _prompts(vocab, [16], seed=1)[0]
    waves = [
        _prompts(vocab, [5, 9, 13, 16], seed=2),  # one batched call
        _prompts(vocab, [100], seed=3),  # chunks 64 + 36
        [shared + [7]],  # caches the shared block
        _prompts(vocab, [3, 12], seed=4, prefix=shared),  # hits: start 16
        _prompts(vocab, [8, 30], seed=5, prefix=shared * 2),  # start 16 (new), 32
    ]
    for prompts in waves:
        want = _greedy(eager, prompts)
        assert _greedy(old, prompts) == want
        assert _greedy(new, prompts) == want
    prefill = [(b, starts) for b, starts in calls if b.phase == "prefill"]
    # The old plan ran only its buckets; the new one ran the narrow and
    # batched ones, including chunks that start after cached tokens.
    assert {b for b, _ in prefill} == {NARROW, WIDE, WIDE64, BATCHED}
    assert (BATCHED, (0, 0, 0, 0)) in prefill
    assert any(b == NARROW and max(s) > 0 for b, s in prefill)
    assert any(b == WIDE64 and s == (64,) for b, s in prefill)


def test_logits_match_across_buckets_and_eager(artifact, tiny_models):
    """Each row's logits and K/V writes: at the narrow bucket, the full-width
    one, batched with three other rows (two of them chunks after cached
    tokens), and in the eager model."""
    llm = _llm(artifact)
    graphs = llm.llm_engine.runner.executor.graphs
    spec = llm.llm_engine.runner.kv_spec
    model = load_model(tiny_models.get("llama-gqa"), "float32")
    g = torch.Generator().manual_seed(3)
    toks = lambda n: torch.randint(5, llm.llm_engine.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    rows = [(toks(11), 20, [3, 7]), (toks(16), 0, [5]), (toks(4), 0, [6]),
            (toks(9), 16, [8, 9])]
    torch.manual_seed(0)
    kv0 = [torch.randn(spec.layer_shape(12)) for _ in range(spec.num_layers)]

    def run(fn, bucket, which):
        kv = [k.clone() for k in kv0]
        with torch.inference_mode():
            out = fn([*_paged_inputs(which, bucket), *kv])
        return out[: len(which)], kv

    eager = lambda inputs: model(*inputs[:6], inputs[6:])  # noqa: E731
    batched, kv_b = run(lambda x: graphs[BATCHED](x)[0], BATCHED, rows)
    for i, row in enumerate(rows):
        want, kv_e = run(eager, NARROW, [row])
        for bucket in (NARROW, WIDE):
            got, kv_g = run(lambda x: graphs[bucket](x)[0], bucket, [row])
            assert (got - want).abs().max().item() < 1e-4, (bucket.name, i)
            for a, e in zip(kv_g, kv_e):
                assert torch.allclose(a[:, 1:], e[:, 1:], atol=1e-5)
        assert (batched[i] - want[0]).abs().max().item() < 1e-4, ("batched", i)
    # The batch wrote every row's K/V (each row's blocks are its own).
    _, kv_all = run(eager, Bucket("prefill", 4, 16, 2), rows)
    for a, e in zip(kv_b, kv_all):
        assert torch.allclose(a[:, 1:], e[:, 1:], atol=1e-5)


def test_one_graph_call_per_group(artifact, calls):
    """A step of several prompts makes exactly the calls `group_rows` plans:
    four short prompts, one call; a mixed step (three short rows fill a
    4-row bucket worse than three 1-row ones), one call per group."""
    llm = _llm(artifact)
    vocab = llm.llm_engine.vocab_size
    _greedy(llm, _prompts(vocab, [10, 12, 14, 16], seed=8))
    prefill = [b for b, _ in calls if b.phase == "prefill"]
    assert prefill == [BATCHED]

    calls.clear()
    lengths = [10, 30, 3, 12]  # one step: 55 tokens within the 64-token budget
    _greedy(llm, _prompts(vocab, lengths, seed=9))
    plan = group_rows(PLAN.prefill, [(n, n) for n in lengths], block_size=BS)
    assert [b for b, _ in calls if b.phase == "prefill"] == [b for b, _ in plan]
