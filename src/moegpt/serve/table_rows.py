"""The forward's copy of every sequence's block table, one row each of a persistent array.

The scheduler's tables change rarely: a decode step adds a block once every ``block_size``
tokens of a sequence. So steps carry only what changed (``ModelInput.tables``: a row, the first
block that changed, the blocks from there on), every forward (each tensor-parallel rank's, the
draft model's) applies those changes here, and a step's slot mapping and padded tables are
gathered from this array in a few numpy operations, whatever the batch's contexts: at 256
sequences, rebuilding them from per-sequence lists cost the host more than a microsecond a
sequence a step at 256-token contexts, growing with the context.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# A row's change: (row, first block that changed, the row's blocks from there to its end).
TableChange = tuple[int, int, tuple[int, ...]]


class BlockTableRows:
    """Block tables by row; entries past a table's end name ``fill`` (a decode graph's
    scratch block, which padding rows and masked keys read). Rows and columns grow as changes
    need them."""

    def __init__(self, fill: int = 0, rows: int = 64, width: int = 16) -> None:
        self.fill = fill
        self.array = np.full((rows, width), fill, dtype=np.int64)

    def apply(self, changes: Iterable[TableChange]) -> None:
        for row, first, blocks in changes:
            end = first + len(blocks)
            self._make_room(row, end)
            self.array[row, first:end] = blocks
            self.array[row, end:] = self.fill

    def _make_room(self, row: int, width: int) -> None:
        rows, columns = self.array.shape
        if row < rows and width <= columns:
            return
        grown = np.full((max(rows, 2 * row + 1), max(columns, 2 * width)), self.fill, np.int64)
        grown[:rows, :columns] = self.array
        self.array = grown

    def gather(self, rows: np.ndarray, width: int) -> np.ndarray:
        """The first ``width`` blocks of each of ``rows`` (``fill`` past the array's width)."""
        have = min(width, self.array.shape[1])
        out = np.full((len(rows), width), self.fill, dtype=np.int64)
        out[:, :have] = self.array[rows, :have]
        return out

    def slots(
        self, rows: np.ndarray, starts: np.ndarray, counts: np.ndarray, block_size: int
    ) -> np.ndarray:
        """Cache slots of positions ``starts[i] .. starts[i] + counts[i]`` of row ``rows[i]``,
        for every ``i`` in order, concatenated."""
        which = np.repeat(np.arange(len(rows)), counts)
        offsets = np.cumsum(counts) - counts
        positions = np.arange(int(counts.sum())) - offsets[which] + starts[which]
        blocks = self.array[rows[which], positions // block_size]
        return blocks * block_size + positions % block_size
