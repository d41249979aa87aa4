"""The reproducible train/validation split shared by the preview and the training process."""

from __future__ import annotations

import random

# Rows held out by default: this share of a dataset, at most this many (a run may choose its own:
# evaluation.held_out_fraction and held_out_max_rows). The dataset page shows the split they make with
# PREVIEW_SEED; a run's own seed picks its rows.
HELD_OUT_FRACTION = 0.1
HELD_OUT_MAX_ROWS = 500
PREVIEW_SEED = 42
# A smaller dataset trains every row by default: each of its few rows is a fact to learn, and a handful
# held out could only show what the run cannot know. A run may still hold rows out (one click on New run).
MIN_ROWS_TO_HOLD_OUT = 100


def default_fraction(n_rows: int) -> float:
    """The share of a dataset held out when a run does not choose: none below MIN_ROWS_TO_HOLD_OUT rows."""
    return HELD_OUT_FRACTION if n_rows >= MIN_ROWS_TO_HOLD_OUT else 0.0


def validation_rows(n_rows: int, *, fraction: float, max_rows: int, seed: int) -> list[int]:
    """Sorted 0-based indices of the rows held out for validation.

    `fraction` of the rows, at most `max_rows`; sets under 10 rows at the default fraction keep every
    row for training. The same arguments always give the same rows."""
    count = min(int(n_rows * fraction), max_rows)
    if count <= 0:
        return []
    return sorted(random.Random(seed).sample(range(n_rows), count))
