import pytest

from molink.scheduler import BlockPool


def test_starts_all_free():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4
    assert pool.num_used_blocks == 0


@pytest.mark.parametrize("num_blocks", [0, -1, 1.5, True, None])
def test_rejects_bad_size(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(num_blocks)


def test_allocate_is_deterministic_and_counts():
    pool = BlockPool(5)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(0) == []
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 0
    assert pool.num_used_blocks == 5


def test_can_allocate_matches_allocate():
    pool = BlockPool(3)
    assert pool.can_allocate(3)
    assert not pool.can_allocate(4)
    pool.allocate(2)
    assert pool.can_allocate(1)
    assert not pool.can_allocate(2)
    with pytest.raises(RuntimeError, match="only 1"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # a failed allocation takes nothing


def test_free_returns_blocks_for_reuse():
    pool = BlockPool(3)
    first = pool.allocate(2)
    pool.free(first)
    assert pool.num_free_blocks == 3
    again = pool.allocate(3)
    assert sorted(again) == [0, 1, 2]
    assert again[0] == 2  # ids freed earlier are reused after never-used ones


def test_double_free_is_an_error():
    pool = BlockPool(3)
    blocks = pool.allocate(2)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([blocks[0]])
    with pytest.raises(RuntimeError):
        pool.free([2])  # never allocated
    with pytest.raises(RuntimeError):
        pool.free([7])  # not a block id
    assert pool.num_free_blocks == 3


def test_duplicate_ids_in_one_free_are_an_error():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.free([0, 0])


def test_negative_allocation_is_rejected():
    pool = BlockPool(2)
    assert not pool.can_allocate(-1)
    with pytest.raises(ValueError):
        pool.allocate(-1)
