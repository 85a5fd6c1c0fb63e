"""Builds an LLMEngine from EngineArgs: an aotllm artifact directory (compiled
bucket graphs) or, eagerly, a checkpoint (Hugging Face directory or GGUF file).

Compiling a checkpoint is the compiler's job (see aotllm.llm); the runtime
only loads what it is given."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from aotllm.graphs.devices import device_type
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.graphs.manifest import ArtifactError, Manifest, is_artifact_dir
from aotllm.models.gguf_checkpoint import is_gguf_file
from aotllm.runtime.config import CacheConfig, SchedulerConfig
from aotllm.runtime.cpu_check import check_cpu
from aotllm.runtime.devices import is_available
from aotllm.runtime.engine import LLMEngine
from aotllm.runtime.engine_args import EngineArgs
from aotllm.runtime.generation_config import default_sampling_overrides, read_generation_config
from aotllm.runtime.kv_budget import determine_num_blocks
from aotllm.runtime.model_runner import EagerExecutor, ModelRunner
from aotllm.runtime.sampler import Sampler
from aotllm.runtime.scheduler import Scheduler
from aotllm.runtime.tokenizer import eos_token_ids, load_tokenizer
from aotllm.runtime.tp_workers import (
    BroadcastExecutor,
    WorkerGroup,
    eager_kv_spec,
    follow_launched,
    launched_rank,
)

logger = logging.getLogger(__name__)

# vLLM's dtype spellings that name the same torch dtype.
DTYPE_ALIASES = {"float": "float32", "half": "float16"}


def build_engine(args: EngineArgs) -> LLMEngine:
    model_dir = Path(args.model)
    if not (model_dir.is_dir() or is_gguf_file(model_dir)):
        raise ValueError(
            f"model {args.model!r} is not a local directory or GGUF file. aotllm loads local "
            "Hugging Face checkpoints, .gguf files or aotllm artifact directories (no hub "
            "downloads)."
        )
    if is_artifact_dir(model_dir):
        return _build_compiled_engine(args)
    return _build_eager_engine(args)


def _finish_engine(args, executor, kv_spec, max_model_len, max_num_seqs, token_budget,
                   weights_bytes, hf_config, vocab_size, tokenizer_dir, kv_dtype, tokenizer,
                   generation_config=None) -> LLMEngine:
    """The parts shared by the eager and the compiled engine."""
    device = executor.device
    sched_config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=token_budget,
    )
    cache_config = CacheConfig(
        block_size=kv_spec.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
    )
    num_blocks = determine_num_blocks(cache_config, sched_config, kv_spec, device, weights_bytes)
    if hasattr(executor, "start"):  # tensor parallel: every rank allocates as many blocks
        executor.start(num_blocks)
    model_generation_config = read_generation_config(tokenizer_dir, "auto", generation_config)
    eos = eos_token_ids(tokenizer_dir, hf_config, tokenizer, model_generation_config)
    if args.generation_config != "auto":
        model_generation_config = read_generation_config(args.model, args.generation_config)
    runner = ModelRunner(executor, kv_spec, num_blocks, Sampler(eos), kv_dtype, args.seed)
    scheduler = Scheduler(sched_config, kv_spec.block_size, num_blocks,
                          enable_prefix_caching=args.enable_prefix_caching)
    return LLMEngine(runner, scheduler, tokenizer, eos, max_model_len, vocab_size,
                     default_sampling_overrides(model_generation_config))


def _vocab_size(manifest: Manifest) -> int:
    """The logits' width. Recorded by the compiler as the model's family read it
    (remote-code configs spell it their own way, e.g. ChatGLM's
    padded_vocab_size); older artifacts are Llama-shaped configs."""
    recorded = manifest.extra.get("vocab_size")
    return int(recorded if recorded is not None else manifest.model_config["vocab_size"])


def _build_compiled_engine(args: EngineArgs) -> LLMEngine:
    from aotllm.runtime.artifact import CompiledExecutor, load_artifact

    manifest = Manifest.read(args.model)
    check_cpu(manifest)
    tp = manifest.tensor_parallel_size
    if args.tensor_parallel_size not in (1, tp):
        raise ArtifactError(
            f"tensor_parallel_size={args.tensor_parallel_size} but this artifact is split across "
            f"{tp} rank{'s' if tp > 1 else ''}: leave tensor_parallel_size out (the artifact's "
            f"size is used), or recompile the model with `aotllm compile ... "
            f"--tensor-parallel-size {args.tensor_parallel_size}`")
    if args.device != "auto":
        device = args.resolve_device()
    elif not is_available(device_type(manifest.device)):
        raise ArtifactError(
            f"this artifact was compiled for {manifest.device!r} but this host has no such "
            f"device: serve it on a {manifest.device} host, or recompile it with "
            "`aotllm compile ... --device cpu`"
        )
    else:
        device = torch.device(manifest.device)
    dtype_name = DTYPE_ALIASES.get(args.dtype, args.dtype)
    if dtype_name not in ("auto", manifest.dtype):
        raise ValueError(
            f"the artifact was compiled for dtype {manifest.dtype}; pass dtype='auto' or "
            f"'{manifest.dtype}', or recompile with --dtype {args.dtype}"
        )
    built = (manifest.quantization or {}).get("scheme")
    if args.quantization not in (None, built):
        raise ValueError(
            f"the artifact was compiled with quantization={built}; pass quantization=None "
            f"or {built!r}, or recompile it with --quantization {args.quantization}"
        )
    spec = manifest.kv_cache_spec()
    if args.block_size not in (spec.block_size, EngineArgs.block_size):
        raise ValueError(
            f"the artifact was compiled with block_size {spec.block_size}; recompile with "
            f"--block-size {args.block_size} to change it"
        )
    # The tokenizer (mostly importing transformers) loads in a thread while
    # the artifact loads; the digests and the graph packages' loading release
    # the GIL.
    # A TP artifact starts its other ranks first (they load while rank 0 does).
    group = None
    if tp > 1:
        rank = launched_rank(tp, device)
        if rank:  # a torchrun rank other than 0: it serves rank 0's steps, then exits
            artifact = load_artifact(args.model, device)
            follow_launched(CompiledExecutor(artifact, device), artifact.kv_spec,
                            getattr(torch, manifest.dtype), device)
        group = (WorkerGroup.attach() if rank == 0 else
                 WorkerGroup.start(args.model, True, args.dtype, device, tp, spec.block_size))
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            tokenizer_future = pool.submit(load_tokenizer, args.tokenizer or args.model)
            artifact = load_artifact(args.model, device)
            tokenizer = tokenizer_future.result()
    except BaseException:
        if group is not None:
            group.close(graceful=False)
        raise
    plan = artifact.plan
    max_model_len = plan.max_model_len
    if args.max_model_len is not None:
        if args.max_model_len > plan.max_model_len:
            raise ValueError(
                f"max_model_len={args.max_model_len} exceeds the artifact's "
                f"{plan.max_model_len}; recompile with --max-model-len {args.max_model_len}"
            )
        max_model_len = args.max_model_len
    max_num_seqs = min(args.max_num_seqs, plan.max_decode_batch)
    if max_num_seqs < args.max_num_seqs:
        logger.info("max_num_seqs capped at %d, the largest decode bucket of the artifact",
                    max_num_seqs)
    # Every prefill chunk must fit the largest prefill graph.
    budget = min(args.max_num_batched_tokens or plan.max_prefill_tokens, plan.max_prefill_tokens)
    dtype = getattr(torch, manifest.dtype)
    fixed = manifest.backend_traits.num_blocks
    if fixed is not None:
        if args.num_gpu_blocks_override not in (None, fixed):
            raise ValueError(
                f"the artifact's {manifest.backend} graphs were built for exactly {fixed} KV "
                f"blocks; drop num_gpu_blocks_override={args.num_gpu_blocks_override} or "
                "recompile with --num-gpu-blocks-override to change it"
            )
        args = dataclasses.replace(args, num_gpu_blocks_override=fixed)
    executor = CompiledExecutor(artifact, device)
    if group is not None:
        executor = BroadcastExecutor(executor, group)
    return _finish_engine(args, executor, spec, max_model_len,
                          max_num_seqs, budget, artifact.weights_bytes, manifest.model_config,
                          _vocab_size(manifest),
                          args.model, dtype, tokenizer)


def _build_eager_engine(args: EngineArgs) -> LLMEngine:
    from aotllm.models.checkpoint import open_checkpoint
    from aotllm.quantize.config import QuantConfig
    from aotllm.quantize.load import load_quantized

    device = args.resolve_device()
    source = open_checkpoint(args.model)
    t0 = time.perf_counter()
    quant = QuantConfig(args.quantization) if args.quantization else None
    tp = args.tensor_parallel_size
    if tp > 1:
        return _build_eager_tp_engine(args, source, device)
    # Loaded after the model (whose config check names an unsupported
    # architecture first) unless calibration needs it sooner.
    get_tokenizer = functools.cache(
        lambda: load_tokenizer(args.tokenizer) if args.tokenizer else source.load_tokenizer())
    model, record = load_quantized(source, args.dtype, device, quant, get_tokenizer)
    tokenizer = get_tokenizer()
    config = model.config
    tensors = [*model.parameters(), *model.buffers()]
    weights_bytes = sum(t.numel() * t.element_size() for t in tensors)
    logger.info(
        "Loaded %s (%.1fM parameters, %s%s) in %.2f s",
        config.architecture, config.num_params / 1e6, str(model.dtype).removeprefix("torch."),
        f", {record['scheme']}" if record else "", time.perf_counter() - t0,
    )
    kv_spec = KVCacheSpec(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        block_size=args.block_size,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    return _finish_engine(args, EagerExecutor(model, device), kv_spec,
                          config.resolve_max_model_len(args.max_model_len), args.max_num_seqs,
                          args.max_num_batched_tokens, weights_bytes, config.hf_config,
                          config.vocab_size,
                          args.model, model.dtype, tokenizer, source.generation_config())


def _build_eager_tp_engine(args: EngineArgs, source, device: torch.device) -> LLMEngine:
    """Eager tensor parallelism: every rank reads only its slices of the
    checkpoint (with a quantization scheme, every rank quantizes the whole
    model and keeps its part, as the compiler does once)."""
    from aotllm.models.parallel import TensorParallel
    from aotllm.runtime.tp_workers import load_eager_rank

    size = args.tensor_parallel_size
    rank = launched_rank(size, device)
    if rank:  # a torchrun rank other than 0: it serves rank 0's steps, then exits
        model = load_eager_rank(source, args.dtype, device, TensorParallel(rank, size),
                                args.quantization)
        follow_launched(EagerExecutor(model, device), eager_kv_spec(model, args.block_size),
                        model.dtype, device)
    group = (WorkerGroup.attach() if rank == 0 else
             WorkerGroup.start(args.model, False, args.dtype, device, size, args.block_size,
                               args.quantization))
    try:
        model = load_eager_rank(source, args.dtype, device, TensorParallel(0, size),
                                args.quantization)
    except BaseException:
        group.close(graceful=False)
        raise
    tensors = [*model.parameters(), *model.buffers()]
    weights_bytes = sum(t.numel() * t.element_size() for t in tensors)
    config = model.config
    return _finish_engine(args, BroadcastExecutor(EagerExecutor(model, device), group),
                          eager_kv_spec(model, args.block_size),
                          config.resolve_max_model_len(args.max_model_len), args.max_num_seqs,
                          args.max_num_batched_tokens, weights_bytes, config.hf_config,
                          config.vocab_size, args.model, model.dtype,
                          load_tokenizer(args.tokenizer) if args.tokenizer
                          else source.load_tokenizer(), source.generation_config())
