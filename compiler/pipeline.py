"""`aotllm compile`: a checkpoint (HF directory or GGUF file) -> an artifact directory.

    artifact/
      manifest.json          format version, model config, dtype, backend, device,
                             torch version, KV layout, bucket table (file + sha256)
      weights file           the weights, once (backend.write_weights; Inductor:
                             weights.safetensors under the graphs' constant names)
      graphs/<bucket>.*      one graph per bucket (backend.compile_bucket), no weights inside;
                             a backend may share one graph between buckets (graph_groups)
      tokenizer files, generation_config.json

Recompiling into an existing artifact reuses every graph whose reuse key (a
hash of the model config, dtype, bucket, KV layout, backend, device, torch
version and the compiler's own source) did not change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

import aotllm
from aotllm.compiler.backends import check_quantization, get_backend
from aotllm.compiler.config import CompileConfig
from aotllm.compiler.cpu_target import cpu_record
from aotllm.compiler.parallel import compile_graphs
from aotllm.compiler.tokenizer_snapshot import write_runtime_tokenizer
from aotllm.graphs.buckets import Bucket, plan_buckets
from aotllm.graphs.devices import DISTRIBUTED_BACKENDS, supported_device_type
from aotllm.graphs.file_digest import SampleTable, sample_file, safetensors_header_bytes
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import (
    GRAPHS_DIR,
    RUNTIME_TOKENIZER_FILE,
    ArtifactError,
    GraphEntry,
    Manifest,
    is_artifact_dir,
    sha256_file,
)
from aotllm.models.checkpoint import open_checkpoint
from aotllm.models.config import ModelConfig
from aotllm.models.int8_kernels import w8a8_kernel, w8a16_kernel
from aotllm.models.parallel import TensorParallel
from aotllm.quantize.load import load_quantized

logger = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(aotllm.__file__).resolve().parent
# Source whose changes alter the graphs a compile produces.
_GRAPH_SOURCES = ("models", "compiler", "graphs", "quantize")


def source_hash() -> str:
    h = hashlib.sha256(aotllm.__version__.encode())
    for sub in _GRAPH_SOURCES:
        # Not the kernel library's C++: graphs call it through the op schema
        # and C declaration in compact_linear.py, and each compile copies
        # the library afresh.
        for path in sorted((_PACKAGE_ROOT / sub).rglob("*.py")):
            h.update(str(path.relative_to(_PACKAGE_ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def bucket_key(common: dict, bucket: Bucket) -> str:
    payload = json.dumps({**common, "bucket": bucket.to_dict()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _kernels(quant: dict, buckets: list[Bucket], dtype: torch.dtype, device: torch.device,
             inductor: bool) -> dict[str, str]:
    """Which int8 kernel each bucket's decoder-layer linears use (decided by rows,
    dtype, device). A quantized LM head sees only the B last tokens, so at
    prefill it may take the small-M kernel where the body does not."""
    if quant["scheme"] != "w8a16":
        return {b.name: w8a8_kernel(b.batch * b.tokens, device, compiled=inductor)
                for b in buckets}
    grouped = quant["group_size"] is not None
    return {b.name: w8a16_kernel(b.batch * b.tokens, dtype, device, grouped, compiled=inductor)
            for b in buckets}


def _reusable(out: Path, common: dict) -> dict[str, GraphEntry]:
    """Graph entries of an existing artifact that can be kept, by reuse key."""
    if not is_artifact_dir(out):
        return {}
    try:
        old = Manifest.read(out)
    except ArtifactError as e:
        logger.warning("Not reusing the existing artifact in %s: %s", out, e)
        return {}
    keep = {}
    for entry in old.graphs:
        path = out / entry.file
        if path.is_file() and sha256_file(path) == entry.sha256:
            keep[entry.key] = entry
    return keep


def _file_samples(out: Path, weights_files: list[str], entries: list[GraphEntry],
                  other_files: list[str]) -> SampleTable:
    """Size and sampled digest of every file, for the cheap check at each load;
    the weights files' safetensors headers are hashed whole (they say where
    every tensor lies)."""
    files = {w: sample_file(out / w, safetensors_header_bytes(out / w)) for w in weights_files}
    for rel in dict.fromkeys([*(e.file for e in entries), *other_files]):
        files[rel] = sample_file(out / rel)
    return SampleTable(files)


def compile_artifact(cfg: CompileConfig) -> Manifest:
    t_start = time.perf_counter()
    source = open_checkpoint(cfg.model)
    out = Path(cfg.output)
    backend = get_backend(cfg)
    backend.check_available()
    # The device the model is loaded on for capture: the target device,
    # unless the backend says otherwise (GeBackend.load_device). The
    # manifest records the target device type either way.
    load_device = getattr(backend, "load_device", None)
    device = load_device() if load_device is not None else torch.device(cfg.device)
    device_type = supported_device_type(cfg.device)

    check_model = getattr(backend, "check_model", None)
    if check_model is not None:  # from config.json alone: before the weights load
        check_model(ModelConfig.from_hf_dict(source.raw_config()))
    # Checked before loading (fail fast), and after for a pre-quantized
    # msModelSlim checkpoint, whose scheme is known only once it is read.
    if cfg.quantization is not None:
        check_quantization(backend, cfg.quantization.scheme)
    model, quant = load_quantized(source, cfg.dtype, device, cfg.quantization,
                                  source.load_tokenizer, ops=backend.ops)
    if quant is not None:
        check_quantization(backend, quant["scheme"])
    tp_size = cfg.tensor_parallel_size
    rank_models = [model]
    if tp_size > 1:
        from aotllm.models.shard import shard_model

        # Every rank's model from the one full (quantized) model, then the
        # full one is dropped; rank 0's is traced, every rank binds its own
        # weights file to the same graphs.
        rank_models = [shard_model(model, TensorParallel(r, tp_size), quant)
                       for r in range(tp_size)]
        model = rank_models[0]
    config = model.config
    dtype_name = str(model.dtype).removeprefix("torch.")
    max_model_len = config.resolve_max_model_len(cfg.max_model_len)
    plan = plan_buckets(
        max_model_len, cfg.max_num_seqs, cfg.block_size,
        prefill_buckets=cfg.prefill_buckets,
        decode_batch_sizes=cfg.decode_batch_sizes,
        context_buckets=cfg.context_buckets,
        prefill_batch_sizes=cfg.prefill_batch_sizes,
    )
    # A rank's cache holds its KV heads only.
    spec = KVCacheSpec(config.num_layers, model.model.layers[0].self_attn.num_kv_heads,
                       config.head_dim, cfg.block_size, dtype_name)
    if quant is not None:
        quant["kernels"] = _kernels(quant, plan.buckets, model.dtype, device,
                                    backend.name == "inductor")
    cpu = (cpu_record(plan.buckets, model.dtype, backend.name == "inductor")
           if device_type == "cpu" else None)
    common = {
        "model_config": config.hf_config,
        "dtype": dtype_name,
        "kv_cache": spec.to_dict(),
        "backend": backend.name,
        "backend_version": backend.version(),
        "backend_traits": backend.traits().to_dict(),
        "device": device_type,
        "torch": torch.__version__,
        "source": source_hash(),
        "quantization": quant,
        "tensor_parallel_size": tp_size,
        # The CPU the kernel choices and generated code are for (not the
        # per-bucket choices: they follow from it and the bucket).
        "cpu": {k: v for k, v in (cpu or {}).items() if k != "linear_kernels"},
    }
    reusable = _reusable(out, common) if cfg.reuse else {}
    (out / GRAPHS_DIR).mkdir(parents=True, exist_ok=True)

    logger.info("Writing weights and tokenizer to %s", out)
    weights_file, aliases = backend.write_weights(model, out)
    rank_files = []
    for rank, rank_model in enumerate(rank_models[1:], 1):
        (out / f"rank{rank}").mkdir(exist_ok=True)
        name, _ = backend.write_weights(rank_model, out / f"rank{rank}")
        rank_files.append(f"rank{rank}/{name}")
    del rank_models[1:]
    # As HF tokenizer files (a GGUF's are rebuilt from its metadata), so the
    # runtime loads every artifact's tokenizer the same way.
    source.save_tokenizer(out)
    runtime_tokenizer = write_runtime_tokenizer(out)
    if runtime_tokenizer is None:  # a stale one from an earlier compile must not be used
        (out / RUNTIME_TOKENIZER_FILE).unlink(missing_ok=True)

    # Which graph serves which buckets: one each, unless the backend shares
    # a graph between buckets (GE with dimension gears); a shared graph is
    # one file that every bucket it serves names.
    grouping = getattr(backend, "graph_groups", None)
    groups = (grouping(plan.buckets, model=model, quant=quant) if grouping
              else [(b, (b,)) for b in plan.buckets])
    by_bucket: dict[Bucket, GraphEntry] = {}
    compile_seconds: list[float] = []
    todo: dict[Bucket, tuple[tuple[Bucket, ...], dict[Bucket, str], str]] = {}
    for graph_bucket, served in groups:
        # A shared graph's key names its bucket and everything it serves, so
        # a changed grouping recompiles.
        shared = {} if served == (graph_bucket,) else {
            "graph": graph_bucket.name, "serves": sorted(b.name for b in served)}
        keys = {b: bucket_key({**common, **shared}, b) for b in served}
        rel = f"{GRAPHS_DIR}/{graph_bucket.name}{backend.file_suffix}"
        kept = [reusable.get(keys[b]) for b in served]
        if all(e is not None and e.file == rel for e in kept):
            by_bucket.update(zip(served, kept))
        else:
            todo[graph_bucket] = (served, keys, rel)

    # Compiled under its final name in a scratch folder (a package records
    # its file name inside), then moved into place whole.
    scratch = out / GRAPHS_DIR / ".partial"
    scratch.mkdir(exist_ok=True)
    bar = tqdm(total=len(todo), desc="Compiling graphs", unit="graph", dynamic_ncols=True)

    def done(graph_bucket: Bucket, seconds: float) -> None:
        served, keys, rel = todo[graph_bucket]
        os.replace(scratch / f"{graph_bucket.name}{backend.file_suffix}", out / rel)
        compile_seconds.append(seconds)
        tqdm.write(f"compiled {graph_bucket.name} in {seconds:.1f} s")
        digest = sha256_file(out / rel)
        for b in served:
            by_bucket[b] = GraphEntry(b, rel, digest, seconds, keys[b])
        bar.update(1)

    support = getattr(backend, "support_files", None)
    kernel_files = support(out) if support is not None else ()
    workers = cfg.compile_workers if getattr(backend, "parallel_compile", False) else 1
    # A TP model's graphs are traced in forked workers with a fake process
    # group each (compiler/parallel.py says why).
    compile_graphs(backend, model, spec, list(todo), scratch, workers, done, tp_size)
    bar.close()
    entries = [by_bucket[b] for b in plan.buckets]

    shutil.rmtree(out / GRAPHS_DIR / ".partial", ignore_errors=True)
    wanted = {out / e.file for e in entries} | {out / weights_file}
    if not kernel_files:  # one left by an earlier compile for another device
        shutil.rmtree(out / "kernels", ignore_errors=True)
    for stale in (out / GRAPHS_DIR).iterdir():
        if stale not in wanted:
            stale.unlink()

    manifest = Manifest(
        model_config=config.hf_config,
        architecture=config.architecture,
        dtype=dtype_name,
        quantization=quant,
        backend=backend.name,
        backend_version=backend.version(),
        backend_traits=backend.traits(),
        device=device_type,
        torch_version=torch.__version__,
        kv_cache=spec.to_dict(),
        plan=plan.to_dict(),
        graphs=tuple(entries),
        weights_file=weights_file,
        weights_sha256=sha256_file(out / weights_file),
        file_samples=_file_samples(out, [weights_file, *rank_files], entries,
                                   [f for f, _ in kernel_files]),
        kernel_libraries=tuple(kernel_files),
        tensor_parallel_size=tp_size,
        distributed_backend=DISTRIBUTED_BACKENDS[device_type] if tp_size > 1 else None,
        rank_weights=tuple((f, sha256_file(out / f)) for f in rank_files),
        extra={"weight_aliases": aliases, "max_model_len": max_model_len,
               "vocab_size": config.vocab_size,
               "max_num_seqs": cfg.max_num_seqs, "source_hash": common["source"],
               **({"cpu": cpu} if cpu is not None else {}),
               **({"runtime_tokenizer": runtime_tokenizer} if runtime_tokenizer else {})},
    )
    manifest.write(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    logger.info(
        "Compiled %d graphs for %d buckets (%d graphs reused) in %.1f s total (%.1f s per "
        "compiled graph); artifact %s is %.1f MiB (weights %.1f MiB)",
        len(groups), len(entries), len(groups) - len(compile_seconds),
        time.perf_counter() - t_start,
        sum(compile_seconds) / max(len(compile_seconds), 1), out, size / (1 << 20),
        (out / weights_file).stat().st_size / (1 << 20),
    )
    return manifest
