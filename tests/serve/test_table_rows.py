"""Block tables travel as changes: a copy kept up to date from ``BlockTable.changes`` alone
equals the table after any mix of growth, copy-on-write, truncation, freeing and forks; and
the forward's :class:`BlockTableRows` gives the slots and padded tables a brute-force
reading of the lists gives."""

from __future__ import annotations

import random

import numpy as np

from moegpt.serve.blocks import BlockAllocator, BlockTable
from moegpt.serve.table_rows import BlockTableRows

SIZE = 4


def test_a_copy_fed_only_changes_equals_the_table() -> None:
    rng = random.Random(0)
    allocator = BlockAllocator(400, SIZE)
    tables = [BlockTable(allocator)]
    copies: list[list[int]] = [[]]
    lengths = [0]
    sent = 0
    for _ in range(2000):
        i = rng.randrange(len(tables))
        table, op = tables[i], rng.choice(["grow", "grow", "truncate", "fork", "free", "sync"])
        if op == "grow" and allocator.free > 8:
            start = rng.randrange(lengths[i] + 1)  # rewriting cached tokens copies shared blocks
            lengths[i] = max(lengths[i], start + rng.randint(1, 9))
            table.grow(start, lengths[i])
        elif op == "truncate":
            lengths[i] = rng.randrange(lengths[i] + 1)
            table.truncate(lengths[i])
        elif op == "fork" and len(tables) < 6:
            tables.append(table.fork())
            copies.append([])
            lengths.append(lengths[i])
        elif op == "free":
            table.free()
            lengths[i] = 0
        change = table.changes()
        if change is not None:
            first, blocks = change
            copies[i][first:] = blocks
            sent += 1
        assert copies[i] == table.blocks
        assert table.changes() is None  # nothing changed since
    assert sent > 300


def brute_slots(tables: list[list[int]], starts: list[int], counts: list[int]) -> list[int]:
    return [
        table[p // SIZE] * SIZE + p % SIZE
        for table, start, count in zip(tables, starts, counts, strict=True)
        for p in range(start, start + count)
    ]


def test_rows_give_the_lists_slots_and_padded_tables() -> None:
    rng = np.random.default_rng(0)
    scratch = 99
    rows = BlockTableRows(fill=scratch, rows=2, width=2)  # both grow
    tables = {row: rng.permutation(90)[: rng.integers(1, 12)].tolist() for row in (0, 3, 7, 5)}
    rows.apply((row, 0, tuple(table)) for row, table in tables.items())
    # A later change rewrites a table's tail and shortens it.
    tables[3] = [*tables[3][:1], 42]
    rows.apply([(3, 1, (42,))])
    order = np.array([7, 3, 0, 5])
    lists = [tables[int(r)] for r in order]
    starts = np.array([rng.integers(len(t) * SIZE) for t in lists])
    counts = np.array(
        [rng.integers(len(t) * SIZE - s + 1) for t, s in zip(lists, starts, strict=True)]
    )
    got = rows.slots(order, starts, counts, SIZE)
    assert got.tolist() == brute_slots(lists, starts.tolist(), counts.tolist())
    for width in (1, 5, 30):
        padded = rows.gather(order, width)
        want = [(t + [scratch] * width)[:width] for t in lists]
        assert padded.tolist() == want
