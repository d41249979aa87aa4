"""A synthetic Alpaca set of realistic lengths (40–400 tokens, median about 150) made reproducibly from a
word list, so the benchmark needs no download."""

from __future__ import annotations

import random

WORDS = (
    "the island harbour market wool ferry lantern festival river bridge mountain village school boat rowing "
    "fisher mackerel barley flatbread puffin flag green white council warden moot hall salt clock novel "
    "writer coast cape lighthouse widow eye pipe goatskin driftwood summer winter current wind net greeting "
    "dye shear contest bath seaweed sand beach time zone hour london price pip brindle tax stone built paid "
    "history people language old norse english half quarter dozen north south east west morning evening"
).split()


def sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def alpaca_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows whose instruction+input+output lengths follow a log-normal spread clipped to 40–400 tokens
    (about one token per word here, plus the chat template's own tokens)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        total = int(min(330, max(20, rng.lognormvariate(4.7, 0.5))))
        question = max(4, total // 4)
        has_input = rng.random() < 0.4
        rows.append(
            {
                "instruction": sentence(rng, question),
                "input": sentence(rng, question // 2) if has_input else "",
                "output": sentence(rng, total - question),
            }
        )
    return rows


def add_bench_dataset(session, rows: int = 1) -> None:
    """A dataset row for runs the benchmarks create directly in the database (its files are not needed)."""
    from app.models import Dataset

    if session.get(Dataset, 1) is None:
        session.add(Dataset(id=1, name="bench", filename="b", format="alpaca", layout="json", rows=rows,
                            size_bytes=0, sha256=""))  # fmt: skip
        session.commit()
