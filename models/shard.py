"""A full model (loaded once, quantized once) -> one tensor-parallel rank's model.

Used by the compiler (a TP artifact's weights files) and by eager TP with a
quantization scheme (every rank quantizes the whole model and keeps its part).
Compiling a TP artifact loads and quantizes the whole model as for one rank,
so quantization sees whole rows (a row-parallel linear's per-channel scales
are those of TP=1), then cuts every tensor to each rank's part with the same
split table the runtime's loader uses on checkpoints (models/parallel.py):
scales travel with their weight's rows or columns.
"""

from __future__ import annotations

import torch

from aotllm.models.decoder import CausalLM
from aotllm.models.parallel import TensorParallel, shard_linear_tensor, shard_tensor
from aotllm.models.registry import build_model

# Rank-specific by construction (the rank's vocabulary offset), not cut from the full model.
_OWN = frozenset({"vocab_start"})


def shard_model(full: CausalLM, tp: TensorParallel, quant: dict | None) -> CausalLM:
    device = next(full.parameters()).device
    with torch.device(device):
        part = build_model(full.config, full.dtype, full.ops, tp)
    if quant is not None:
        # quantize/ builds on models/: imported here, not at module level.
        from aotllm.quantize.apply import quantized_skeleton

        quantized_skeleton(part, quant)
    splits = part.tp_splits()
    full_modules = dict(full.named_modules())
    with torch.no_grad():
        for name, module in part.named_modules():
            src = full_modules[name]
            weight_split = splits.get(f"{name}.weight" if name else "weight")
            linear = hasattr(module, "in_features") and weight_split is not None
            tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            for attr, t in tensors:
                if attr in _OWN or t is None:
                    continue
                whole = getattr(src, attr)
                if linear:
                    piece = shard_linear_tensor(attr, whole, weight_split, src.in_features, tp.rank)
                else:
                    piece = shard_tensor(whole, splits.get(f"{name}.{attr}"), tp.rank)
                if piece.shape != t.shape:
                    raise AssertionError(f"{name}.{attr}: rank {tp.rank} slice {tuple(piece.shape)}"
                                         f" != {tuple(t.shape)}")
                t.copy_(piece)
    return part.eval()
