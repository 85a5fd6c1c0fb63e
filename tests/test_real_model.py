"""The real-model tier: SmolLM2-135M-Instruct (fetched once per machine, cached).

Random weights say nothing about quantization error or readable answers; this
trained model does. One bf16 artifact of it is compiled once per session, two
graphs: prefill chunks of 64 tokens and decode batch 8, context 256. The
quantized schemes are scored on the eager quantized model against that
artifact: a 30-layer graph costs minutes to compile on the CI machine, and
that the compiled quantized artifact gives the eager quantized model's tokens
is checked on tiny models (tests/test_quantized_artifacts.py).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.runtime.scoring import (
    BF16_NEAR_TIE, ScoreResult, score_tokens, split_windows, top1_agreement,
)
from tests.conftest import REPO, load_script

pytestmark = pytest.mark.slow

PLAN = dict(max_model_len=256, max_num_seqs=8, block_size=16, prefill_buckets=(64,),
            decode_batch_sizes=(8,), context_buckets=(256,),
            # the two graphs side by side: a third less wall time on 2 cores
            compile_workers=2)
# Held-out text: the story the tiny tokenizers are trained on, never used for
# calibration (the built-in calibration set is quantize/calibration.txt).
HELD_OUT = REPO / "scripts" / "data" / "corpus.txt"
# Scored next-token positions: 8 windows of 256 (overlapping by one token),
# fed as the 8 rows of one decode batch.
POSITIONS = 2040
WINDOW = 256
# Where the bf16 reference's top two logits are closer than this (two bf16
# ulps at these logits' magnitude), rounding alone picks the winner.
NEAR_TIE = BF16_NEAR_TIE


@pytest.fixture(scope="session")
def smollm2() -> str:
    return str(load_script("real_model").smollm2_gguf())


@pytest.fixture(scope="session")
def smol_bf16(smollm2, tmp_path_factory) -> Path:
    """The compiled bf16 artifact."""
    from aotllm.compiler.config import CompileConfig
    from aotllm.compiler.pipeline import compile_artifact

    out = tmp_path_factory.mktemp("smollm2") / "bf16"
    compile_artifact(CompileConfig(model=smollm2, output=str(out), dtype="bfloat16", **PLAN))
    return out


def eager_quantized(smollm2: str, scheme: str) -> LLM:
    """The eager quantized model, with the artifact's KV plan (the same int8
    weights and scales a compiled artifact of the scheme would hold)."""
    return LLM(smollm2, enforce_eager=True, dtype="bfloat16", quantization=scheme,
               max_model_len=PLAN["max_model_len"], max_num_seqs=PLAN["max_num_seqs"],
               block_size=PLAN["block_size"])


@pytest.fixture(scope="session")
def hf_float32(smollm2):
    """transformers' own model of the GGUF file, float32 (read once: reading
    dequantizes every tensor)."""
    from transformers import AutoModelForCausalLM

    path = Path(smollm2)
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def held_out_ids(smol_bf16) -> list[int]:
    from aotllm.runtime.tokenizer import load_tokenizer

    return load_tokenizer(smol_bf16).encode(HELD_OUT.read_text())[: POSITIONS + 1]


@pytest.fixture(scope="session")
def scores(smollm2, smol_bf16, held_out_ids) -> dict[str | None, ScoreResult]:
    out = {}
    for scheme in (None, "w8a16", "w8a8"):
        llm = eager_quantized(smollm2, scheme) if scheme else LLM(str(smol_bf16))
        out[scheme] = score_tokens(llm.llm_engine, held_out_ids, window=WINDOW)
        del llm
    return out


def test_near_ties_of_the_bf16_reference_are_where_even_float32_disagrees(
        scores, held_out_ids, hf_float32):
    """Why agreement is counted where bf16 resolves the choice: transformers'
    float32 model on the same weights parts from the bf16 artifact on several
    percent of all positions (measured: 96.5% agreement), yet on the
    positions where bf16's top two logits are more than NEAR_TIE apart (77%
    of them) it agrees with it everywhere (measured 100%): the rest are
    rounding coin-flips that no implementation can match."""
    bf16 = scores[None]
    preds = []
    with torch.inference_mode():  # the windows score_tokens fed, each in one pass
        for start, stop in split_windows(len(held_out_ids), WINDOW):
            window = torch.tensor([held_out_ids[start:stop]])
            preds += hf_float32(window).logits[0, :-1].argmax(-1).tolist()
    assert len(preds) == POSITIONS
    kept = [p == q for p, q, m in zip(preds, bf16.predictions, bf16.margins) if m > NEAR_TIE]
    assert len(kept) >= 1000
    assert sum(kept) / len(kept) >= 0.995, sum(kept) / len(kept)


def test_bf16_artifact_perplexity_is_that_of_a_trained_model(scores):
    bf16 = scores[None]
    assert bf16.num_tokens == POSITIONS
    # A trained 135M model on English prose; random weights give ~vocab (49152).
    assert 10 < bf16.perplexity < 80, bf16.perplexity


@pytest.mark.parametrize("scheme,ppl_tol,min_agree,min_all", [
    ("w8a16", 0.01, 0.98, 0.94), ("w8a8", 0.03, 0.95, 0.91)])
def test_quantized_perplexity_and_top1_agreement(scores, scheme, ppl_tol, min_agree, min_all):
    """The eager quantized models against the compiled bf16 artifact:
    perplexity within the issue's bounds (1% / 3% of bf16) and top-1
    agreement with bf16 of at least the issue's 98% / 95% on the (1,000 or
    more) positions bf16 resolves (see the test above); measured 99.8% and
    99.3% of 1,579, perplexity +0.19% and +0.52%. Over all positions,
    near-ties included, the floor is what int8 weights reach with a margin
    (measured 95.5% and 93.6%, where float32 reaches 96.5%)."""
    bf16, q = scores[None], scores[scheme]
    assert abs(q.perplexity / bf16.perplexity - 1) <= ppl_tol, (q.perplexity, bf16.perplexity)
    assert q.num_tokens == POSITIONS
    agree, kept = top1_agreement(q, bf16, NEAR_TIE)
    assert kept >= 1000
    assert agree >= min_agree, agree
    assert top1_agreement(q, bf16)[0] >= min_all


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Give me three tips for staying healthy."]


def test_bf16_artifact_chat_answers_equal_transformers(smol_bf16, hf_float32):
    """Greedy answers equal transformers' token for token, except that after a
    step where transformers' own two candidates are within NEAR_TIE of each
    other, the continuations may part (bf16 rounding order differs between
    any two implementations; even aotllm's eager model parts from
    transformers on one of these answers)."""
    llm = LLM(str(smol_bf16))
    params = SamplingParams(temperature=0, max_tokens=32)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(chats, params, use_tqdm=False)
    assert "Paris" in outs[0].outputs[0].text
    # The same bf16 weights as reading the file in bf16: both round the
    # dequantized float32 tensors once.
    hf = copy.deepcopy(hf_float32).to(torch.bfloat16)
    tok = llm.get_tokenizer()
    for chat, out in zip(chats, outs):
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                              output_scores=True, return_dict_in_generate=True)
        want = ref.sequences[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        assert len(got) >= 8
        for step, (g, w) in enumerate(zip(got, want)):
            if g != w:
                logits = ref.scores[step][0].float()
                gap = float(logits[w] - logits[g])
                assert gap <= NEAR_TIE, (step, gap, out.outputs[0].text, tok.decode(want))
                break
