"""Tensor parallelism: which slice of every weight a rank holds (as vLLM splits them).

- q/k/v and gate/up are column-parallel: each rank holds its heads' (its
  intermediate slice's) output rows of every piece of the fused matrix.
- o_proj and down_proj (the experts' down stack too) are row-parallel: each
  rank holds the input columns matching its heads / intermediate slice; the
  partial outputs are summed by one all-reduce. Additive terms (bias,
  static W8A8's quant_bias) live on rank 0 only, zeros elsewhere, so the sum
  adds them once.
- KV heads are split across ranks; with fewer KV heads than ranks, each
  rank holds the one KV head its q heads read (replicated).
- Embedding and LM head are vocab-parallel: rank r holds rows
  [r * V/N, (r+1) * V/N) of the (padded) vocabulary; the embedding sums
  the ranks' lookups (each row is found on one rank), the head gathers logits.

A `Split` says, for one parameter (or buffer) of the rank's model, which
indices of one dimension of the full tensor it holds. The same table slices
checkpoint tensors as they are read (models/weights.py: `Shard.for_rank`)
and a full model's tensors, quantized ones included (`shard_tensor`), so the
scales of a quantized linear travel with their weight's rows or columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group (rank 0 of 1: no TP)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"tensor-parallel rank {self.rank} of {self.size} is not valid")

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def even(self, total: int, what: str) -> tuple[int, int]:
        """(start, size) of this rank's equal share of `total` rows."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size "
                             f"{self.size}; choose a size that divides it")
        n = total // self.size
        return self.rank * n, n

    def kv_heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, KV heads) this rank holds; replicated when there are
        fewer KV heads than ranks (each rank keeps the head its q heads read)."""
        self.even(num_heads, "num_attention_heads")
        if num_kv_heads >= self.size:
            return self.even(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size {self.size} must be a multiple of "
                             f"num_key_value_heads ({num_kv_heads}) when it exceeds it")
        return self.rank // (self.size // num_kv_heads), 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows) of this rank's vocabulary slice; the vocabulary is
        padded to a multiple of the size, the padding rows hold zeros."""
        n = -(-vocab_size // self.size)
        return self.rank * n, n


@dataclass(frozen=True, eq=False)
class Split:
    """A rank's part of one tensor: indices `index` of dimension `dim` of the
    full tensor (-1: a padding row, zeros). `additive`: a term summed by the
    all-reduce after a row-parallel linear, kept on rank 0 only."""

    dim: int = 0
    index: torch.Tensor | None = None
    additive: bool = False


def row_index(pieces: list[tuple[int, int, int]]) -> torch.Tensor:
    """Full-tensor rows of a column-parallel fused matrix: per piece (offset of
    the piece in the full matrix, first row within it, rows), concatenated."""
    return torch.cat([torch.arange(off + a, off + a + n, device="cpu") for off, a, n in pieces])


def shard_tensor(full: torch.Tensor, split: Split | None, rank: int) -> torch.Tensor:
    """This rank's part of a tensor with a split of its own."""
    if split is None:
        return full
    if split.additive:
        return full if rank == 0 else torch.zeros_like(full)
    return _take(full, split.dim, split.index)


# Terms a row-parallel linear adds to its output (summed once over the ranks).
ADDITIVE = frozenset({"bias", "quant_bias"})


def shard_linear_tensor(attr: str, full: torch.Tensor, weight_split: Split, in_features: int,
                        rank: int) -> torch.Tensor:
    """This rank's part of one tensor of a full (e.g. quantized) linear, given
    the split of its weight, so scales travel with their weight's rows or
    columns. A row split (dim 0) cuts every tensor whose leading dimension is
    the output's; a column split cuts the input columns of the weight and of
    a grouped scale, keeps per-output tensors whole, and puts additive ones on
    rank 0 only."""
    index = weight_split.index
    if weight_split.dim == 0:
        if full.dim() == 0 or (full.shape[0] == 1 and index.numel() != 1):
            return full  # a per-tensor scale or offset
        return _take(full, 0, index)
    if attr in ADDITIVE:
        return full if rank == 0 else torch.zeros_like(full)
    if full.dim() < 2:
        return full
    width = full.shape[1]
    if width == in_features:
        return _take(full, 1, index)
    group = in_features // width  # a grouped scale: one column per `group` inputs
    if int(index[0]) % group or index.numel() % group:
        raise ValueError(f"a rank's input columns do not align with quantization groups of "
                         f"{group}; use a tensor_parallel_size that keeps groups whole")
    return _take(full, 1, index[::group] // group)


def _take(full: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    pad = index < 0
    out = full.index_select(dim, index.clamp(min=0))
    if bool(pad.any()):
        shape = [1] * out.dim()
        shape[dim] = -1
        out = out.masked_fill(pad.view(shape), 0)
    return out


def init_group_for_trace(tp: TensorParallel) -> None:
    """A stand-in process group (torch's fake backend, no peers) so a rank's
    model can be run or exported in one process: the graphs only name the
    group ("0", the default group's name, as it is in every rank's process)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        if dist.get_world_size() != tp.size:
            raise RuntimeError(f"a process group of {dist.get_world_size()} ranks exists; "
                               f"cannot trace for {tp.size}")
        return
    dist.init_process_group("fake", rank=tp.rank, world_size=tp.size, store=FakeStore())
