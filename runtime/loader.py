"""Builds an LLMEngine from EngineArgs: an eager model from a Hugging Face
checkpoint, or (issue: compiled artifacts) a directory of bucket graphs."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.runtime.config import CacheConfig, SchedulerConfig
from aotllm.runtime.engine import LLMEngine
from aotllm.runtime.engine_args import EngineArgs
from aotllm.runtime.kv_budget import determine_num_blocks
from aotllm.runtime.model_runner import EagerExecutor, ModelRunner
from aotllm.runtime.sampler import Sampler
from aotllm.runtime.scheduler import Scheduler
from aotllm.runtime.tokenizer import eos_token_ids, load_tokenizer

logger = logging.getLogger(__name__)


def resolve_max_model_len(requested: int | None, max_position_embeddings: int) -> int:
    if requested is None:
        return max_position_embeddings
    if requested > max_position_embeddings:
        raise ValueError(
            f"User-specified max_model_len ({requested}) is greater than the derived "
            f"max_model_len (max_position_embeddings={max_position_embeddings} in the "
            "model's config.json). Decrease max_model_len."
        )
    if requested <= 0:
        raise ValueError(f"max_model_len must be positive, got {requested}")
    return requested


def build_engine(args: EngineArgs) -> LLMEngine:
    model_dir = Path(args.model)
    if not model_dir.is_dir():
        raise ValueError(
            f"model {args.model!r} is not a local directory. aotllm loads local Hugging Face "
            "checkpoints or aotllm artifact directories (no hub downloads)."
        )
    return _build_eager_engine(args)


def _build_eager_engine(args: EngineArgs) -> LLMEngine:
    from aotllm.models.loader import load_model

    device = args.resolve_device()
    t0 = time.perf_counter()
    model = load_model(args.model, args.dtype, device)
    config = model.config
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "Loaded %s (%.1fM parameters, %s) in %.2f s",
        config.architecture, sum(p.numel() for p in model.parameters()) / 1e6,
        str(model.dtype).removeprefix("torch."), time.perf_counter() - t0,
    )
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    max_model_len = resolve_max_model_len(args.max_model_len, config.max_position_embeddings)
    sched_config = SchedulerConfig(
        max_model_len=max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
    )
    cache_config = CacheConfig(
        block_size=args.block_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_gpu_blocks_override=args.num_gpu_blocks_override,
    )
    kv_spec = KVCacheSpec(
        num_layers=config.num_layers,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        block_size=args.block_size,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    num_blocks = determine_num_blocks(cache_config, sched_config, kv_spec, device, weights_bytes)
    eos = eos_token_ids(args.model, config.hf_config, tokenizer)
    runner = ModelRunner(
        EagerExecutor(model, device), kv_spec, num_blocks, Sampler(eos), model.dtype, args.seed
    )
    scheduler = Scheduler(sched_config, args.block_size, num_blocks)
    return LLMEngine(runner, scheduler, tokenizer, eos, max_model_len, config.vocab_size)
