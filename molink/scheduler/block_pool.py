"""BlockPool: the head's free list of KV-cache block ids.

Block ids are global (every stage stores its own layers' KV under the same id), so the pool
only hands out numbers ``0 .. num_blocks - 1``; it knows nothing about memory.
"""

from __future__ import annotations

import collections


class BlockPool:
    """Fixed set of block ids; lowest free ids are handed out first, freed ids go last."""

    def __init__(self, num_blocks: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def can_allocate(self, num_blocks: int) -> bool:
        """Whether ``allocate(num_blocks)`` would succeed now."""
        return 0 <= num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` free blocks (check ``can_allocate`` first)."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            raise RuntimeError(
                f"cannot allocate {num_blocks} blocks: only {len(self._free)} are free")
        block_ids = [self._free.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._is_free[block_id] = False
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool. Freeing a free (or unknown) block is a bug."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks or self._is_free[block_id]:
                raise RuntimeError(f"block {block_id} freed twice or never allocated")
            self._is_free[block_id] = True
            self._free.append(block_id)
