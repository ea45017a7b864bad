"""The scaling benchmark's profile arithmetic: where a step's time goes, from kernel intervals."""

from __future__ import annotations

import pytest

from moegpt.harness.jobs import overlap_shares, union_length


@pytest.mark.parametrize(
    ("intervals", "length"),
    [
        ([], 0),
        ([(0, 10)], 10),
        ([(0, 10), (20, 25)], 15),  # apart
        ([(0, 10), (5, 15)], 15),  # overlapping
        ([(0, 10), (2, 4), (3, 12)], 12),  # nested, then reaching past
        ([(5, 15), (0, 10), (10, 11)], 15),  # unsorted, touching
    ],
)
def test_union_length(intervals: list[tuple[int, int]], length: int) -> None:
    assert union_length(intervals) == length


def test_overlap_shares_split_the_span_into_hidden_exposed_and_idle() -> None:
    # compute 0-40 and 60-100; NCCL 30-50 (10 hidden under compute, 10 alone) and 90-100
    # (hidden); nothing runs 50-60.
    shares = overlap_shares(comm=[(30, 50), (90, 100)], compute=[(0, 40), (60, 100)])
    assert shares == pytest.approx(
        {"communication_share": 0.3, "exposed_communication_share": 0.1, "idle_share": 0.1}
    )


def test_overlap_shares_of_a_step_without_communication() -> None:
    shares = overlap_shares(comm=[], compute=[(0, 5), (10, 20)])
    assert shares == pytest.approx(
        {"communication_share": 0.0, "exposed_communication_share": 0.0, "idle_share": 0.25}
    )


def test_copies_are_busy_time_but_not_compute() -> None:
    # NCCL 0-10 beside a copy 0-10 only: exposed; a copy 10-20 alone: busy, not idle
    shares = overlap_shares(comm=[(0, 10)], compute=[(20, 40)], copies=[(0, 20)])
    assert shares == pytest.approx(
        {"communication_share": 0.25, "exposed_communication_share": 0.25, "idle_share": 0.0}
    )


def test_overlap_shares_of_an_empty_or_instant_step() -> None:
    zero = {"communication_share": 0.0, "exposed_communication_share": 0.0, "idle_share": 0.0}
    assert overlap_shares(comm=[], compute=[]) == zero
    assert overlap_shares(comm=[(5, 5)], compute=[(5, 5)]) == zero
