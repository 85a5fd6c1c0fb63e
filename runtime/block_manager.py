"""Paged KV-cache block bookkeeping: free list, reference counts, block tables.

Pure Python; the tensors live in the model runner. Block ids index the
``num_blocks`` axis of every layer's cache (see ``graphs.kv_cache``), and block
0 is the null block that padding writes into, so it is never handed out.
"""

from __future__ import annotations

from collections import deque

from aotllm.graphs.kv_cache import NULL_BLOCK


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block {NULL_BLOCK} is the null block), "
                f"got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Tokens each table was last grown to cover; decides which blocks are
        # full (and so safe to share) when forking.
        self._num_tokens: dict[str, int] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (null block excluded) that are taken."""
        return self.num_used_blocks / self.num_usable_blocks

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks `request_id` needs for its table to hold `num_tokens` tokens."""
        have = len(self._tables.get(request_id, ()))
        return max(0, self._blocks_for(num_tokens) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to cover `num_tokens`; returns the new block ids.

        Callers check `can_allocate` first: running out here is a scheduler bug.
        """
        assert num_tokens >= 0, num_tokens
        needed = self.blocks_needed(request_id, num_tokens)
        assert needed <= len(self._free), (
            f"out of KV-cache blocks: {request_id} needs {needed}, {len(self._free)} free"
        )
        table = self._tables.setdefault(request_id, [])
        new = [self._free.popleft() for _ in range(needed)]
        for block in new:
            assert self._ref_counts[block] == 0, block
            self._ref_counts[block] = 1
        table.extend(new)
        self._num_tokens[request_id] = max(self._num_tokens.get(request_id, 0), num_tokens)
        return new

    def block_table(self, request_id: str) -> list[int]:
        """The request's block table (a copy); empty if it holds no blocks."""
        return list(self._tables.get(request_id, ()))

    def has_blocks(self, request_id: str) -> bool:
        return request_id in self._tables

    def free(self, request_id: str) -> None:
        """Drop the request's references; unshared blocks return to the free list."""
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        if table is None:
            return
        for block in table:
            assert self._ref_counts[block] > 0, block
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def fork(self, parent_id: str, child_id: str, num_tokens: int | None = None) -> None:
        """Give `child_id` the parent's full blocks by reference (prefix sharing).

        Only blocks entirely covered by the first `num_tokens` tokens (default:
        the tokens the parent's table was grown to hold) are shared, because a
        partial block would be written by both sequences. The child grows its
        own table from there with `allocate`.
        """
        assert parent_id in self._tables, f"unknown parent {parent_id!r}"
        assert child_id not in self._tables, f"{child_id!r} already holds blocks"
        parent = self._tables[parent_id]
        if num_tokens is None:
            num_tokens = self._num_tokens[parent_id]
        assert 0 <= num_tokens <= len(parent) * self.block_size, num_tokens
        shared = parent[: num_tokens // self.block_size]
        for block in shared:
            self._ref_counts[block] += 1
        self._tables[child_id] = list(shared)
        self._num_tokens[child_id] = len(shared) * self.block_size

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def check_invariants(self) -> None:
        """Full consistency check (O(num_blocks)); for tests and debugging."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for block in table:
                counts[block] += 1
        assert counts == self._ref_counts, "reference counts disagree with the tables"
        assert counts[NULL_BLOCK] == 0, "the null block was handed out"
        free = set(self._free)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert NULL_BLOCK not in free, "the null block is on the free list"
        assert all(counts[b] == 0 for b in free), "a referenced block is on the free list"
        used = sum(1 for c in counts if c > 0)
        assert used + len(free) == self.num_usable_blocks, "a block leaked"
