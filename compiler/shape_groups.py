"""Shape groups (`--dynamic-shapes`): several buckets served by one AOTInductor
graph whose batch, token and context dimensions are dynamic over the group.

Compile time is paid per graph (here ~8 s of fixed cost plus ~4 s per decoder
layer and bucket), and a default plan has a graph per bucket: 24 for an 8k
context. Inductor compiles dynamic dimensions into loops over symbolic sizes,
and the matmuls are the same library calls either way, so a few graphs can
serve the whole plan. The runtime still pads every step to a bucket of the
plan; only the number of compiled graphs changes.

What must stay static, and so splits groups:
- the phase: decode and prefill trace different attention code;
- decode batch 1: torch specializes size-1 dimensions (a dynamic batch is
  guarded to >= 2), so batch 1 has its own graph;
- the prefill batch: the flat slot mapping is B*T long, and only a multiple
  of one dynamic size can be expressed, so prefill varies T with B fixed;
- which kernel a linear uses (models/float_kernels.py, models/int8_kernels.py
  decide by row count): every bucket of a group is on the same side of each
  threshold, so the choice is provable from the dimension's range and the
  trace adds no guard;
- a one-block context (size-1 dimension again) stays static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.export import Dim

from aotllm.graphs.buckets import Bucket
from aotllm.graphs.kv_cache import KVCacheSpec
from aotllm.models.float_kernels import COMPACT_MAX_ROWS, FP32_MIN_ROWS, float_linear_kernel
from aotllm.models.int8_kernels import INT8PACK_MAX_ROWS, w8a8_kernel, w8a16_kernel


@dataclass(frozen=True)
class ShapeGroup:
    buckets: tuple[Bucket, ...]  # sorted; the last is the largest
    batch: tuple[int, int]  # (min, max) over the group
    tokens: tuple[int, int]
    context_blocks: tuple[int, int]

    @property
    def graph_bucket(self) -> Bucket:
        """The bucket the graph is named after (the group's largest)."""
        return self.buckets[-1]


def row_thresholds(dtype: torch.dtype, scheme: str | None,
                   device: torch.device) -> tuple[tuple[str, int], ...]:
    """The row counts at which this model's linears change kernel: (">=", n)
    or ("<=", n) tests that every bucket of a group must answer alike."""
    out = []
    # The compact kernel's "<=" test below already separates the chunked FP32
    # route where that route starts past the kernel's rows.
    if FP32_MIN_ROWS > COMPACT_MAX_ROWS and float_linear_kernel(
            FP32_MIN_ROWS, dtype, device, compiled=True) == "fp32_chunked":
        out.append((">=", FP32_MIN_ROWS))
    if float_linear_kernel(COMPACT_MAX_ROWS, dtype, device, compiled=True) == "compact":
        out.append(("<=", COMPACT_MAX_ROWS))
    if scheme == "w8a16" and w8a16_kernel(
            COMPACT_MAX_ROWS + 1, dtype, device, grouped=False, compiled=True) != w8a16_kernel(
            INT8PACK_MAX_ROWS + 1, dtype, device, grouped=False, compiled=True):
        out.append(("<=", INT8PACK_MAX_ROWS))
    if (scheme in ("w8a8", "w8a8_static") and ("<=", COMPACT_MAX_ROWS) not in out
            and w8a8_kernel(COMPACT_MAX_ROWS, device, compiled=True) == "compact"):
        out.append(("<=", COMPACT_MAX_ROWS))
    return tuple(out)


def _rows_class(rows: int, thresholds) -> tuple[bool, ...]:
    return tuple(rows >= n if op == ">=" else rows <= n for op, n in thresholds)


def _key(b: Bucket, thresholds) -> tuple:
    batch = b.batch if (b.phase == "prefill" or b.batch == 1) else "dynamic"
    # The decoder body sees batch x tokens rows, the LM head one row per batch.
    return (b.phase, batch, b.context_blocks == 1, _rows_class(b.batch * b.tokens, thresholds),
            _rows_class(b.batch, thresholds))


def group_buckets(buckets: list[Bucket] | tuple[Bucket, ...],
                  thresholds: tuple[tuple[str, int], ...] = ()) -> list[ShapeGroup]:
    """The buckets grouped; `thresholds` from `row_thresholds`."""
    groups: dict[tuple, list[Bucket]] = {}
    for b in buckets:
        groups.setdefault(_key(b, thresholds), []).append(b)
    out = []
    for members in groups.values():
        members.sort(key=lambda b: (b.batch, b.tokens, b.context_blocks))

        def span(attr: str, members=members) -> tuple[int, int]:
            values = [getattr(b, attr) for b in members]
            return min(values), max(values)

        batch, tokens, ctx = span("batch"), span("tokens"), span("context_blocks")
        # The largest bucket must hold every dimension's maximum (its shapes
        # are the example inputs); a group where no bucket does is split.
        top = members[-1]
        if (top.batch, top.tokens, top.context_blocks) != (batch[1], tokens[1], ctx[1]):
            out += [ShapeGroup((b,), (b.batch,) * 2, (b.tokens,) * 2, (b.context_blocks,) * 2)
                    for b in members]
            continue
        out.append(ShapeGroup(tuple(members), batch, tokens, ctx))
    return out


def _pick(lo: int, hi: int, taken: set[int]) -> int:
    """An example size in [lo, hi] equal to no other size of the example inputs:
    export must not read two dynamic sizes that happen to be equal as one."""
    for value in range(hi, lo - 1, -1):
        if value not in taken:
            return value
    return hi


def example_bucket_and_dims(group: ShapeGroup, spec: KVCacheSpec
                            ) -> tuple[Bucket, dict[str, Dim | None]]:
    """The bucket whose shapes trace the graph, and the dynamic dimension (or
    None for static) of each of its batch, tokens and context_blocks."""
    top = group.graph_bucket
    taken = {spec.block_size, spec.num_kv_heads, spec.head_dim, 2}
    sizes, dims = {}, {}
    for name, (lo, hi) in (("context_blocks", group.context_blocks), ("tokens", group.tokens),
                           ("batch", group.batch)):
        if lo == hi:
            sizes[name], dims[name] = hi, None
            continue
        sizes[name] = _pick(lo, hi, taken)
        taken.add(sizes[name])
        dims[name] = Dim(name, min=lo, max=hi)
    example = Bucket(top.phase, sizes["batch"], sizes["tokens"], sizes["context_blocks"])
    return example, dims


def dynamic_shapes(example: Bucket, dims: dict[str, Dim | None], num_layers: int,
                   num_blocks: Dim) -> tuple:
    """torch.export's dynamic_shapes for the graph signature's inputs."""
    b, t, c = dims["batch"], dims["tokens"], dims["context_blocks"]
    if t is None:
        flat = b  # decode: one token per row
    else:
        assert b is None, "prefill groups keep the batch static"
        flat = t * example.batch if example.batch > 1 else t
    bt = {k: v for k, v in ((0, b), (1, t)) if v is not None} or None
    return (
        bt,  # input_ids [B, T]
        bt,  # positions [B, T]
        {0: flat} if flat is not None else None,  # slot_mapping [B*T]
        {k: v for k, v in ((0, b), (1, c)) if v is not None} or None,  # block_tables
        {0: b} if b is not None else None,  # context_lens [B]
        {0: b} if b is not None else None,  # query_lens [B]
        [{1: num_blocks}] * num_layers,  # kv caches [2, num_blocks, ...]
    )

