"""Activation statistics for SmoothQuant and static activation scales.

The float model runs over calibration text (one sequence per window, through
the model's own graph signature with a scratch paged KV cache) while forward
pre-hooks record, per linear, the largest |x| of each input channel.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from aotllm.models.layers import Linear

logger = logging.getLogger(__name__)

BUILTIN_DATA = "calibration.txt"  # ships inside aotllm.quantize
_WINDOW = 512
_BLOCK = 16


@dataclass(frozen=True)
class CalibrationText:
    text: str
    source: str  # a path, or "builtin"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def read_calibration_text(path: str | None) -> CalibrationText:
    if path is None:
        text = resources.files("aotllm.quantize").joinpath(BUILTIN_DATA).read_text(encoding="utf-8")
        return CalibrationText(text, "builtin")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"calibration data {path} not found: pass a text file of representative "
            "prompts with --calibration-data, or omit it to use the built-in set"
        )
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise ValueError(
            f"calibration data {path} is empty: give it a few thousand tokens of text like "
            "the prompts the model will serve, or omit --calibration-data"
        )
    return CalibrationText(text, str(p))


@torch.inference_mode()
def run_sequence(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """One prefill of `ids` through the graph signature; last-token logits."""
    c = model.config
    device = next(model.parameters()).device
    t = len(ids)
    nblocks = math.ceil(t / _BLOCK)
    blocks = list(range(1, nblocks + 1))  # block 0 is the null block
    kv = [torch.zeros(2, nblocks + 1, _BLOCK, c.num_kv_heads, c.head_dim,
                      dtype=model.dtype, device=device) for _ in range(c.num_layers)]
    long = dict(dtype=torch.int64, device=device)
    pos = torch.arange(t, **long)
    slots = torch.tensor([blocks[p // _BLOCK] * _BLOCK + p % _BLOCK for p in range(t)], **long)
    return model(torch.tensor([ids], **long), pos.view(1, t), slots,
                 torch.tensor([blocks], **long), torch.tensor([t], **long),
                 torch.tensor([t], **long), kv)


def collect_input_absmax(model: nn.Module, token_ids: list[int],
                         names: list[str]) -> dict[str, torch.Tensor]:
    """Per named Linear: float32 [in_features], max |x| of each input channel."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1]).abs().amax(0)
            prev = stats.get(name)
            stats[name] = x if prev is None else torch.maximum(prev, x)
        return hook

    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules[name], Linear):
            raise TypeError(f"{name} is not a float Linear")
        hooks.append(modules[name].register_forward_pre_hook(hook_for(name)))
    try:
        windows = [token_ids[i:i + _WINDOW] for i in range(0, len(token_ids), _WINDOW)]
        for window in tqdm(windows, desc="Calibrating", unit="window", disable=len(windows) < 4):
            if len(window) > 1:
                run_sequence(model, window)
    finally:
        for h in hooks:
            h.remove()
    return stats


def calibration_tokens(tokenizer, data: CalibrationText, limit: int, vocab_size: int) -> list[int]:
    ids = tokenizer.encode(data.text)
    if len(ids) < 2:
        raise ValueError(f"calibration data {data.source} has fewer than 2 tokens")
    if max(ids) >= vocab_size:
        raise ValueError("the tokenizer produces ids beyond the model's vocabulary")
    if len(ids) < 256:
        logger.warning("calibration data %s has only %d tokens; activation ranges may be "
                       "underestimated", data.source, len(ids))
    return ids[:limit]
