"""Weight loading from a checkpoint source (models/checkpoint.py): a safetensors
directory (single file or sharded) or a GGUF file.

The source yields one tensor at a time (memory-mapped safetensors, or one
dequantized GGUF tensor), which is copied into the model's (uninitialised)
parameters, so at most one checkpoint tensor is held beside the model: the
process never holds a second copy of the weights.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from collections.abc import Iterable
from pathlib import Path

import torch

from aotllm.models import weights
from aotllm.models.checkpoint import CheckpointSource, open_checkpoint
from aotllm.models.config import ModelConfig
from aotllm.models.decoder import CausalLM
from aotllm.models.ops import TorchOps
from aotllm.models.parallel import TensorParallel
from aotllm.models.registry import build_model

logger = logging.getLogger(__name__)

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


def load_weights(model: CausalLM, checkpoint: str | Path | CheckpointSource,
                 tensors: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
    """Fill every parameter from the checkpoint's tensors (or from `tensors`, a
    subset of them another reader chose, e.g. the float ones of a quantized
    checkpoint) through the model's weight map; a missing or foreign tensor is
    an error naming it."""
    source = open_checkpoint(checkpoint)
    # Only what is still a float parameter: a pre-quantized checkpoint's reader
    # (quantize/modelslim.py) has filled the linears it swapped in itself.
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    weight_map = {n: s for n, s in model.weight_map.items() if s.param in params}
    # Parameters of modules swapped in after construction (a norm or a
    # quantized linear that gained a bias) load like their weight's rows, or
    # under their own names.
    mapped = {s.param for s in model.weight_map.values()} | {"lm_head.weight"}
    for name in sorted(params - mapped):
        module, _, attr = name.rpartition(".")
        rows = weights.checkpoint_shards(model.weight_map, f"{module}.weight")
        if not rows:
            weight_map[model.checkpoint_name(name)] = weights.Shard(name)
        for ckpt, shard in rows:
            weight_map[f"{ckpt.removesuffix('.weight')}.{attr}"] = replace(shard, param=name)
    weights.load_weights(
        model, weight_map, source.describe(), model.config.architecture,
        source.tensor_parts() if tensors is None else tensors,
        skip=model.ignored_checkpoint_tensors(),
    )


def load_model(
    checkpoint: str | Path | CheckpointSource,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    ops=TorchOps,
    tp: TensorParallel | None = None,
) -> CausalLM:
    """Build the decoder of the family the checkpoint's config names
    (models/registry.py) and fill it from its weights; with `tp`, one
    tensor-parallel rank's part, reading only its slices of each tensor."""
    source = open_checkpoint(checkpoint)
    config = ModelConfig.from_hf_dict(source.raw_config())
    torch_dtype = resolve_dtype(dtype, config)
    with torch.device(device):
        model = build_model(config, torch_dtype, ops, tp)
    load_weights(model, source)
    return model.to(device).eval()
