"""Paged KV-cache block bookkeeping: free list, reference counts, block tables,
and the prefix cache.

Pure Python; the tensors live in the model runner. Block ids index the
``num_blocks`` axis of every layer's cache (see ``graphs.kv_cache``), and block
0 is the null block that padding writes into, so it is never handed out.

Prefix caching (vLLM v1's scheme): a *full* block whose K/V have been
scheduled is registered under the hash of its tokens chained to its parent's
hash (`hash_block_tokens`), so the hash names the whole prefix up to the end
of the block. A later request whose leading blocks hash the same takes those
blocks by reference instead of recomputing them. A block whose last reference
goes keeps its content and hash on an LRU list of evictable blocks; it counts
as free, and is reused (its hash dropped) only when no never-cached free block
is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence

from aotllm.graphs.kv_cache import NULL_BLOCK

BlockHash = bytes

# The chain's root. Anything besides the tokens that changes a block's K/V
# (LoRA adapters, multimodal inputs, a per-tenant cache salt) would have to be
# hashed in as well; aotllm has none of these yet.
ROOT_HASH: BlockHash = b""


def hash_block_tokens(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """sha256 of the parent's hash and the block's token ids.

    A cryptographic hash, not Python's `hash`: a collision would silently hand
    one request another's K/V, and a 64-bit hash of attacker-chosen prompts
    is not safe against that.
    """
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be at least 2 (block {NULL_BLOCK} is the null block), "
                f"got {num_blocks}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Free blocks holding nothing worth keeping: handed out first.
        self._free: deque[int] = deque(b for b in range(num_blocks) if b != NULL_BLOCK)
        # Free blocks still holding a cached prefix, least recently used first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Tokens each table was last grown to cover; decides which blocks are
        # full (and so safe to share) when forking.
        self._num_tokens: dict[str, int] = {}
        # The prefix cache: hash -> block and back.
        self._cached: dict[BlockHash, int] = {}
        self._block_hash: list[BlockHash | None] = [None] * num_blocks
        # Leading blocks of each table already registered in (or found in) the cache.
        self._num_hashed: dict[str, int] = {}

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, evictable cached ones included (as vLLM counts)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (reused last, LRU)."""
        return len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or free."""
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks (null block excluded) that are taken."""
        return self.num_used_blocks / self.num_usable_blocks

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- the prefix cache ------------------------------------------------------

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._block_hash[block_id]

    def get_computed_blocks(self, block_hashes: Sequence[BlockHash],
                            max_blocks: int) -> list[int]:
        """The cached blocks of the longest prefix of `block_hashes` (at most
        `max_blocks`); nothing is taken until `allocate` gets them."""
        if not self.enable_caching:
            return []
        hits = []
        for h in block_hashes[:max_blocks]:
            block = self._cached.get(h)
            if block is None:
                break  # a chain: past the first miss nothing can match
            hits.append(block)
        return hits

    def cache_blocks(self, request_id: str, block_hashes: Sequence[BlockHash],
                     num_full_blocks: int) -> None:
        """Registers the request's first `num_full_blocks` blocks (whose K/V are
        scheduled) under `block_hashes`. A hash already cached under another
        block (the same prefix computed twice) keeps its first block."""
        if not self.enable_caching:
            return
        table = self._tables[request_id]
        assert num_full_blocks <= min(len(table), len(block_hashes)), (
            num_full_blocks, len(table), len(block_hashes))
        start = self._num_hashed.get(request_id, 0)
        for i in range(start, num_full_blocks):
            block, h = table[i], block_hashes[i]
            if self._block_hash[block] is None and h not in self._cached:
                self._cached[h] = block
                self._block_hash[block] = h
        self._num_hashed[request_id] = max(start, num_full_blocks)

    def _evict_one(self) -> int:
        block, _ = self._evictable.popitem(last=False)
        h = self._block_hash[block]
        assert h is not None and self._cached.get(h) == block, block
        del self._cached[h]
        self._block_hash[block] = None
        return block

    def _take_free(self) -> int:
        return self._free.popleft() if self._free else self._evict_one()

    # -- allocation ------------------------------------------------------------

    def blocks_needed(self, request_id: str, num_tokens: int,
                      computed_blocks: Sequence[int] = ()) -> int:
        """Free blocks `request_id` needs for its table to hold `num_tokens`
        tokens, after taking `computed_blocks` (cache hits) by reference. A hit
        on a free cached block takes it off the free list, so it counts too."""
        have = len(self._tables.get(request_id, ())) + len(computed_blocks)
        new = max(0, self._blocks_for(num_tokens) - have)
        return new + sum(1 for b in computed_blocks if self._ref_counts[b] == 0)

    def can_allocate(self, request_id: str, num_tokens: int,
                     computed_blocks: Sequence[int] = ()) -> bool:
        return self.blocks_needed(request_id, num_tokens, computed_blocks) <= self.num_free_blocks

    def allocate(self, request_id: str, num_tokens: int,
                 computed_blocks: Sequence[int] = ()) -> list[int]:
        """Grow the request's table to cover `num_tokens`, first with
        `computed_blocks` (cache hits from `get_computed_blocks`, only on an
        empty table); returns the newly allocated block ids.

        Callers check `can_allocate` first: running out here is a scheduler bug.
        """
        assert num_tokens >= 0, num_tokens
        needed = self.blocks_needed(request_id, num_tokens, computed_blocks)
        assert needed <= self.num_free_blocks, (
            f"out of KV-cache blocks: {request_id} needs {needed}, "
            f"{self.num_free_blocks} free"
        )
        table = self._tables.setdefault(request_id, [])
        if computed_blocks:
            assert not table, f"{request_id} takes cache hits on a non-empty table"
            for block in computed_blocks:
                assert self._block_hash[block] is not None, f"block {block} is not cached"
                if self._ref_counts[block] == 0:
                    del self._evictable[block]
                self._ref_counts[block] += 1
            table.extend(computed_blocks)
            self._num_hashed[request_id] = len(computed_blocks)
        new = [self._take_free() for _ in range(self._blocks_for(num_tokens) - len(table))]
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
        """Drop the request's references. A block nobody holds any more goes
        back to the free list, or, if cached, to the end of the LRU list."""
        table = self._tables.pop(request_id, None)
        self._num_tokens.pop(request_id, None)
        self._num_hashed.pop(request_id, None)
        if table is None:
            return
        # Tail first: a prefix is only found through all its leading blocks,
        # so the last blocks of a chain are the ones to evict first.
        for block in reversed(table):
            assert self._ref_counts[block] > 0, block
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                if self._block_hash[block] is not None:
                    self._evictable[block] = None
                else:
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

    def reset_prefix_cache(self) -> None:
        """Forgets every free cached block (vLLM's reset_prefix_cache); blocks
        still held keep their hashes."""
        while self._evictable:
            self._free.append(self._evict_one())

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
        assert not free & set(self._evictable), "a block is both free and evictable"
        free |= set(self._evictable)
        assert NULL_BLOCK not in free, "the null block is on the free list"
        assert all(counts[b] == 0 for b in free), "a referenced block is on the free list"
        assert all(self._block_hash[b] is None for b in self._free), "a cached block is on the free list"
        assert all(self._block_hash[b] is not None for b in self._evictable), (
            "an evictable block holds no hash")
        for h, block in self._cached.items():
            assert self._block_hash[block] == h, "hash maps disagree"
        assert sum(h is not None for h in self._block_hash) == len(self._cached), (
            "a block holds a hash the cache does not know")
        used = sum(1 for c in counts if c > 0)
        assert used + len(free) == self.num_usable_blocks, "a block leaked"
