"""Tensor parallelism on this CPU: two gloo ranks, one thread each. A sharded
model's greedy tokens (chunked prefill, batched decode) equal the unsharded
model's; the weight map's rank slices are checked against the full tensors."""

from __future__ import annotations

import pytest
import torch

from aotllm.models.loader import load_model
from aotllm.models.parallel import TensorParallel
from tests.tp_harness import eager_rank_tokens, greedy_eager, run_ranks

# Llama GQA (KV heads split), Qwen2 (q/k/v bias), KV heads replicated (one KV
# head, two ranks), a padded vocabulary (513 rows over 2 ranks), and the
# families whose weight maps regroup rows (grouped qkv, rotary reorder) or
# stack experts.
EAGER_VARIANTS = {
    "llama-gqa": ("llama-gqa", {}),
    "qwen2-bias": ("qwen2", {}),
    "llama-kv-replicated": ("llama", {"num_key_value_heads": 1}),
    "llama-padded-vocab": ("llama", {"vocab_size": 513}),
    "falcon-newarch-bias-tied": ("falcon-newarch-bias-tied", {}),
    "internlm2-gqa-bias": ("internlm2-gqa-bias", {}),
    "chatglm-mqa-bias": ("chatglm-mqa-bias", {}),
    "mixtral-top2": ("mixtral-top2", {}),
}


@pytest.mark.parametrize("variant", sorted(EAGER_VARIANTS))
def test_eager_tp2_greedy_equals_tp1(tiny_models, one_thread, variant):
    name, overrides = EAGER_VARIANTS[variant]
    path = tiny_models.get(name, **overrides)
    want = greedy_eager(load_model(path, "float32"))
    got = run_ranks(2, eager_rank_tokens, path)
    assert got == want


def test_rank_slices_of_the_weights(tiny_models):
    """Each rank's parameters are exactly its slice of the full model's: q/k/v
    rows by head, o_proj columns, gate/up rows, vocabulary rows (padding rows
    zero), a row-parallel bias on rank 0 only."""
    path = tiny_models.get("qwen2", num_key_value_heads=1, vocab_size=513)
    full = load_model(path, "float32")
    c = full.config
    d, q = c.head_dim, c.num_heads * c.head_dim
    for rank in range(2):
        part = load_model(path, "float32", tp=TensorParallel(rank, 2))
        attn, fattn = part.model.layers[0].self_attn, full.model.layers[0].self_attn
        qh = c.num_heads // 2
        w = fattn.qkv_proj.weight
        want = torch.cat([w[rank * qh * d:(rank + 1) * qh * d], w[q:q + d], w[q + d:q + 2 * d]])
        assert torch.equal(attn.qkv_proj.weight, want)
        assert torch.equal(attn.qkv_proj.bias[:qh * d], fattn.qkv_proj.bias[rank * qh * d:(rank + 1) * qh * d])
        assert torch.equal(attn.o_proj.weight, fattn.o_proj.weight[:, rank * qh * d:(rank + 1) * qh * d])
        i = c.intermediate_size // 2
        gu, fgu = part.model.layers[0].mlp.gate_up_proj.weight, full.model.layers[0].mlp.gate_up_proj.weight
        assert torch.equal(gu[:i], fgu[rank * i:(rank + 1) * i])
        assert torch.equal(gu[i:], fgu[c.intermediate_size + rank * i:c.intermediate_size + (rank + 1) * i])
        emb = part.model.embed_tokens.weight
        assert emb.shape[0] == 257
        rows = full.model.embed_tokens.weight[rank * 257:(rank + 1) * 257]
        assert torch.equal(emb[:rows.shape[0]], rows)
        assert not emb[rows.shape[0]:].any()


def test_shapes_that_do_not_split_are_refused(tiny_models):
    path = tiny_models.get("llama-gqa")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by "
                                         "tensor_parallel_size 3"):
        load_model(path, "float32", tp=TensorParallel(0, 3))
