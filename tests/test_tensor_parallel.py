"""Tensor parallelism on this CPU: two gloo ranks, one thread each. A sharded
model's greedy tokens (chunked prefill, batched decode) equal the unsharded
model's; the weight map's rank slices are checked against the full tensors."""

from __future__ import annotations

import pytest
import torch

from aotllm.models.loader import load_model
from aotllm.models.parallel import TensorParallel
from aotllm.graphs.manifest import ArtifactError, Manifest
from tests.tp_harness import (
    compiled_rank_tokens, eager_rank_tokens, greedy_compiled, greedy_eager, run_ranks,
)

# A small plan (three shape-group graphs): 16-token prefill chunks, decode
# batches 1 and 4 at one context size.
TP_PLAN = dict(prefill_buckets=(16,), decode_batch_sizes=(1, 4), context_buckets=(128,),
               prefill_batch_sizes=(1,))

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
    # a whole shared expert beside the split experts, added after their all-reduce
    "qwen2-moe-shared": ("qwen2-moe-shared", {}),
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


def test_a_rank_reads_only_its_slices(tiny_models, monkeypatch):
    """From safetensors a rank reads only the rows and columns it keeps of
    each tensor, not whole tensors: half the checkpoint, plus the norms it
    keeps whole."""
    from aotllm.models.checkpoint import SafetensorsCheckpoint, open_checkpoint

    read: list[int] = []
    original = SafetensorsCheckpoint.tensor_parts

    class Counted:
        def __init__(self, part):
            self.part = part

        def get_shape(self):
            return self.part.get_shape()

        def __getitem__(self, index):
            t = self.part[index]
            read.append(t.numel())
            return t

    def counted(self):
        for name, part in original(self):
            yield name, Counted(part)

    monkeypatch.setattr(SafetensorsCheckpoint, "tensor_parts", counted)
    path = tiny_models.get("llama-gqa")
    total = sum(t.numel() for _, t in open_checkpoint(path).tensors())
    norms = sum(t.numel() for n, t in open_checkpoint(path).tensors() if "norm" in n)
    load_model(path, "float32")
    assert sum(read) == total
    for rank in range(2):
        read.clear()
        load_model(path, "float32", tp=TensorParallel(rank, 2))
        assert sum(read) == (total - norms) // 2 + norms


def test_shapes_that_do_not_split_are_refused(tiny_models):
    path = tiny_models.get("llama-gqa")  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by "
                                         "tensor_parallel_size 3"):
        load_model(path, "float32", tp=TensorParallel(0, 3))


# Two cases (each ~70 s of compiling here): GQA heads split, and a tied
# vocab-parallel head with int8 weights and their scales cut per rank. KV
# replication (MQA) and the other families are covered eagerly above.
@pytest.mark.parametrize("variant,quantization", [
    ("llama-gqa", None), ("qwen2-tied", "w8a16"),
])
def test_compiled_tp2_greedy_equals_tp1(artifacts, one_thread, variant, quantization):
    """One graph set for both ranks, a weights file each: the TP=2 artifact's
    greedy tokens equal the TP=1 artifact's (quantized: scales cut with their
    weights, so W8A16 TP=2 equals W8A16 TP=1)."""
    tp1 = artifacts.get(variant, quantization=quantization, **TP_PLAN)
    tp2 = artifacts.get(variant, quantization=quantization, tensor_parallel_size=2, **TP_PLAN)
    manifest = Manifest.read(tp2)
    assert (manifest.tensor_parallel_size, manifest.distributed_backend) == (2, "gloo")
    # TP (format 2) with the CPU kernel library (3): a runtime from before
    # either refuses it.
    assert manifest.format_version == 3
    assert manifest.rank_weights[0][0] == "rank1/weights.safetensors"
    assert {g.file for g in manifest.graphs} == {g.file for g in Manifest.read(tp1).graphs}
    want = greedy_compiled(tp1)
    assert run_ranks(2, compiled_rank_tokens, tp2) == want


def test_tp_artifact_refuses_another_world_size(artifacts):
    tp2 = artifacts.get("llama-gqa", tensor_parallel_size=2, **TP_PLAN)
    with pytest.raises(ArtifactError, match=r"split across 2 ranks .* but 1 process is loading "
                                            r"it: load it through LLM\(...\) or `aotllm serve`"):
        greedy_compiled(tp2)
    from aotllm.graphs.manifest import check_world_size

    with pytest.raises(ArtifactError, match="but 3 ranks are loading it.*--tensor-parallel-size 3"):
        check_world_size(Manifest.read(tp2), 3)
    with pytest.raises(ArtifactError, match="compiled for one process"):
        check_world_size(Manifest.read(artifacts.get("llama-gqa", **TP_PLAN)), 2)


def _llm(mode: str, model, timeout: float = 300, group_timeout: float = 30,
         torchrun: bool = False, **kwargs) -> dict:
    """tests/tp_llm_script.py in a fresh interpreter (spawned ranks start from
    a user's program, not from pytest's process), or in 2 ranks under torchrun."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "AOTLLM_TP_TIMEOUT_S": str(group_timeout),
           "PYTHONPATH": os.pathsep.join([str(repo.parent), str(repo)])}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
                if torchrun else [sys.executable])
    proc = subprocess.run([*launcher, str(repo / "tests" / "tp_llm_script.py"), mode,
                           str(model), json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=repo)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and len(lines) == 1, proc.stderr[-3000:]
    return json.loads(lines[0].removeprefix("RESULT "))


def test_llm_eager_starts_one_process_per_rank(tiny_models):
    """`LLM(checkpoint, tensor_parallel_size=2, enforce_eager=True)`: rank 0
    schedules and samples, rank 1 is a spawned worker fed each step's inputs
    and reading only its slices; greedy tokens equal TP=1's (chunked prefill:
    a 16-token budget; batched decode: 4 prompts)."""
    ckpt = tiny_models.get("llama-gqa")
    eager1 = _llm("generate", ckpt, enforce_eager=True, dtype="float32")
    eager2 = _llm("generate", ckpt, enforce_eager=True, dtype="float32", tensor_parallel_size=2)
    assert (eager1["workers"], eager2["workers"]) == (0, 1)
    assert eager2["tokens"] == eager1["tokens"]


def test_llm_eager_quantized_tp2_equals_tp1(tiny_models):
    """Eager W8A16 under TP=2: each rank quantizes the whole model and keeps
    its part (scales with their weights), so its tokens are TP=1 W8A16's."""
    ckpt = tiny_models.get("qwen2-tied")
    common = dict(enforce_eager=True, dtype="float32", quantization="w8a16")
    want = _llm("generate", ckpt, **common)
    got = _llm("generate", ckpt, tensor_parallel_size=2, **common)
    assert got["workers"] == 1 and got["tokens"] == want["tokens"]


def test_llm_compiled_starts_one_process_per_rank(artifacts):
    """`LLM(tp2_artifact)` starts rank 1 itself; the graphs' all-reduces run on
    the default group, the step inputs on a second one. Rank 0 keeps its
    share of the cores. 90 tokens per prompt: about 100 steps, where the GIL
    deadlock of gloo's worker thread showed (see CompiledExecutor). An idle
    spell longer than the group timeout does not end the group: the workers
    wait for work without a timeout."""
    import os

    tp1 = artifacts.get("llama-gqa", **TP_PLAN)
    tp2 = artifacts.get("llama-gqa", tensor_parallel_size=2, **TP_PLAN)
    want = _llm("generate", tp1, max_tokens=90)
    got = _llm("idle", tp2, group_timeout=8, max_tokens=90)
    assert (want["workers"], got["workers"]) == (0, 1)
    assert got["tokens"] == got["again"] == want["tokens"]
    assert got["threads"][1] == max(1, (os.cpu_count() or 1) // 2)


def test_torchrun_ranks_serve_rank0s_engine(artifacts):
    """Ranks launched by torchrun: every rank's program creates `LLM`; rank 0's
    is the engine, rank 1's serves rank 0's steps and then ends the process, so
    only rank 0 prints a result."""
    tp1 = artifacts.get("llama-gqa", **TP_PLAN)
    tp2 = artifacts.get("llama-gqa", tensor_parallel_size=2, **TP_PLAN)
    got = _llm("generate", tp2, torchrun=True)
    assert got["workers"] == 0 and got["tokens"] == _llm("generate", tp1)["tokens"]


def test_a_dead_rank_is_an_error_within_seconds(tiny_models):
    got = _llm("kill", tiny_models.get("llama-gqa"), enforce_eager=True, dtype="float32",
               tensor_parallel_size=2)
    assert got["error"] is not None and got["error"].startswith(
        "tensor-parallel group failed: aotllm-tp-rank1 exited with code -9"), got["error"]
    assert got["seconds"] < 10


def test_another_tensor_parallel_size_is_refused(artifacts):
    from aotllm import LLM

    tp2 = artifacts.get("llama-gqa", tensor_parallel_size=2, **TP_PLAN)
    with pytest.raises(ArtifactError, match=r"tensor_parallel_size=3 but this artifact is split "
                                            r"across 2 ranks: leave tensor_parallel_size out"):
        LLM(str(tp2), tensor_parallel_size=3)


def test_serve_tp_artifact_with_openai_client(artifacts, tmp_path):
    """`aotllm serve TP2_ARTIFACT` starts its rank itself; the official client's
    greedy completion equals the TP=1 artifact's through LLM."""
    import openai

    from aotllm import LLM, SamplingParams
    from tests.test_server import Server

    tp1 = artifacts.get("llama-gqa", **TP_PLAN)
    tp2 = artifacts.get("llama-gqa", tensor_parallel_size=2, **TP_PLAN)
    prompt = [5, 9, 17, 33, 65]
    want = LLM(str(tp1)).generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    srv = Server(tp2, tmp_path / "serve.log", cli=True, engine_flags=())
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none")
        got = client.completions.create(model=str(tp2), prompt=prompt, max_tokens=8,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert got.choices[0].text == want[0].outputs[0].text
        assert got.usage.completion_tokens == 8
        assert "Starting 1 tensor-parallel worker processes" in srv.tail()
    finally:
        assert srv.stop() == 0, srv.tail()
