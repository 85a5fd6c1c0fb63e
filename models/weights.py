"""Where each checkpoint tensor goes in a model: its weight map.

A family's model says, for every checkpoint tensor name, which parameter it
fills and how (`Shard`): the whole parameter, rows [start, start + size) of a
fused one (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`), one expert's
slice of a stacked expert parameter, with the rows reordered on the way
(grouped `wqkv` layouts, interleaved rotary pairs). The map is built from the
model's own modules and config, so a fused parameter's shards are known by
name, never guessed from a tensor's shape.

`load_weights` fills a model through its map; the msModelSlim reader and
writer (quantize/) read the same map to split fused tensors back apart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from aotllm.models.parallel import Split

if TYPE_CHECKING:
    from aotllm.models.checkpoint import TensorPart


@dataclass(frozen=True, eq=False)
class Shard:
    """The destination of one checkpoint tensor.

    param: the model parameter's name.
    expert: index into dim 0 of a stacked expert parameter, or None.
    start, size: the rows (dim 0, after `expert`) it fills; size None = all.
    rows: dst row i takes the checkpoint tensor's row rows[i] (None: same order;
        -1: a padding row, zeros).
    cols: the checkpoint tensor's columns (dim 1) it takes (a row-parallel
        linear's rank slice), or None for all.
    zero: fill with zeros instead (an additive term on a rank other than 0).
    """

    param: str
    expert: int | None = None
    start: int = 0
    size: int | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    zero: bool = False

    def target(self, param: torch.Tensor) -> torch.Tensor:
        dst = param if self.expert is None else param[self.expert]
        if self.size is not None:
            dst = dst.narrow(0, self.start, self.size)
        return dst

    def load(self, param: torch.Tensor, src: "torch.Tensor | TensorPart") -> None:
        """Copy a checkpoint tensor into its place (the shard's weight loader).
        From a `TensorPart` only the span of rows and columns the shard takes
        is read: a tensor-parallel rank's slice, not the whole tensor."""
        dst = self.target(param)
        rows, cols = self.rows, self.cols
        if not isinstance(src, torch.Tensor):
            src, rows, cols = _read_span(src, rows, cols, tuple(dst.shape))
        if cols is not None:
            src = src.index_select(1, cols)
        if rows is not None and src.dim() > 0:
            pad = rows < 0
            src = src.index_select(0, rows.clamp(min=0))
            if bool(pad.any()):
                src[pad] = 0
        if tuple(src.shape) != tuple(dst.shape):
            raise _ShapeError(tuple(src.shape), tuple(dst.shape))
        with torch.no_grad():
            dst.copy_(src) if not self.zero else dst.zero_()

    def for_rank(self, split: "Split | None", rank: int) -> "Shard":
        """This shard cut to a tensor-parallel rank's part of its parameter
        (models/parallel.py); `split` indexes the full parameter."""
        if split is None:
            return self
        if split.additive:
            return replace(self, zero=rank != 0)
        dim = split.dim - (self.expert is not None)
        if dim == 1:
            return replace(self, cols=split.index)
        assert dim == 0, (self.param, split.dim)
        index = split.index
        if self.size is None:  # the whole parameter: every local row, padding too
            where = torch.arange(index.numel(), device="cpu")
        else:
            keep = (index >= self.start) & (index < self.start + self.size)
            where = keep.nonzero().flatten()
            assert where.numel() == 0 or int(where[-1] - where[0]) + 1 == where.numel(), \
                f"{self.param}: a shard's rows on one rank must be contiguous"
        src = index[where] - (self.start if self.size is not None else 0)
        if self.rows is not None:
            src = torch.where(src >= 0, self.rows[src.clamp(min=0)], src)
        start = int(where[0]) if self.size is not None and where.numel() else 0
        size = None if self.size is None else where.numel()
        return replace(self, start=start, size=size, rows=src)

    def unload(self, tensor: torch.Tensor) -> torch.Tensor:
        """The inverse of `load` on a tensor laid out like the parameter (e.g. an
        int8 weight or a per-row scale): the checkpoint's tensor."""
        assert self.cols is None and not self.zero, "unload of a tensor-parallel shard"
        part = self.target(tensor)
        if self.rows is not None and part.dim() > 0:
            out = torch.empty_like(part)
            out[self.rows] = part
            part = out
        return part


def _span(index: torch.Tensor | None, length: int) -> tuple[int, int]:
    """[first, last + 1) of the indices a shard takes along one dimension
    (padding rows, -1, take nothing); the whole dimension when all of it."""
    if index is None:
        return 0, length
    used = index[index >= 0]
    # All padding: one row, which the shard zeroes.
    return (int(used.min()), int(used.max()) + 1) if used.numel() else (0, min(1, length))


def _read_span(part: TensorPart, rows: torch.Tensor | None, cols: torch.Tensor | None,
               want: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None,
                                              torch.Tensor | None]:
    """Reads the rows x columns span a shard uses from a checkpoint tensor
    not read yet; returns it with the shard's indices made relative to it."""
    shape = tuple(part.get_shape())
    if not shape:
        return part[()], rows, cols
    r0, r1 = _span(rows, shape[0])
    index: list[slice] = [slice(r0, r1)]
    if len(shape) > 1:
        c0, c1 = _span(cols, shape[1])
        index.append(slice(c0, c1))
        if c1 > shape[1]:
            raise _ShapeError(shape, want)
        cols = None if cols is None else cols - c0
    if r1 > shape[0]:
        raise _ShapeError(shape, want)
    if rows is not None:
        rows = torch.where(rows >= 0, rows - r0, rows)
    return part[tuple(index)], rows, cols


class _ShapeError(ValueError):
    def __init__(self, got: tuple[int, ...], want: tuple[int, ...]):
        super().__init__(got, want)
        self.got, self.want = got, want


WeightMap = dict[str, Shard]  # checkpoint tensor name -> its destination


def grouped_qkv_rows(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Rows of a grouped fused qkv tensor (per KV group: its q heads, then k,
    then v; InternLM2's `wqkv`, Falcon's `query_key_value`) in [q; k; v] order."""
    g = num_heads // num_kv_heads
    per_group = (g + 2) * head_dim
    heads = torch.arange(head_dim, device="cpu")
    q = [grp * per_group + j * head_dim + heads for grp in range(num_kv_heads) for j in range(g)]
    k = [grp * per_group + g * head_dim + heads for grp in range(num_kv_heads)]
    v = [grp * per_group + (g + 1) * head_dim + heads for grp in range(num_kv_heads)]
    return torch.cat(q + k + v)


def rotary_rows(num_heads: int, head_dim: int, rotary_dim: int, interleaved: bool) -> torch.Tensor:
    """Rows of a q or k projection in the rotate-half order the ops layer's
    `rotary` uses (pair i at dims (i, i + head_dim / 2)), from a checkpoint
    whose rotary pairs are interleaved ((2i, 2i+1), GLM) and/or cover only the
    first `rotary_dim` dims of each head (partial rotary).

    Attention only sees q.k, which one per-head permutation applied to both q
    and k leaves unchanged; the pass-through dims take the remaining pairs and
    get frequency 0 (cos 1, sin 0), see `CausalLM.rotary_cos_sin`."""
    assert rotary_dim % 2 == 0 and head_dim % 2 == 0 and rotary_dim <= head_dim
    half, r = head_dim // 2, rotary_dim // 2
    if interleaved:
        pairs = [(2 * i, 2 * i + 1) for i in range(r)]
    else:
        pairs = [(i, i + r) for i in range(r)]
    pairs += [(rotary_dim + 2 * i, rotary_dim + 2 * i + 1) for i in range(half - r)]
    order = torch.empty(head_dim, dtype=torch.long, device="cpu")
    for i, (a, b) in enumerate(pairs):
        order[i], order[i + half] = a, b
    return torch.cat([h * head_dim + order for h in range(num_heads)])


def load_weights(model: torch.nn.Module, weight_map: WeightMap, source_desc: str,
                 architecture: str, tensors: Iterable[tuple[str, torch.Tensor]],
                 skip: frozenset[str] = frozenset()) -> None:
    """Fill every parameter the map names from `tensors`; a checkpoint tensor
    the map does not know, or a map entry no tensor filled, is an error naming
    it. `skip`: checkpoint names to ignore (a tied lm_head's copy)."""
    written: set[str] = set()
    for name, src in tensors:
        if name in skip:
            continue
        shard = weight_map.get(name)
        if shard is None:
            raise ValueError(
                f"checkpoint tensor {name!r} ({source_desc}) does not belong to a "
                f"{architecture}; are its config and weights from the same checkpoint?"
            )
        try:
            shard.load(model.get_parameter(shard.param), src)
        except _ShapeError as e:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {e.got} but the model built from "
                f"the checkpoint's config expects {e.want}"
            ) from None
        written.add(name)
    missing = sorted(n for n in weight_map if n not in written and n not in skip)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(
            f"{source_desc} is missing {len(missing)} weight tensor(s): "
            f"{shown}. Copy the complete checkpoint (all shards)."
        )


def checkpoint_shards(weight_map: WeightMap, param: str) -> list[tuple[str, Shard]]:
    """The checkpoint tensors behind one parameter, in row order."""
    found = [(n, s) for n, s in weight_map.items() if s.param == param]
    return sorted(found, key=lambda item: (item[1].expert or 0, item[1].start))


def merge(weight_map: WeightMap, prefix: str, pieces: tuple[str, ...], into: str,
          rows: torch.Tensor | None = None) -> None:
    """Where a checkpoint stores a fused parameter as one tensor (`into`) rather
    than its shards (`pieces`, e.g. q_proj/k_proj/v_proj): one entry for the
    whole parameter, its rows reordered by `rows` (see `Shard.rows`)."""
    for attr in ("weight", "bias"):
        names = [f"{prefix}.{p}.{attr}" for p in pieces]
        if names[0] not in weight_map:
            continue
        param = weight_map[names[0]].param
        for name in names:
            assert weight_map.pop(name).param == param, f"{name} is not a shard of {param}"
        weight_map[f"{prefix}.{into}.{attr}"] = Shard(param, rows=rows)


def merge_grouped_qkv(weight_map: WeightMap, config, into: str) -> None:
    """Every layer's q/k/v stored as one grouped tensor named `into` (per KV
    group: its q heads, then k, then v), as InternLM2 and Falcon store them."""
    rows = grouped_qkv_rows(config.num_heads, config.num_kv_heads, config.head_dim)
    for i in range(config.num_layers):
        merge(weight_map, f"model.layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj"), into,
              rows)


def reorder(weight_map: WeightMap, name: str, rows: torch.Tensor) -> None:
    """Reorder the rows one checkpoint tensor fills (1-D biases as well)."""
    if name in weight_map:
        weight_map[name] = replace(weight_map[name], rows=rows)
