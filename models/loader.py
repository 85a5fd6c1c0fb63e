"""Weight loading from a checkpoint source (models/checkpoint.py): a safetensors
directory (single file or sharded) or a GGUF file.

The source yields one tensor at a time (memory-mapped safetensors, or one
dequantized GGUF tensor), which is copied into the model's (uninitialised)
parameters, so at most one checkpoint tensor is held beside the model: the
process never holds a second copy of the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from aotllm.models.checkpoint import CheckpointSource, open_checkpoint
from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.ops import TorchOps

logger = logging.getLogger(__name__)

# checkpoint projection -> (fused parameter, index of its slice)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """vLLM's `dtype`: "auto" takes the checkpoint's dtype (float32 if it names none)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use float32, float16 or bfloat16")
        return dtype
    if dtype == "auto":
        name = config.hf_config.get("dtype") or config.hf_config.get("torch_dtype") or "float32"
        return DTYPES.get(str(name).removeprefix("torch."), torch.float32)
    if dtype not in DTYPES:
        raise ValueError(
            f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(DTYPES))}"
        )
    return DTYPES[dtype]


def _target(model: CausalLM, name: str) -> tuple[str, int | None]:
    """The parameter a checkpoint tensor goes into, and its fused slice index."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _FUSED:
            fused, shard = _FUSED[part]
            parts[i] = fused
            return ".".join(parts), shard
    return name, None


def _fused_slice(model: CausalLM, param: torch.Tensor, shard: int) -> torch.Tensor:
    c = model.config
    if param.shape[0] == 2 * c.intermediate_size:  # gate_up_proj
        sizes = [c.intermediate_size, c.intermediate_size]
    else:  # qkv_proj
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        sizes = [q, kv, kv]
    start = sum(sizes[:shard])
    return param.narrow(0, start, sizes[shard])


def _slices_needed(param_name: str) -> set[int | None]:
    for fused, n in (("qkv_proj", 3), ("gate_up_proj", 2)):
        if f".{fused}." in param_name:
            return set(range(n))
    return {None}


def _checkpoint_name(param_name: str, shard: int | None) -> str:
    """The checkpoint's name for a parameter (or one slice of a fused one)."""
    for piece, (fused, index) in _FUSED.items():
        if shard == index and f".{fused}." in param_name:
            return param_name.replace(fused, piece)
    return param_name


def load_weights(model: CausalLM, checkpoint: str | Path | CheckpointSource,
                 tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
    """Fill every parameter from the checkpoint's tensors (or from `tensors`, a
    subset of them another reader chose, e.g. the float ones of a quantized
    checkpoint); a missing or foreign tensor is an error naming it."""
    source = open_checkpoint(checkpoint)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    # Which slices of each parameter were written (None: the whole of it).
    written: dict[str, set[int | None]] = {}
    for name, src in source.tensors() if tensors is None else tensors:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        param_name, shard = _target(model, name)
        if param_name not in expected:
            raise ValueError(
                f"checkpoint tensor {name!r} ({source.describe()}) does not belong to a "
                f"{model.config.architecture}; are its config and weights from the same checkpoint?"
            )
        param = model.get_parameter(param_name)
        dst = param if shard is None else _fused_slice(model, param, shard)
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {tuple(src.shape)} but the "
                f"model built from the checkpoint's config expects {tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(src)
        written.setdefault(param_name, set()).add(shard)
    missing = sorted(
        _checkpoint_name(n, shard)
        for n in expected
        for shard in _slices_needed(n) - written.get(n, set())
    )
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"{source.describe()} is missing {len(missing)} weight tensor(s): "
            f"{shown}. Copy the complete checkpoint (all shards)."
        )


def load_model(
    checkpoint: str | Path | CheckpointSource,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    ops=TorchOps,
) -> CausalLM:
    """Build the decoder the checkpoint's config names and fill it from its weights."""
    source = open_checkpoint(checkpoint)
    config = ModelConfig.from_hf_dict(source.raw_config())
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device):
        model = CausalLM(config, torch_dtype, ops=ops)
    load_weights(model, source)
    return model.to(device).eval()
