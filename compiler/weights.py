"""The default weights file of an artifact: every tensor once, in safetensors,
laid out so the runtime can use a memory map of it as the weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from aotllm.graphs.manifest import WEIGHTS_ALIGNMENT, WEIGHTS_PAD_PREFIX

WEIGHTS_FILE = "weights.safetensors"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


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


def _padded(n: int) -> int:
    return -n % WEIGHTS_ALIGNMENT


def save_aligned(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file whose every tensor starts at a multiple of
    WEIGHTS_ALIGNMENT bytes from the start of the file.

    safetensors' own writer packs tensors back to back after a header of any
    length, so a memory-mapped tensor lands at an arbitrary offset (oneDNN's
    bf16 matmuls read such weights ~15% slower, so the runtime used to copy
    each one). Here the header is padded with spaces (the format allows it)
    and the holes between tensors are filler U8 tensors (it allows no holes).
    Tensors keep the module's order, so a layer's weights lie together.
    """
    cpu = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    entries: dict[str, dict] = {}
    offset = 0
    for name, t in cpu.items():
        if name.startswith(WEIGHTS_PAD_PREFIX):
            raise ValueError(f"tensor name {name!r} uses the reserved prefix {WEIGHTS_PAD_PREFIX}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"cannot store {name} of dtype {t.dtype} in safetensors")
        if pad := _padded(offset):
            entries[f"{WEIGHTS_PAD_PREFIX}{len(entries)}"] = {
                "dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            offset += pad
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header = json.dumps({"__metadata__": {"format": "pt", "alignment": str(WEIGHTS_ALIGNMENT)},
                         **entries}, separators=(",", ":")).encode()
    header += b" " * _padded(8 + len(header))
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, entry in entries.items():
            start, end = entry["data_offsets"]
            if name in cpu:
                # Raw bytes through a uint8 view: numpy has no bfloat16.
                f.write(memoryview(cpu[name].reshape(-1).view(torch.uint8).numpy()))
            else:
                f.write(bytes(end - start))


def write_safetensors(model: torch.nn.Module, out_dir: Path) -> tuple[str, dict[str, str]]:
    """Writes `weights.safetensors` under the graphs' constant names (the module's
    own names), aligned (`save_aligned`); returns (its path relative to
    `out_dir`, {alias: canonical})."""
    tensors, aliases = unique_tensors(model)
    path = out_dir / WEIGHTS_FILE
    tmp = path.with_suffix(".tmp")
    save_aligned(tensors, tmp)
    # Created 0644 (safetensors' own writer made it owner-only): an artifact is
    # often compiled by one user and served by another.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return WEIGHTS_FILE, aliases
