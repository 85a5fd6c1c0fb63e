"""The compile cache behind `LLM(model=HF_DIR)`, graph reuse on recompile, and
weights stored once: graph files carry none, every loaded graph shares one copy.

One artifact, of a model with several MB of weights so that a weight copy
would show, is compiled here (through the cache) and serves every test.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from aotllm import LLM, SamplingParams
from aotllm.compiler.config import CompileConfig
from aotllm.compiler.inductor import InductorBackend
from aotllm.compiler.pipeline import compile_artifact
from aotllm.compiler.shape_groups import group_buckets
from aotllm.graphs.buckets import Bucket, plan_buckets
from aotllm.graphs.manifest import Manifest, is_artifact_dir
from aotllm.models.loader import load_model
from aotllm.runtime.artifact import load_artifact

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIGGER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4)
# What LLM passes to the compiler; the default bucket lists apply.
SERVE = dict(max_model_len=32, max_num_seqs=1, block_size=16)
PLAN = plan_buckets(SERVE["max_model_len"], SERVE["max_num_seqs"], SERVE["block_size"])


def _graph_groups(plan) -> dict[Bucket, tuple[Bucket, ...]]:
    """graph bucket -> the buckets it serves: Inductor's default shape groups
    (a float32 model: no kernel thresholds split them)."""
    return {g.graph_bucket: g.buckets for g in group_buckets(plan.buckets)}
PROMPTS = [{"prompt_token_ids": [5, 9, 200, 17, 33, 480, 7]},
           {"prompt_token_ids": list(range(40, 60))}]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@dataclass
class Spy:
    """Counts calls of the compiler entry points it is installed on."""

    artifacts: list = field(default_factory=list)
    buckets: list[Bucket] = field(default_factory=list)

    def install(self, mp: pytest.MonkeyPatch) -> "Spy":
        import aotllm.compiler.cache as cache

        compile_fn = cache.compile_artifact
        bucket_fn = InductorBackend.compile_bucket

        def compile_spy(cfg):
            self.artifacts.append(cfg)
            return compile_fn(cfg)

        def bucket_spy(backend, model, bucket, spec, out_path):
            self.buckets.append(bucket)
            return bucket_fn(backend, model, bucket, spec, out_path)

        mp.setattr(cache, "compile_artifact", compile_spy)
        mp.setattr(InductorBackend, "compile_bucket", bucket_spy)
        return self


def _greedy(llm: LLM, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@dataclass
class FirstStart:
    checkpoint: Path
    cache_dir: Path
    artifact: Path
    spy: Spy
    tokens: list[list[int]]


@pytest.fixture(scope="module")
def first(tiny_models, tmp_path_factory) -> FirstStart:
    checkpoint = tiny_models.get("llama-gqa", **BIGGER)
    cache_dir = tmp_path_factory.mktemp("aotllm-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AOTLLM_CACHE_DIR", str(cache_dir))
        spy = Spy().install(mp)
        llm = LLM(str(checkpoint), **SERVE)
    artifact = Path(llm.engine_args.model)
    return FirstStart(checkpoint, cache_dir, artifact, spy, _greedy(llm))


def test_default_plan_is_small():
    assert len(PLAN.buckets) <= 3


def test_first_start_compiles_every_bucket_into_the_cache(first):
    assert len(first.spy.artifacts) == 1
    # One graph per shape group, each compiled once, serving every bucket.
    assert sorted(first.spy.buckets, key=lambda b: b.name) == sorted(
        _graph_groups(PLAN), key=lambda b: b.name)
    assert len(first.spy.buckets) < len(PLAN.buckets)
    assert first.artifact.parent == first.cache_dir and is_artifact_dir(first.artifact)
    assert Manifest.read(first.artifact).bucket_plan() == PLAN


def test_second_start_compiles_nothing(first, monkeypatch):
    monkeypatch.setenv("AOTLLM_CACHE_DIR", str(first.cache_dir))
    spy = Spy().install(monkeypatch)
    llm = LLM(str(first.checkpoint), **SERVE)
    assert spy.artifacts == [] and spy.buckets == []
    assert Path(llm.engine_args.model) == first.artifact
    assert list(first.cache_dir.iterdir()) == [first.artifact]
    assert _greedy(llm) == first.tokens


def test_cached_artifact_generates_what_eager_does(first):
    eager = LLM(str(first.checkpoint), enforce_eager=True, dtype="float32", **SERVE)
    assert _greedy(eager) == first.tokens


def _compile_into(checkpoint: Path, out: Path, **overrides) -> list[Bucket]:
    """Recompiles into `out`; returns the buckets that were compiled (not reused)."""
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy().install(mp)
        compile_artifact(CompileConfig(model=str(checkpoint), output=str(out),
                                       **{**SERVE, **overrides}))
    return spy.buckets


def test_recompiling_the_same_config_reuses_every_graph(first, tmp_path):
    out = Path(shutil.copytree(first.artifact, tmp_path / "artifact"))
    before = Manifest.read(out).graphs
    assert _compile_into(first.checkpoint, out) == []
    after = Manifest.read(out).graphs
    assert [(g.bucket, g.sha256) for g in after] == [(g.bucket, g.sha256) for g in before]


def test_recompiling_with_another_decode_batch_compiles_only_that_bucket(first, tmp_path):
    out = Path(shutil.copytree(first.artifact, tmp_path / "artifact"))
    old = {g.bucket: g.sha256 for g in Manifest.read(out).graphs}
    compiled = _compile_into(first.checkpoint, out, max_num_seqs=2)
    new_plan = plan_buckets(SERVE["max_model_len"], 2, SERVE["block_size"])
    # Only the graphs of groups that are new or serve other buckets compile:
    # decode batch 2's (and batched prefill's, which a second sequence enables).
    old_groups = _graph_groups(PLAN)
    new_groups = _graph_groups(new_plan)
    changed = [b for b, served in new_groups.items() if old_groups.get(b) != served]
    assert sorted(compiled, key=lambda b: b.name) == sorted(changed, key=lambda b: b.name)
    assert Bucket("decode", 2, 1, 2) in compiled
    assert len(compiled) < len(new_groups)
    graphs = {g.bucket: g.sha256 for g in Manifest.read(out).graphs}
    assert set(graphs) == set(new_plan.buckets)
    assert all(graphs[b] == sha for b, sha in old.items())
    # The extended artifact serves two sequences at once, as the eager model does.
    eager = LLM(str(first.checkpoint), enforce_eager=True, dtype="float32",
                **{**SERVE, "max_num_seqs": 2})
    assert _greedy(LLM(str(out))) == _greedy(eager)


# -- weights stored once ------------------------------------------------------


def _weight_probes(weights: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """A 128-byte run from the middle of each sizeable tensor: random weights,
    so a file that holds the tensor holds these bytes, and no other file does."""
    probes = {}
    for name, t in weights.items():
        if t.numel() >= 1024:
            flat = t.reshape(-1)
            mid = flat.numel() // 2
            probes[name] = flat[mid : mid + 32].contiguous().numpy().tobytes()
    return probes


def test_graph_files_carry_no_weights(first):
    loaded = load_artifact(first.artifact, torch.device("cpu"))
    probes = _weight_probes(loaded.weights)
    assert len(probes) >= 4 * BIGGER["num_hidden_layers"]
    weights_size = (first.artifact / loaded.manifest.weights_file).stat().st_size
    for entry in loaded.manifest.graphs:
        path = first.artifact / entry.file
        # A graph file is compiled code (a ~2 MB shared library and its
        # sources), the same whatever the weights weigh: here a fraction of them.
        assert path.stat().st_size < weights_size / 4, entry.file
        with zipfile.ZipFile(path) as z:
            blobs = [z.read(info) for info in z.infolist()]
        inside = [name for name, probe in probes.items() if any(probe in b for b in blobs)]
        assert not inside, f"{entry.file} holds weights {inside[:3]}"


def _bucket_inputs(bucket: Bucket, block_size: int) -> list[torch.Tensor]:
    """One row of `bucket.tokens` real tokens (or `bucket.batch` decode rows),
    each in its own blocks after block 0, the null block."""
    b, t, maxb = bucket.batch, bucket.tokens, bucket.context_blocks
    g = torch.Generator().manual_seed(bucket.tokens * 10 + bucket.batch)
    ids = torch.randint(5, 500, (b, t), generator=g)
    start = 0 if bucket.phase == "prefill" else block_size - 3
    pos = torch.arange(start, start + t).expand(b, t).contiguous()
    tables = 1 + torch.arange(b * maxb).view(b, maxb)
    slots = (tables.gather(1, pos // block_size) * block_size + pos % block_size).view(-1)
    ctx = torch.full((b,), start + t)
    return [ids, pos, slots, tables, ctx, torch.full((b,), t)]


def test_every_graph_computes_with_the_one_shared_copy_of_the_weights(first):
    loaded = load_artifact(first.artifact, torch.device("cpu"))
    model = load_model(first.checkpoint, "float32")
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    spec = loaded.kv_spec
    # Change every weight in place, in the loaded dict and the eager model
    # alike: a graph that kept its own copy of any constant would still
    # compute with the old value and disagree with the eager model.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in loaded.weights.items():
            noise = 0.1 * torch.randn(w.shape, generator=g) * w.abs().mean()
            w.add_(noise)
            tensors[name].add_(noise)
    for bucket, graph in loaded.graphs.items():
        inputs = _bucket_inputs(bucket, spec.block_size)
        num_blocks = bucket.batch * bucket.context_blocks + 1
        torch.manual_seed(1)
        kv = [torch.randn(spec.layer_shape(num_blocks)) for _ in range(spec.num_layers)]
        got = graph([*inputs, *[k.clone() for k in kv]])[0]
        with torch.inference_mode():
            want = model(*inputs, [k.clone() for k in kv])
        diff = (got - want).abs().max().item()
        assert diff < 1e-4, f"{bucket.name}: max abs logit difference {diff}"


_RSS_SCRIPT = """
import gc, json, sys
import psutil, torch
from aotllm.runtime.artifact import load_artifact

proc = psutil.Process()
gc.collect()
before = proc.memory_info().rss
loaded = load_artifact(sys.argv[1], torch.device("cpu"))
gc.collect()
print(json.dumps({"growth": proc.memory_info().rss - before,
                  "weights": loaded.weights_bytes, "graphs": len(loaded.graphs)}))
"""


def test_loading_every_graph_holds_one_copy_of_the_weights(first):
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT, str(first.artifact)],
        capture_output=True, text=True, timeout=300, cwd=REPO.parent,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["graphs"] == len(PLAN.buckets) >= 3
    # One copy of the weights plus some code; a graph with its own copy would
    # add a whole weights' worth per graph.
    assert r["growth"] < 1.5 * r["weights"], r
