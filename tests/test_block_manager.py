import pytest

from aotllm.graphs.kv_cache import NULL_BLOCK
from aotllm.runtime.block_manager import BlockManager


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(1, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(8, 0)


def test_allocate_grows_table_to_cover_tokens():
    bm = BlockManager(num_blocks=10, block_size=4)
    assert bm.num_free_blocks == 9 and bm.num_used_blocks == 0 and bm.usage == 0.0
    assert bm.blocks_needed("a", 5) == 2
    new = bm.allocate("a", 5)
    assert len(new) == 2 and bm.block_table("a") == new
    # Still inside the second block: nothing new.
    assert bm.blocks_needed("a", 8) == 0
    assert bm.allocate("a", 8) == []
    assert bm.allocate("a", 9) == bm.block_table("a")[2:] and len(bm.block_table("a")) == 3
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 6
    assert bm.usage == pytest.approx(3 / 9)
    bm.check_invariants()


def test_null_block_never_handed_out():
    bm = BlockManager(num_blocks=6, block_size=2)
    blocks = bm.allocate("a", 10)  # every usable block
    assert sorted(blocks) == [1, 2, 3, 4, 5]
    assert NULL_BLOCK not in blocks
    assert bm.num_free_blocks == 0 and bm.usage == 1.0
    assert not bm.can_allocate("b", 1)
    assert bm.can_allocate("b", 0)
    with pytest.raises(AssertionError):
        bm.allocate("b", 1)
    bm.check_invariants()


def test_free_returns_blocks_and_unknown_is_noop():
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.allocate("a", 12)
    bm.allocate("b", 4)
    bm.free("a")
    assert bm.block_table("a") == [] and not bm.has_blocks("a")
    assert bm.num_free_blocks == 6
    bm.free("a")
    bm.free("never-seen")
    assert bm.num_free_blocks == 6
    bm.free("b")
    assert bm.num_free_blocks == 7 and bm.num_used_blocks == 0
    bm.check_invariants()


def test_block_table_is_a_copy():
    bm = BlockManager(num_blocks=4, block_size=4)
    bm.allocate("a", 4)
    bm.block_table("a").append(99)
    assert len(bm.block_table("a")) == 1


def test_fork_shares_full_blocks_by_reference():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate("p", 10)  # 2 full blocks + 1 partial
    parent = bm.block_table("p")
    bm.fork("p", "c")
    child = bm.block_table("c")
    assert child == parent[:2]  # the partial block is not shared
    assert [bm.ref_count(b) for b in parent] == [2, 2, 1]
    assert bm.num_used_blocks == 3
    # The child grows its own table past the shared prefix.
    new = bm.allocate("c", 12)
    assert len(new) == 1 and new[0] not in parent
    bm.check_invariants()
    # Freeing the parent keeps the shared blocks alive for the child.
    bm.free("p")
    assert [bm.ref_count(b) for b in parent] == [1, 1, 0]
    assert bm.block_table("c") == parent[:2] + new
    assert bm.num_used_blocks == 3
    bm.free("c")
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == 9
    bm.check_invariants()


def test_fork_with_explicit_token_count():
    bm = BlockManager(num_blocks=10, block_size=4)
    bm.allocate("p", 16)
    bm.fork("p", "c", num_tokens=9)
    assert bm.block_table("c") == bm.block_table("p")[:2]
    with pytest.raises(AssertionError):
        bm.fork("p", "c")  # child already exists
    with pytest.raises(AssertionError):
        bm.fork("nobody", "d")
    bm.check_invariants()


def test_freed_blocks_are_reused():
    bm = BlockManager(num_blocks=4, block_size=1)
    first = bm.allocate("a", 3)
    bm.free("a")
    second = bm.allocate("b", 3)
    assert sorted(first) == sorted(second)
    bm.check_invariants()
