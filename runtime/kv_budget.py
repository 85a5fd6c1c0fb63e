"""How many KV-cache blocks the serving host can afford (vLLM's start-up sizing)."""

from __future__ import annotations

import logging
import math

import psutil
import torch

from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.runtime.config import CacheConfig, SchedulerConfig
from aotllm.runtime.devices import mem_get_info

logger = logging.getLogger(__name__)

# Room kept for activations, sampler buffers and allocator slack.
_ACTIVATION_RESERVE_BYTES = 512 << 20


def memory_budget_bytes(device: torch.device, utilization: float, weights_bytes: int) -> int:
    """Bytes the KV cache may take: `utilization` of the device's memory, less
    what the weights and everything else already use.

    On CPU the "device memory" is what was available to this process when the
    engine started, i.e. what is available now plus the weights it has loaded.
    """
    info = mem_get_info(device)
    if info is not None:  # an accelerator (CUDA, NPU): its own memory
        free, total = info
        return int(utilization * total) - (total - free) - _ACTIVATION_RESERVE_BYTES
    available = psutil.virtual_memory().available
    return int(utilization * (available + weights_bytes)) - weights_bytes - _ACTIVATION_RESERVE_BYTES


def determine_num_blocks(
    cache_config: CacheConfig,
    sched_config: SchedulerConfig,
    kv_spec: KVCacheSpec,
    device: torch.device,
    weights_bytes: int,
) -> int:
    """Total blocks to allocate, the null block included."""
    per_seq = math.ceil(sched_config.max_model_len / kv_spec.block_size)
    if cache_config.num_gpu_blocks_override is not None:
        num_blocks = cache_config.num_gpu_blocks_override
    else:
        budget = memory_budget_bytes(device, cache_config.gpu_memory_utilization, weights_bytes)
        num_blocks = max(budget, 0) // kv_spec.bytes_per_block
        # More blocks than max_num_seqs full-length sequences can use would be
        # allocated (and zeroed) for nothing.
        useful = sched_config.max_num_seqs * per_seq + 1
        if num_blocks > useful:
            logger.info(
                "KV cache capped at %d blocks: enough for %d sequences of %d tokens "
                "(max_num_seqs x max_model_len)",
                useful, sched_config.max_num_seqs, sched_config.max_model_len,
            )
            num_blocks = useful
    if num_blocks - 1 < per_seq:
        raise ValueError(
            f"the KV cache has room for {(num_blocks - 1) * kv_spec.block_size} tokens "
            f"({num_blocks - 1} blocks of {kv_spec.block_size}), fewer than one sequence of "
            f"max_model_len={sched_config.max_model_len} needs. Increase "
            "gpu_memory_utilization or num_gpu_blocks_override, or decrease max_model_len."
        )
    kv_gib = num_blocks * kv_spec.bytes_per_block / (1 << 30)
    logger.info(
        "# %s blocks: %d, block size: %d (KV cache %.2f GiB, %d tokens)",
        device.type.upper(), num_blocks - 1, kv_spec.block_size, kv_gib,
        (num_blocks - 1) * kv_spec.block_size,
    )
    logger.info(
        "Maximum concurrency for %d tokens per request: %.2fx",
        sched_config.max_model_len, (num_blocks - 1) / per_seq,
    )
    return num_blocks
