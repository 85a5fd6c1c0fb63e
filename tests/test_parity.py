"""Parity against transformers (fp32) through the production loader."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from aotllm import LLM, SamplingParams
from aotllm.models.config import ModelConfig
from aotllm.models.loader import load_model
from tests.conftest import MODEL_VARIANTS

BLOCK = 4


def _paged_forward(model, kv, blocks, ids: list[int], start: int) -> torch.Tensor:
    """Runs `ids` at positions start.. through the graph signature; returns last-token logits."""
    t = len(ids)
    pos = list(range(start, start + t))
    slots = [blocks[p // BLOCK] * BLOCK + p % BLOCK for p in pos]
    table = blocks + [0] * 2  # padded entries point at the null block
    with torch.inference_mode():
        return model(
            torch.tensor([ids]),
            torch.tensor([pos]),
            torch.tensor(slots),
            torch.tensor([table]),
            torch.tensor([start + t]),
            torch.tensor([t]),
            kv,
        )[0]


@pytest.fixture(scope="module", params=sorted(MODEL_VARIANTS))
def variant(request, tiny_models):
    path = tiny_models.get(request.param)
    # Remote-code layouts compare with the transformers model of the same network.
    reference = tiny_models.reference(request.param)
    hf = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return request.param, path, hf


def test_prompt_and_decode_logits_match_transformers(variant):
    name, path, hf = variant
    model = load_model(path, "float32")
    c = model.config
    torch.manual_seed(0)
    ids = torch.randint(5, c.vocab_size, (26,)).tolist()
    n_blocks = math.ceil(len(ids) / BLOCK)
    # Scattered, non-contiguous blocks: the block table must be honoured.
    blocks = [3 * i + 2 for i in range(n_blocks)]
    kv = [torch.zeros(2, 3 * n_blocks + 4, BLOCK, c.num_kv_heads, c.head_dim) for _ in range(c.num_layers)]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    # A 20-token prompt in two chunks (the second attends to the first through
    # the cache), then six single-token decode steps.
    _paged_forward(model, kv, blocks, ids[:9], 0)
    got = [_paged_forward(model, kv, blocks, ids[9:20], 9)]
    for p in range(20, len(ids)):
        got.append(_paged_forward(model, kv, blocks, ids[p : p + 1], p))
    want = ref[19:]
    diff = (torch.stack(got) - want).abs().max().item()
    assert diff < 1e-4, f"{name}: max abs logit difference {diff}"


PROMPT_LENGTHS = [1, 7, 16, 33]


@pytest.fixture(scope="module")
def llm_for(tiny_models):
    cache: dict[str, LLM] = {}

    def get(name: str) -> LLM:
        if name not in cache:
            path = tiny_models.get(name)
            limit = ModelConfig.from_pretrained(path).derived_max_model_len
            cache[name] = LLM(
                str(path), dtype="float32", enforce_eager=True,
                block_size=BLOCK, max_num_seqs=8, max_model_len=min(128, limit),
            )
        return cache[name]

    return get


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]


def test_greedy_tokens_match_transformers_generate(variant, llm_for):
    name, _, hf = variant
    llm = llm_for(name)
    prompts = _prompts(hf.config.vocab_size, PROMPT_LENGTHS)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                # No eos: ignore_eos samples eos like any token, where
                # min_new_tokens would mask it out.
                max_new_tokens=32, do_sample=False, eos_token_id=None,
            )[0, len(prompt):].tolist()
        assert len(ref) == 32
        assert out.outputs[0].token_ids == ref, f"{name}: prompt of {len(prompt)} tokens"
        assert out.outputs[0].finish_reason == "length"


# One config per family (the eager runner batches rows of different lengths;
# the MoE families route padding tokens of short rows beside real ones).
BATCHED_VARIANTS = ["llama-gqa", "qwen3-gqa", "glm4-mqa-tied", "falcon-newarch-bias-tied",
                    "mixtral-top2", "qwen2-moe-shared", "qwen3-moe-norm-topk",
                    "internlm2-gqa-bias", "chatglm-mqa-bias"]


@pytest.mark.parametrize("name", BATCHED_VARIANTS)
def test_batched_equals_one_at_a_time(llm_for, name, one_thread):
    llm = llm_for(name)
    vocab = llm.llm_engine.vocab_size
    lengths = [3, 30, 11, 1, 25, 8, 17, 40]
    prompts = [{"prompt_token_ids": p} for p in _prompts(vocab, lengths, seed=2)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
              for m in (5, 20, 12, 30, 7, 16, 3, 24)]
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, together):
        alone = llm.generate(prompt, p, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == p.max_tokens
