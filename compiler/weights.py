"""The default weights file of an artifact: every tensor once, in safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

WEIGHTS_FILE = "weights.safetensors"


def unique_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """({name: tensor} with each storage once, {alias: canonical} for tied tensors)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, str] = {}
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        ptr = t.data_ptr()
        if ptr in seen:
            aliases[name] = seen[ptr]
            continue
        seen[ptr] = name
        tensors[name] = t
    return tensors, aliases


def write_safetensors(model: torch.nn.Module, out_dir: Path) -> tuple[str, dict[str, str]]:
    """Writes `weights.safetensors` under the graphs' constant names (the module's
    own names); returns (its path relative to `out_dir`, {alias: canonical})."""
    tensors, aliases = unique_tensors(model)
    path = out_dir / WEIGHTS_FILE
    tmp = path.with_suffix(".tmp")
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, str(tmp),
              metadata={"format": "pt"})
    # safetensors creates the file owner-only (0600); an artifact is often
    # compiled by one user and served by another.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return WEIGHTS_FILE, aliases
