"""The model-spec seam: loader errors, shard-not-shape weight loading, Mixtral's
decode traffic, and compiled == eager for one config per family."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from aotllm.models.loader import load_model
from aotllm.models.registry import SUPPORTED
from tests.test_compiled import _paged_inputs


def _logits(model, ids: list[int]) -> torch.Tensor:
    """All-at-once prefill through the graph signature (block size 16)."""
    t = len(ids)
    blocks = list(range(1, (t + 15) // 16 + 1))
    inputs = _paged_inputs([(ids, 0, blocks)], _Bucket(1, t, len(blocks)))
    c = model.config
    kv = [torch.zeros(2, len(blocks) + 1, 16, c.num_kv_heads, c.head_dim) for _ in range(c.num_layers)]
    with torch.inference_mode():
        return model(*inputs, kv)[0]


class _Bucket:
    def __init__(self, batch: int, tokens: int, context_blocks: int):
        self.batch, self.tokens, self.context_blocks = batch, tokens, context_blocks


def test_qkv_and_gate_up_of_equal_size_load_into_their_own_shards(tiny_models):
    # q + 2 * kv = 64 + 2 * 32 = 128 = 2 * intermediate: a shape cannot tell
    # qkv_proj from gate_up_proj; the shards' names do.
    path = tiny_models.get("llama", intermediate_size=64)
    model = load_model(path, "float32")
    c = model.config
    assert c.num_heads * c.head_dim + 2 * c.num_kv_heads * c.head_dim == 2 * c.intermediate_size
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(5, 25))
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0, -1]
    assert (_logits(model, ids) - want).abs().max().item() < 1e-4


def _rewrite(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("variant", ["llama-gqa", "internlm2-gqa-bias", "mixtral-top2"])
def test_missing_or_extra_tensor_is_named(tiny_models, tmp_path, variant):
    src = tiny_models.get(variant)
    names = sorted(load_file(str(src / "model.safetensors")))
    victim = next(n for n in names if "layers.1." in n and "w2" in n or "qkv" in n
                  or "k_proj" in n)
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop(victim))
    with pytest.raises(ValueError, match=f"missing 1 weight tensor.*{victim}"):
        load_model(missing, "float32")
    extra = _rewrite(src, tmp_path / "extra",
                     lambda t: t.update({"model.layers.0.surprise.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match="'model.layers.0.surprise.weight'.*does not belong"):
        load_model(extra, "float32")


def test_unsupported_architecture_names_the_supported_ones(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models.get("llama-gqa"), tmp_path / "gpt2")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        load_model(path, "float32")
    for arch in SUPPORTED:
        assert arch in str(e.value)


def test_falcon_alibi_is_refused(tiny_models, tmp_path):
    path = shutil.copytree(tiny_models.get("falcon-mqa"), tmp_path / "alibi")
    config = json.loads((path / "config.json").read_text())
    config["alibi"] = True
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ALiBi.*not supported"):
        load_model(path, "float32")


def test_remote_code_tokenizer_without_tokenizer_json_says_so(tiny_models, tmp_path):
    from aotllm.models.checkpoint import hf_tokenizer

    path = shutil.copytree(tiny_models.get("chatglm-mqa-bias"), tmp_path / "glm")
    assert hf_tokenizer(path).encode("hello") == hf_tokenizer(
        tiny_models.reference("chatglm-mqa-bias")).encode("hello")
    (path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="remote code.*ChatGLMTokenizer.*no tokenizer.json"):
        hf_tokenizer(path)


# --- Mixtral: what a decode step reads -------------------------------------

def _decode_bytes_read(model) -> dict[str, int]:
    """Bytes of weights the exported batch-1 decode graph reads, counted while
    it runs: an index into a weight (embedding rows, gathered experts) reads
    what it returns; any other op reads its weight inputs whole."""
    from torch.utils._python_dispatch import TorchDispatchMode

    inputs = _paged_inputs([([7], 20, [1, 2])], _Bucket(1, 1, 2))
    c = model.config
    kv = [torch.zeros(2, 4, 16, c.num_kv_heads, c.head_dim) for _ in range(c.num_layers)]
    program = torch.export.export(model, (*inputs, kv), strict=False).module()
    weights = {p.untyped_storage().data_ptr(): name
               for name, p in [*program.named_parameters(), *program.named_buffers()]}
    counts = {"experts": 0, "other": 0}
    gathers = {torch.ops.aten.index.Tensor, torch.ops.aten.embedding.default,
               torch.ops.aten.index_select.default}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func._schema.is_mutable or any(r.alias_info for r in func._schema.returns):
                return out  # views and in-place writes read nothing new
            for a in args:
                if isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() in weights:
                    name = weights[a.untyped_storage().data_ptr()]
                    n = out.nbytes if func in gathers else a.nbytes
                    counts["experts" if "experts" in name else "other"] += n
            return out

    with torch.inference_mode(), Count():
        program(*inputs, kv)
    return counts


def test_mixtral_decode_reads_top_k_experts_not_all(tiny_models, capsys):
    """Bytes read at batch 1 scale with top-k, not with the number of experts."""
    read = {}
    for experts, top_k in ((4, 2), (8, 2), (8, 1)):
        path = tiny_models.get("mixtral", num_local_experts=experts, num_experts_per_tok=top_k)
        model = load_model(path, "float32")
        per_expert = (model.model.layers[0].mlp.experts.gate_up[0].nbytes
                      + model.model.layers[0].mlp.experts.down[0].nbytes) * model.config.num_layers
        read[experts, top_k] = (_decode_bytes_read(model), per_expert)
    (r42, e), (r82, _), (r81, _) = read[4, 2], read[8, 2], read[8, 1]
    assert r42["experts"] == r82["experts"] == 2 * e  # doubling the experts: same traffic
    assert r81["experts"] == e
    # Outside the experts only the router grows (one row of H floats per expert).
    assert r82["other"] - r42["other"] == 4 * 64 * 4 * 2
    dense = r82["other"] + 8 * e  # the same model reading every expert
    with capsys.disabled():
        print(f"\nMixtral tiny (8 experts, top-2) decode, batch 1: {r82['experts'] + r82['other']:,} "
              f"bytes of weights per token ({r82['experts']:,} expert bytes); reading all 8 "
              f"experts would be {dense:,}")


# --- compiled == eager, every bucket of one config per family --------------

FAMILY_PLAN = dict(max_model_len=64, max_num_seqs=2, block_size=16, prefill_buckets=(32,),
                   decode_batch_sizes=(2,), context_buckets=(64,))
# One decoder layer: a family's layer code is all there, at half the compile time.
ONE_LAYER = {"num_hidden_layers": 1}
COMPILED_VARIANTS = ["qwen3-gqa", "glm4-mqa-tied", "chatglm-mqa-bias", "internlm2-mqa-dynamic",
                     "falcon-newarch-bias-tied", "mixtral-top2", "qwen2-moe-shared",
                     "qwen3-moe-norm-topk"]


def _rows_for(bucket, vocab: int) -> list[tuple[list[int], int, list[int]]]:
    g = torch.Generator().manual_seed(bucket.batch * 100 + bucket.tokens)

    def toks(n: int) -> list[int]:
        return torch.randint(5, vocab, (n,), generator=g).tolist()

    if bucket.phase == "prefill":  # a second chunk of 20 tokens after 30 cached ones
        return [(toks(20), 30, [3, 5, 6, 7])]
    # Decode rows with one padding row where the batch allows it; the last row
    # runs past 40 tokens, where internlm2-mqa-dynamic's dynamic rope scales.
    n = max(1, bucket.batch - 1)
    return [(toks(1), 9 + 17 * i, [1 + 4 * i, 2 + 4 * i, 3 + 4 * i, 4 + 4 * i])
            for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("variant", COMPILED_VARIANTS)
def test_compiled_family_matches_eager_on_every_bucket(variant, artifacts, tiny_models):
    art = artifacts.get(variant, "float32", model_kwargs=ONE_LAYER, **FAMILY_PLAN)
    check_family_artifact(art, variant, tiny_models)


def check_family_artifact(art, variant: str, tiny_models) -> None:
    """Every bucket's logits within 1e-4 of the eager model's (a prefill chunk
    after cached tokens, decode rows beside a padding row), and the artifact's
    greedy tokens == the eager engine's. Any backend's artifact of FAMILY_PLAN."""
    from aotllm import LLM, SamplingParams

    compiled = LLM(str(art))
    executor = compiled.llm_engine.runner.executor
    spec = compiled.llm_engine.runner.kv_spec
    model = load_model(tiny_models.get(variant, **ONE_LAYER), "float32")
    vocab = model.config.vocab_size
    assert set(executor.graphs) == set(executor.plan.buckets)
    for bucket in executor.plan.buckets:
        rows = _rows_for(bucket, vocab)
        inputs = _paged_inputs(rows, bucket)
        torch.manual_seed(0)
        kv = [torch.randn(spec.layer_shape(20)) for _ in range(spec.num_layers)]
        kv_graph, kv_eager = [k.clone() for k in kv], [k.clone() for k in kv]
        got = executor.graphs[bucket]([*inputs, *kv_graph])[0]
        with torch.inference_mode():
            want = model(*inputs, kv_eager)
        diff = (got[: len(rows)] - want[: len(rows)]).abs().max().item()
        assert diff < 1e-4, f"{variant} {bucket.name}: max abs logit difference {diff}"
    # And end to end: greedy tokens of the artifact == the eager engine's.
    eager = LLM(str(tiny_models.get(variant, **ONE_LAYER)), dtype="float32", enforce_eager=True,
                block_size=16, max_model_len=64, max_num_seqs=2)
    g = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(5, vocab, (n,), generator=g).tolist()}
               for n in (3, 30, 17)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outs = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            for llm in (compiled, eager)]
    assert outs[0] == outs[1]
