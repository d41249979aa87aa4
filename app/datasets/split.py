"""The reproducible train/validation split shared by the preview and the training process."""

from __future__ import annotations

import random


def validation_rows(n_rows: int, *, fraction: float, max_rows: int, seed: int) -> list[int]:
    """Sorted 0-based indices of the rows held out for validation.

    `fraction` of the rows, at most `max_rows`; sets under 10 rows at the default fraction keep every
    row for training. The same arguments always give the same rows."""
    count = min(int(n_rows * fraction), max_rows)
    if count <= 0:
        return []
    return sorted(random.Random(seed).sample(range(n_rows), count))
