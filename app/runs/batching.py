"""Token-budget batches: rows sorted by length and cut into batches of at most `max_rows` rows whose padded
size (rows × the batch's longest row) stays within `budget` tokens; a row longer than the budget trains
alone. Short rows then share a step and long ones do not, so a batch's memory follows the budget rather
than the longest row times a fixed row count.

Torch-free: the launch counts the batches (and so the steps) from the dataset's cached token lengths, and
the training process's sampler (worker.data.LengthBucketSampler) cuts the same way from the rows it
encoded."""

from __future__ import annotations

import math
from collections.abc import Sequence


def plan_batches(
    lengths: Sequence[int], max_rows: int, budget: int | None, tie_break: Sequence[float] | None = None
) -> list[list[int]]:
    """Row indices in batches, shortest rows first. `budget` None: `max_rows` rows a batch whatever their
    length. `tie_break` orders rows of equal length (a new order each epoch); the batches' sizes depend on
    the lengths alone, so every epoch has as many batches."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie_break[i] if tie_break else i))
    limit = math.inf if budget is None else budget
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:  # ascending: the row joining a batch is its longest
        if current and (len(current) >= max_rows or (len(current) + 1) * lengths[index] > limit):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def padded_tokens(lengths: Sequence[int], max_rows: int, budget: int | None) -> int:
    """The largest batch's padded size (rows × its longest row) in tokens: what a step's memory follows."""
    return max(
        (len(batch) * max(lengths[i] for i in batch) for batch in plan_batches(lengths, max_rows, budget)),
        default=0,
    )
