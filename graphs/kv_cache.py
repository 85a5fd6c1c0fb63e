"""The paged KV-cache layout: the one place it is defined.

Every decoder layer owns one tensor of shape

    [2, num_blocks, block_size, num_kv_heads, head_dim]

index 0 along the first axis holds keys, index 1 values. A token at absolute
position ``p`` of a sequence lives in block ``block_table[p // block_size]`` at
offset ``p % block_size``; its flat *slot* is ``block_id * block_size + offset``.
Block 0 is the null block: it is never handed to a sequence, padding rows write
their K/V there and padded block-table entries point at it. The cache is
zero-initialised so that masked-out entries are finite (0 * NaN would poison
the attention output).

``num_blocks`` is the only dimension that is chosen at load time (from the
serving host's memory budget); every compiled graph keeps it dynamic.

This module is stdlib only: the manifest records the layout, the models read
it, the runtime allocates it.
"""

from __future__ import annotations

from dataclasses import dataclass

NULL_BLOCK = 0

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # a torch dtype name without the "torch." prefix

    def layer_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        return (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block takes across all layers (keys and values)."""
        per_layer = 2 * self.block_size * self.num_kv_heads * self.head_dim
        return per_layer * self.num_layers * _DTYPE_BYTES[self.dtype]

    def to_dict(self) -> dict:
        return {
            "layout": "[2, num_blocks, block_size, num_kv_heads, head_dim] per layer",
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "null_block": NULL_BLOCK,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "KVCacheSpec":
        return cls(
            num_layers=int(d["num_layers"]),
            num_kv_heads=int(d["num_kv_heads"]),
            head_dim=int(d["head_dim"]),
            block_size=int(d["block_size"]),
            dtype=str(d["dtype"]),
        )
