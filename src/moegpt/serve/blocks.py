"""KV-cache block allocation: a free list of fixed-size blocks, per-sequence block tables, and
reference counts so forked sequences (``n`` > 1 samples of one prompt) share their prompt's
blocks and copy a shared block only when they write into it (copy-on-write)."""

from __future__ import annotations

from collections import deque


class OutOfBlocks(Exception):
    """No free block: the scheduler preempts a sequence and retries."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need blocks and a block size, got {num_blocks} x {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        # Blocks more than one table points at. Forks are rare: with none, a write never
        # copies, and a decode step's tables skip looking block by block.
        self.shared = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        """Blocks that hold ``tokens`` tokens."""
        return -(-tokens // self.block_size)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfBlocks
        block = self._free.popleft()
        self._refs[block] = 1
        return block

    def share(self, block: int) -> int:
        """Another table now points at ``block``."""
        assert self._refs[block] > 0, f"block {block} is free"
        self._refs[block] += 1
        self.shared += self._refs[block] == 2
        return block

    def release(self, block: int) -> None:
        assert self._refs[block] > 0, f"block {block} released twice"
        self._refs[block] -= 1
        self.shared -= self._refs[block] == 1
        if self._refs[block] == 0:
            self._free.append(block)

    def is_shared(self, block: int) -> bool:
        return self._refs[block] > 1


class BlockTable:
    """The blocks of one sequence, in order; slot ``i`` of the sequence lives at
    ``blocks[i // block_size] * block_size + i % block_size`` of the cache."""

    def __init__(self, allocator: BlockAllocator) -> None:
        self.allocator = allocator
        self.blocks: list[int] = []
        # The runner's copy of the table (see ``changes``): its length, and how many of its
        # leading blocks are still this table's.
        self._sent = 0
        self._synced = 0

    def changes(self) -> tuple[int, tuple[int, ...]] | None:
        """What changed since the last call, as (first changed block, the blocks from there to
        the end), or None: a step's chunk carries it to the runner's copy of the table, so a
        decode step sends a block once, not the whole table every step."""
        length = len(self.blocks)
        if self._synced == length == self._sent:
            return None
        first = self._synced
        self._synced = self._sent = length
        return first, tuple(self.blocks[first:])

    def slots(self, start: int, end: int) -> list[int]:
        size = self.allocator.block_size
        return [self.blocks[i // size] * size + i % size for i in range(start, end)]

    def _touched(self, filled: int, tokens: int) -> range:
        size = self.allocator.block_size
        return range(filled // size, min((tokens - 1) // size + 1, len(self.blocks)))

    def extra_blocks(self, filled: int, tokens: int) -> int:
        """Blocks to allocate before tokens ``filled .. tokens`` can be written: new ones,
        plus copies of shared blocks the write touches."""
        new = max(self.allocator.blocks_for(tokens) - len(self.blocks), 0)
        if not self.allocator.shared:
            return new
        shared = sum(
            self.allocator.is_shared(self.blocks[i]) for i in self._touched(filled, tokens)
        )
        return new + shared

    def grow(self, filled: int, tokens: int) -> list[tuple[int, int]]:
        """Make room for tokens ``filled .. tokens``; return (source, destination) block
        copies the cache must make first (copy-on-write of shared blocks being written)."""
        copies = []
        for index in self._touched(filled, tokens) if self.allocator.shared else ():
            block = self.blocks[index]
            if self.allocator.is_shared(block):
                fresh = self.allocator.allocate()
                self.allocator.release(block)
                self.blocks[index] = fresh
                self._synced = min(self._synced, index)
                copies.append((block, fresh))
        while len(self.blocks) < self.allocator.blocks_for(tokens):
            self.blocks.append(self.allocator.allocate())
        return copies

    def truncate(self, tokens: int) -> None:
        """Release the blocks past the first ``tokens`` tokens (rejected speculative tokens'
        room)."""
        keep = self.allocator.blocks_for(tokens)
        for block in self.blocks[keep:]:
            self.allocator.release(block)
        del self.blocks[keep:]
        self._synced = min(self._synced, keep)

    def fork(self) -> BlockTable:
        other = BlockTable(self.allocator)
        other.blocks = [self.allocator.share(b) for b in self.blocks]
        return other

    def free(self) -> None:
        for block in self.blocks:
            self.allocator.release(block)
        self.blocks = []
        self._synced = 0
