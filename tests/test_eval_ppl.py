"""Perplexity through the serving runtime: transformers parity, compiled vs
eager, engine state afterwards, and `aotllm eval-ppl`."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from aotllm import LLM, SamplingParams
from aotllm.cli import main
from aotllm.graphs.kv_cache import NULL_BLOCK
from aotllm.runtime.artifact import CompiledExecutor
from aotllm.runtime.scoring import (
    ScoreResult, evaluate_perplexity, score_tokens, split_windows, top1_agreement,
)
from tests.conftest import COMPILE_PLAN, REPO

MAX_LEN = COMPILE_PLAN["max_model_len"]  # 128: the eager engines match the artifact
BS = COMPILE_PLAN["block_size"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
TEXT = (REPO / "scripts" / "data" / "corpus.txt").read_text()[:1500]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def _eager(path, **overrides) -> LLM:
    kwargs = dict(enforce_eager=True, dtype="float32", block_size=BS, max_model_len=MAX_LEN,
                  max_num_seqs=4, seed=0)
    return LLM(str(path), **{**kwargs, **overrides})


@pytest.fixture(scope="module")
def eager(llama_dir) -> LLM:
    return _eager(llama_dir)


def _ids(n: int, seed: int = 0) -> list[int]:
    # Ids from 5 up: 0..4 are the special tokens.
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 500, (n,), generator=g).tolist()  # the tiny vocab is 512


def _assert_idle(llm: LLM) -> None:
    bm = llm.llm_engine.scheduler.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_usable_blocks, "KV blocks leaked"


def _reference(hf, ids: list[int], window: int) -> tuple[float, list[int], list[float]]:
    """NLL sum, argmax predictions and top-2 margins from full-sequence logits,
    window by window (windows overlap by one token, so each token after the
    first is scored once)."""
    nll, preds, margins = 0.0, [], []
    for start in range(0, len(ids) - 1, window - 1):
        w = ids[start : start + window]
        with torch.no_grad():
            logits = hf(torch.tensor([w])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(1, torch.tensor(w[1:]).unsqueeze(1))
        nll -= lp.double().sum().item()
        preds += logits.argmax(dim=-1).tolist()
        top2 = logits.topk(2, dim=-1).values
        margins += (top2[:, 0] - top2[:, 1]).tolist()
    return nll, preds, margins


def _assert_same(got: ScoreResult, nll: float, preds: list[int], margins: list[float]) -> None:
    assert got.nll == pytest.approx(nll, rel=1e-4)
    assert got.predictions == preds
    assert got.margins == pytest.approx(margins, abs=1e-4)


# -- windows and the scores themselves -----------------------------------------


def test_split_windows_score_every_token_but_the_first_once():
    assert split_windows(2048, 1024) == [(0, 1024), (1023, 2047), (2046, 2048)]
    assert split_windows(2, 1024) == [(0, 2)]
    assert split_windows(10, 2) == [(i, i + 2) for i in range(9)]
    for n, w in [(2, 2), (7, 3), (300, 64), (64, 64), (65, 64)]:
        spans = split_windows(n, w)
        assert sum(stop - start - 1 for start, stop in spans) == n - 1
        assert all(stop - start <= w for start, stop in spans)
        assert all(b[0] == a[1] - 1 for a, b in zip(spans, spans[1:]))


def test_eager_scores_match_transformers(llama_dir, eager):
    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    ids = _ids(300)
    # Window 64 over 300 tokens: 5 windows, 3 at a time, so rows are refilled
    # mid-batch and the last batch is smaller.
    got = score_tokens(eager.llm_engine, ids, window=64, batch=3)
    assert (got.num_tokens, got.num_windows, got.window) == (299, 5, 64)
    assert got.targets == ids[1:] and len(got.predictions) == 299
    _assert_same(got, *_reference(hf, ids, 64))
    assert got.perplexity == pytest.approx(math.exp(got.nll / 299))
    _assert_idle(eager)
    # Defaults: window max_model_len, batch max_num_seqs; same scores for one window.
    short = ids[:MAX_LEN]
    _assert_same(score_tokens(eager.llm_engine, short), *_reference(hf, short, MAX_LEN))


def test_evaluate_perplexity_adds_only_bos(eager):
    tok = eager.get_tokenizer()
    ids = tok.encode(TEXT)  # the tiny tokenizer adds BOS (id 0) and nothing else
    assert ids[0] == tok.bos_token_id and ids[1:] == tok.encode(TEXT, add_special_tokens=False)
    got = evaluate_perplexity(eager, TEXT, window=100)
    assert got.targets == ids[1:]
    assert got.nll == score_tokens(eager.llm_engine, ids, window=100).nll
    # An LLMEngine works as well as an LLM.
    assert evaluate_perplexity(eager.llm_engine, TEXT, window=100).nll == got.nll


def test_engine_state_after_scoring(llama_dir, eager):
    prompts = [{"prompt_token_ids": _ids(n, seed=n)} for n in (5, 40, 90)]
    evaluate_perplexity(eager, TEXT, window=MAX_LEN)
    _assert_idle(eager)
    after = eager.generate(prompts, GREEDY, use_tqdm=False)
    fresh = _eager(llama_dir).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in fresh]
    _assert_idle(eager)


@pytest.mark.parametrize("ids, kwargs, match", [
    ([7], {}, "at least 2 tokens"),
    ([7, 10**6], {}, "out of vocabulary"),
    (list(range(5, 50)), {"window": 1}, "window must be between 2"),
    (list(range(5, 50)), {"window": MAX_LEN + 1}, "window must be between 2"),
    (list(range(5, 50)), {"batch": 0}, "batch must be"),
])
def test_bad_arguments_are_value_errors(eager, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        score_tokens(eager.llm_engine, ids, **kwargs)
    _assert_idle(eager)


def test_scoring_between_steps_of_a_request(llama_dir):
    llm = _eager(llama_dir, num_gpu_blocks_override=9)  # 8 usable blocks: 128 tokens
    engine = llm.llm_engine
    prompt = {"prompt_token_ids": _ids(40, seed=3)}
    engine.add_request("r", prompt, GREEDY)
    engine.step()  # the prefill: the request holds 3 blocks, 5 are free
    with pytest.raises(ValueError, match="pass a smaller window"):
        score_tokens(engine, _ids(200), window=100)  # one window needs 7 blocks
    assert score_tokens(engine, _ids(200), window=64).num_windows == 4  # one row at a time
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    fresh = _eager(llama_dir).generate([prompt], GREEDY, use_tqdm=False)
    assert outs[-1].outputs[0].token_ids == fresh[0].outputs[0].token_ids
    _assert_idle(llm)


# -- the compiled artifact -------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(artifacts) -> LLM:
    return LLM(str(artifacts.get("llama-gqa", "float32")))


@pytest.mark.slow
def test_compiled_matches_eager_across_buckets(compiled, eager, llama_dir, monkeypatch):
    seen: set[tuple[int, int, int]] = set()  # (padded batch, context blocks, real rows)
    original = CompiledExecutor.__call__

    def spy(self, phase, shape, *inputs):
        assert phase == "decode" and shape.tokens == 1
        live = int((inputs[2] // BS != NULL_BLOCK).sum())
        seen.add((shape.batch, shape.context_blocks, live))
        return original(self, phase, shape, *inputs)

    monkeypatch.setattr(CompiledExecutor, "__call__", spy)
    ids = _ids(350, seed=1)
    # Windows of 100 > the 64-token context bucket; 3 rows pad to batch 4,
    # then the last window runs alone at batch 1.
    got = score_tokens(compiled.llm_engine, ids, window=100, batch=3)
    monkeypatch.undo()
    assert {(4, 4, 3), (4, 8, 3), (1, 4, 1)} <= seen, seen
    want = score_tokens(eager.llm_engine, ids, window=100, batch=3)
    assert got.nll == pytest.approx(want.nll, rel=1e-4)
    assert got.predictions == want.predictions and got.targets == want.targets
    with pytest.raises(ValueError, match="largest decode batch"):
        score_tokens(compiled.llm_engine, ids, window=100, batch=5)
    _assert_idle(compiled)
    prompts = [{"prompt_token_ids": _ids(n, seed=n)} for n in (5, 70)]
    after = compiled.generate(prompts, GREEDY, use_tqdm=False)
    fresh = _eager(llama_dir).generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in after] == [o.outputs[0].token_ids for o in fresh]


# -- the CLI ---------------------------------------------------------------------

LINE = re.compile(r"^perplexity (\S+) over (\d+) tokens \((\d+) windows? of <=(\d+)\) "
                  r"in \S+ s \(\d+ tokens/s\)$", re.M)


pytestmark = pytest.mark.usefixtures("restore_aotllm_logging")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT)
    return path


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_eager_checkpoint(llama_dir, data_file, eager, capsys):
    rc = main(["eval-ppl", str(llama_dir), "--enforce-eager", "--data", str(data_file),
               "--dtype", "float32", "--max-model-len", str(MAX_LEN), "--window", "100",
               "--json"])
    out = capsys.readouterr().out
    assert rc == 0
    ppl, n, windows, window = LINE.search(out).groups()
    record = json.loads(out.strip().splitlines()[-1])
    want = evaluate_perplexity(eager, TEXT, window=100)
    assert (int(n), int(windows), int(window)) == (want.num_tokens, want.num_windows, 100)
    assert record["num_tokens"] == want.num_tokens and record["window"] == 100
    assert record["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert float(ppl) == pytest.approx(want.perplexity, abs=1e-3)


@pytest.mark.slow
def test_cli_artifact(artifacts, data_file, capsys):
    rc = main(["eval-ppl", str(artifacts.get("llama-gqa", "float32")), "--data", str(data_file)])
    assert rc == 0
    _, n, windows, window = LINE.search(capsys.readouterr().out).groups()
    assert int(window) == MAX_LEN and int(windows) == math.ceil((int(n)) / (MAX_LEN - 1))


@pytest.mark.parametrize("content, match, before_load", [
    (None, "does not exist", True),
    ("", "is empty", True),
    (" \n\t", "is empty", True),
    (b"\xff\xfe bad", "not UTF-8", True),
    ("<|begin_of_text|>", "at least 2 tokens", False),  # BOS alone: one token
])
def test_cli_bad_data_file(llama_dir, tmp_path, capsys, content, match, before_load):
    path = tmp_path / "data.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    rc = main(["eval-ppl", str(llama_dir), "--enforce-eager", "--data", str(path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert match in _one_error_line(err.splitlines()[-1])
    if before_load:  # one line and nothing else: the model was never loaded
        _one_error_line(err)


def test_top1_agreement_counts_only_where_the_reference_resolves_its_choice():
    def result(preds: list[int], margins: list[float]) -> ScoreResult:
        return ScoreResult(num_tokens=4, nll=0.0, predictions=preds, targets=[1, 2, 3, 4],
                           margins=margins, num_windows=1, window=5)

    ref = result([5, 6, 7, 8], [0.1, 2.0, 0.3, 1.0])
    other = result([9, 6, 7, 0], [1.0, 1.0, 1.0, 1.0])
    assert top1_agreement(other, ref) == (0.5, 4)
    # Position 0 (a near-tie, 0.1) is dropped; 3 stays and still disagrees.
    assert top1_agreement(other, ref, 0.25) == (2 / 3, 3)
    assert top1_agreement(ref, ref, 0.25) == (1.0, 3)
    with pytest.raises(ValueError, match="different token sequences"):
        top1_agreement(dataclasses.replace(other, targets=[4, 3, 2, 1]), ref)
